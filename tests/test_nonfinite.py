"""NaN weights (issue 17): the trainer never writes non-finite weights (NaN/inf in the model or its EMA at a save is
a divergence, so `--nan_policy rollback` always reloads a finite checkpoint), foreign weights with NaN/inf are a
one-line error naming the tensor, and validate / predict of a NaN checkpoint are one `error:` line with exit code
2 unless `--allow_nonfinite` (then they run, and their JSON stays valid JSON).

Training runs are test_reliability's (vit_n_4_32 on 40 images of the bundled CIFAR-10 sample: 4 epochs of 2
steps, a save per epoch), in this process.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_reliability import SAMPLE, train_args

from vitkit.cli import main
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import load_checkpoint, save_checkpoint
from vitkit.engine.loop import Trainer
from vitkit.errors import WeightsError
from vitkit.models import create_model
from vitkit.weights import PretrainedWeights, fit_weights

KEY = "blocks.0.attn.qkv.weight"


@pytest.fixture
def one_thread():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def cli(*argv: str, capsys) -> tuple[int, str, list[str]]:
    """`vitkit ...` in this process: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err.splitlines()


def nan_weights_after(monkeypatch, step: int, where: str) -> None:
    """The first time optimizer step `step` is done, one weight of the model (or of its EMA copy) becomes NaN,
    as an update that overflowed would make it: the loss of that step was finite, the next one's would not be."""
    real, done = Trainer.train_step, []

    def train_step(self, batches):
        out = real(self, batches)
        if self.step == step and not done:
            done.append(step)
            module = self.model if where == "model" else self.ema.module
            with torch.no_grad():
                module.get_parameter(KEY)[0, 0] = float("nan")
        return out
    monkeypatch.setattr(Trainer, "train_step", train_step)


def assert_all_checkpoints_finite(run_dir: Path) -> None:
    files = sorted(run_dir.glob("*.safetensors"))
    assert files
    for f in files:
        load_checkpoint(f)  # refuses NaN/inf weights (and EMA weights)


@pytest.mark.parametrize("where", ["model", "ema"])
def test_rollback_never_writes_nan_weights_and_reloads_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys,
                                                                                 one_thread, where):
    """NaN weights after step 4, the end of epoch 2: its save refuses them and rolls back to the step-2
    checkpoint (lr halved), and the run ends; every checkpoint it wrote is finite."""
    run_dir = tmp_path / "run"
    nan_weights_after(monkeypatch, 4, where)
    rc, out, err = cli("train", *train_args(run_dir, "--nan_policy", "rollback"), capsys=capsys)
    assert rc == 0, err
    key = KEY if where == "model" else f"ema.{KEY}"
    assert (f"warning: non-finite weights after step 4 ({key} holds NaN or inf; not saved); rolled back to "
            f"{run_dir / 'last.safetensors'} (step 2) and continuing with lr x0.5 (rollback 1/3)") in out, out
    assert_all_checkpoints_finite(run_dir)
    last = load_checkpoint(run_dir / "last.safetensors")
    assert last.step == 8 and last.config["nan_policy"] == "rollback"
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]


def test_nan_weights_with_nan_policy_stop_are_not_saved(tmp_path, monkeypatch, capsys, one_thread):
    run_dir = tmp_path / "run"
    nan_weights_after(monkeypatch, 4, "model")
    rc, _, err = cli("train", *train_args(run_dir), capsys=capsys)
    assert rc == 2 and [line for line in err if line.startswith("error")] == err[-1:], err
    assert err[-1].startswith(f"error: training diverged: non-finite weights after step 4 ({KEY} holds NaN or inf; "
                              f"not saved) (epoch 2); the last good checkpoint is {run_dir / 'last.safetensors'}")
    assert load_checkpoint(run_dir / "last.safetensors").step == 2
    assert not (run_dir / "vit_n_4_32-e0002.safetensors").exists()
    assert_all_checkpoints_finite(run_dir)


def test_the_loss_going_nan_rolls_back_to_a_finite_checkpoint(tmp_path, monkeypatch, capsys, one_thread):
    """NaN weights after step 3 (mid-epoch, no save): step 4's loss is NaN, and the rollback reloads step 2."""
    run_dir = tmp_path / "run"
    nan_weights_after(monkeypatch, 3, "model")
    rc, out, err = cli("train", *train_args(run_dir, "--nan_policy", "rollback", "--max_steps", "6"), capsys=capsys)
    assert rc == 0, err
    assert "warning: non-finite loss nan" in out and "at step 3; rolled back to" in out and "(step 2)" in out, out
    assert_all_checkpoints_finite(run_dir)
    assert load_checkpoint(run_dir / "last.safetensors").step == 6


