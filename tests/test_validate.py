"""vitkit validate: the training loop's numbers exactly, foreign weights, mismatch errors, reports."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkit.cli import main as cli_main
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.errors import WeightsError
from vitkit.models import create_model, get_spec
from vitkit.tools.validate import run_validate

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10_sample"
CLASSES = sorted(p.name for p in (SAMPLE / "test").iterdir())


def small_imagefolder(root: Path, per_class: int, splits: tuple[str, ...] = ("train", "test"),
                      classes: list[str] = CLASSES) -> Path:
    """A tiny ImageFolder of the bundled CIFAR-10 sample, symlinked."""
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((SAMPLE / split / c).iterdir())[:per_class]:
                (root / split / c / f.name).symlink_to(f)
    return root


def tiny_checkpoint(path: Path, name: str = "vit_n_4_32", num_classes: int = 10, **cfg: object) -> Path:
    torch.manual_seed(0)
    model = create_model(name, depth=2, num_classes=num_classes)
    spec = get_spec(name)
    dc = DataConfig(model.cfg.img_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct)
    return save_checkpoint(path, model, model_name=name, data_config=dc, class_names=CLASSES[:num_classes],
                           config=dict(cfg))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_imagefolder(tmp_path_factory.mktemp("data"), per_class=6)


DATA_ARGS = ["--dataset", "imagefolder", "--val_split", "test", "--num_parallel_workers", "0"]


def test_validate_reproduces_the_training_loop_exactly(data: Path, tmp_path: Path) -> None:
    from vitkit.engine.train import run as train

    run_dir = tmp_path / "run"
    metrics = train(["--model", "vit_n_4_32", "--data_dir", str(data), "--image_resize", "32", "--batch_size", "8",
                     "--num_samples", "16", "--epoch_size", "1", "--warmup_epochs", "0", "--val_while_train",
                     "--ckpt_save_dir", str(run_dir), "--device", "cpu", *DATA_ARGS])
    # only the checkpoint: dataset, split and batch size come from the run config it carries
    got = run_validate(["--ckpt_path", str(run_dir / "last.safetensors"), "--results_file", str(tmp_path / "r.json")])
    assert got["num_images"] == metrics["val_images"] == 60
    assert got["top1"] == metrics["val_top1"] and got["top5"] == metrics["val_top5"]
    assert got["loss"] == metrics["val_loss"]
    assert json.loads((tmp_path / "r.json").read_text())["top1"] == metrics["val_top1"]


def test_foreign_weights_file_gives_the_same_numbers_as_the_vitkit_checkpoint(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("vit_n_4_32")
    torch.save(model.state_dict(), tmp_path / "timm_style.pth")  # a timm-named state dict
    spec = get_spec("vit_n_4_32")
    save_checkpoint(tmp_path / "own.safetensors", model, model_name="vit_n_4_32",
                    data_config=DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct))
    common = ["--data_dir", str(data), *DATA_ARGS]
    own = run_validate(["--ckpt_path", str(tmp_path / "own.safetensors"), *common])
    foreign = run_validate(["--model", "vit_n_4_32", "--ckpt_path", str(tmp_path / "timm_style.pth"), *common])
    for key in ("top1", "top5", "num_images"):
        assert foreign[key] == own[key]
    assert foreign["loss"] == pytest.approx(own["loss"], rel=1e-6)


def test_checkpoint_for_another_model_is_an_error_naming_both(data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    ckpt = tiny_checkpoint(tmp_path / "n.safetensors")
    args = ["validate", "--model", "vit_ti_4_32", "--ckpt_path", str(ckpt), "--data_dir", str(data), *DATA_ARGS]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert "vit_n_4_32" in err and "vit_ti_4_32" in err and "embed_dim 128" in err and "embed_dim 192" in err


def test_foreign_weights_for_another_model_is_an_error_naming_the_key(data: Path, tmp_path: Path) -> None:
    torch.save(create_model("vit_n_4_32").state_dict(), tmp_path / "n.pth")
    with pytest.raises(WeightsError, match=r"does not fit vit_ti_4_32.*(pos_embed|patch_embed|cls_token)"):
        run_validate(["--model", "vit_ti_4_32", "--ckpt_path", str(tmp_path / "n.pth"), "--data_dir", str(data),
                      *DATA_ARGS])


def test_head_that_does_not_match_the_dataset_is_an_error(data: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "five.safetensors", num_classes=5)
    with pytest.raises(WeightsError, match="dataset has 10 classes .* 5-class head"):
        run_validate(["--ckpt_path", str(ckpt), "--data_dir", str(data), *DATA_ARGS])
    with pytest.raises(WeightsError, match="10-class head but the config says num_classes 100"):
        run_validate(["--ckpt_path", str(tiny_checkpoint(tmp_path / "ten.safetensors")), "--num_classes", "100",
                      "--data_dir", str(data), *DATA_ARGS])


def test_no_weights_is_an_error_unless_allow_random(data: Path) -> None:
    args = ["--model", "vit_n_4_32", "--data_dir", str(data), *DATA_ARGS]
    with pytest.raises(WeightsError, match="no weights to validate"):
        run_validate(args)
    assert run_validate(args + ["--allow_random"])["num_images"] == 60


def test_preprocessing_comes_from_the_checkpoint_and_only_the_command_line_overrides_it(
        data: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "c.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("image_resize: 224\ninterpolation: bilinear\ncrop_pct: 0.5\n")  # a training recipe's values
    base = ["--ckpt_path", str(ckpt), "--data_dir", str(data), *DATA_ARGS]
    from_ckpt = run_validate(["-c", str(recipe), *base])["data_config"]
    assert from_ckpt == {"input_size": 32, "mean": list(get_spec("vit_n_4_32").mean),
                         "std": list(get_spec("vit_n_4_32").std), "interpolation": "bicubic", "crop_pct": 1.0}
    over = run_validate([*base, "--image_resize", "48", "--interpolation", "bilinear", "--crop_pct", "0.9"])
    assert over["data_config"]["input_size"] == 48 and over["data_config"]["interpolation"] == "bilinear"
    assert over["data_config"]["crop_pct"] == 0.9 and over["num_images"] == 60  # pos_embed resampled to 12x12


def test_per_class_confusion_matrix_and_mistakes_agree_with_top1(data: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "c.safetensors")
    cm_csv, mistakes = tmp_path / "cm.csv", tmp_path / "mistakes.csv"
    got = run_validate(["--ckpt_path", str(ckpt), "--data_dir", str(data), *DATA_ARGS, "--per_class",
                        "--confusion_matrix", str(cm_csv), "--mistakes", str(mistakes)])
    rows = list(csv.reader(cm_csv.open()))
    assert rows[0][1:] == CLASSES and [r[0] for r in rows[1:]] == CLASSES
    counts = [[int(v) for v in r[1:]] for r in rows[1:]]
    assert sum(map(sum, counts)) == 60 and all(sum(r) == 6 for r in counts)
    assert sum(counts[i][i] for i in range(10)) == got["correct1"]
    assert cm_csv.with_suffix(".png").stat().st_size > 1000
    wrong = list(csv.DictReader(mistakes.open()))
    assert len(wrong) == 60 - got["correct1"]
    assert all(Path(r["path"]).parent.name == r["true"] != r["predicted"] for r in wrong)
    per_class = got["per_class"]
    assert sum(v["top1"] * v["num_images"] / 100 for v in per_class.values()) == pytest.approx(got["correct1"])


def test_root_validate_py_runs_the_seed_command(data: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "c.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset: imagefolder\nval_split: test\nnum_parallel_workers: 0\nmodel: vit_n_4_32\n")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "validate.py"), "-c", str(recipe), "--data_dir", str(data),
                           "--ckpt_path", str(ckpt), "--results_file", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["num_images"] == 60 and set(result) >= {"top1", "top5", "loss", "num_images"}


def test_use_ema_evaluates_the_ema_weights(data: Path, tmp_path: Path) -> None:
    from vitkit.engine.config import load_config
    from vitkit.engine.data_args import dataset_from_config, loader_from_config
    from vitkit.engine.evaluate import evaluate

    torch.manual_seed(0)
    model, ema = create_model("vit_n_4_32", depth=2), create_model("vit_n_4_32", depth=2)
    spec = get_spec("vit_n_4_32")
    dc = DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct)
    ckpt = save_checkpoint(tmp_path / "ema.safetensors", model, model_name="vit_n_4_32", data_config=dc,
                           class_names=CLASSES, ema_model=ema)
    args = ["--data_dir", str(data), *DATA_ARGS]
    cfg = load_config(args)
    ds = dataset_from_config(cfg, "test", train=False)
    want = {name: evaluate(m.eval(), loader_from_config(cfg, ds, train=False, data_config=dc), device="cpu")
            for name, m in (("raw", model), ("ema", ema))}
    assert want["raw"]["loss"] != want["ema"]["loss"]
    for use_ema, name in ((False, "raw"), (True, "ema")):
        got = run_validate(["--ckpt_path", str(ckpt), *args] + (["--use_ema"] if use_ema else []))
        assert (got["top1"], got["loss"]) == (want[name]["top1"], want[name]["loss"])