# -- foreign weights -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fit_weights_refuses_nonfinite_weights_naming_the_key_unless_allowed(value):
    torch.manual_seed(0)
    sd = create_model("vit_n_4_32", depth=1).state_dict()
    sd[KEY][1, 2] = value
    weights = PretrainedWeights(sd, "timm", "broken.safetensors")
    model = create_model("vit_n_4_32", depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as e:
        fit_weights(model, weights)
    assert str(e.value).startswith(f"broken.safetensors: tensor {KEY} holds NaN or infinite values")
    assert "\n" not in str(e.value) and "allow_nonfinite" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded
    fit_weights(model, weights, allow_nonfinite=True)
    assert not torch.isfinite(model.get_parameter(KEY)).all()


def test_a_nonfinite_head_that_is_replaced_anyway_is_no_error():
    sd = create_model("vit_n_4_32", depth=1, num_classes=5).state_dict()
    sd["head.weight"][0, 0] = float("nan")
    model = create_model("vit_n_4_32", depth=1, num_classes=10)
    report = fit_weights(model, PretrainedWeights(sd, "timm", "other_task.pth"))
    assert report.head_reset and torch.isfinite(model.head.weight).all()


# -- validate and predict --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """A vitkit checkpoint whose EMA weights hold NaN (its own weights are fine) and a plain safetensors file of
    weights with an inf: what a diverged run leaves, and foreign weights of one."""
    root = tmp_path_factory.mktemp("broken")
    torch.manual_seed(0)
    model, ema = create_model("vit_n_4_32"), create_model("vit_n_4_32")
    with torch.no_grad():
        ema.get_parameter(KEY)[0] = float("nan")
    save_checkpoint(root / "nan.safetensors", model, model_name="vit_n_4_32", data_config=DataConfig(32),
                    ema_model=ema, class_names=sorted(p.name for p in (SAMPLE / "test").iterdir()))
    sd = model.state_dict()
    sd[KEY][0] = float("inf")
    save_file(sd, str(root / "inf.safetensors"))
    for cls in sorted(p.name for p in (SAMPLE / "test").iterdir()):  # 2 test images per class
        (root / "data" / "test" / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / "test" / cls).iterdir())[:2]:
            (root / "data" / "test" / cls / f.name).symlink_to(f)
    return {"ckpt": root / "nan.safetensors", "foreign": root / "inf.safetensors", "data": root / "data"}


VALIDATE = ("--dataset", "imagefolder", "--val_split", "test", "--num_parallel_workers",
            "0", "--batch_size", "50", "--model", "vit_n_4_32")


@pytest.mark.parametrize("which", ["ckpt", "foreign"])
def test_validate_of_nonfinite_weights_is_one_error_line_unless_allowed(broken, which, tmp_path, capsys, one_thread):
    source = broken[which]
    ema = ("--use_ema",) if which == "ckpt" else ()
    rc, out, err = cli("validate", "--ckpt_path", str(source), *ema, "--data_dir", str(broken["data"]), *VALIDATE,
                       capsys=capsys)
    assert rc == 2 and len(err) == 1 and out == "", (out, err)
    key = f"ema.{KEY}" if which == "ckpt" else KEY
    assert err[0].startswith(f"error: {source}: tensor {key} holds NaN or infinite values") and "--allow_nonfinite" \
        in err[0], err
    results = tmp_path / "r.json"
    rc, out, err = cli("validate", "--ckpt_path", str(source), *ema, "--data_dir", str(broken["data"]), *VALIDATE,
                       "--allow_nonfinite",
                       "--results_file", str(results), capsys=capsys)
    assert rc == 0 and "top-1" in out, (out, err)
    summary = json.loads(results.read_text(), parse_constant=_no_constants)  # strict JSON: the NaN loss is null
    assert summary["loss"] is None and summary["num_images"] == 20


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} in JSON output")


@pytest.mark.parametrize("which", ["ckpt", "foreign"])
def test_predict_of_nonfinite_weights_is_one_error_line_unless_allowed(broken, which, capsys, one_thread):
    image = str(SAMPLE / "test" / "cat" / "0000.jpg")
    args = (str(broken[which]), image, "--format", "json") + (("--use_ema",) if which == "ckpt" else
                                                              ("--model", "vit_n_4_32"))
    rc, out, err = cli("predict", *args, capsys=capsys)
    assert rc == 2 and len(err) == 1 and out == "", (out, err)
    assert err[0].startswith("error: ") and "holds NaN or infinite values" in err[0], err
    rc, out, err = cli("predict", *args, "--allow_nonfinite", capsys=capsys)
    assert rc == 0, err
    results = json.loads(out, parse_constant=_no_constants)  # valid JSON: NaN probabilities are null
    assert results[0]["file"] == image and results[0]["predictions"][0]["probability"] is None


def test_serve_refuses_nonfinite_weights_in_one_line(tmp_path, capsys, one_thread):
    """A server of NaN weights would answer 500 to every request while /health said ok: it does not start."""
    torch.manual_seed(0)
    model = create_model("vit_n_4_32")
    with torch.no_grad():
        model.get_parameter(KEY)[0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.safetensors", model, model_name="vit_n_4_32", data_config=DataConfig(32),
                           class_names=[f"c{i}" for i in range(10)])
    rc, out, err = cli("serve", str(path), "--host", "127.0.0.1", "--port", "0", capsys=capsys)
    assert rc == 2 and len(err) == 1, (out, err)
    assert err[0].startswith(f"error: {path}: tensor {KEY} holds NaN or infinite values")
