"""Impossible values and hostile recipes are one-line errors before anything runs (issue 17)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitkit.engine.config import load_config
from vitkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, match", [
    (["--clip_grad", "--clip_value", "-5"], "'clip_value': must be > 0"),
    (["--warmup_factor", "-2"], "'warmup_factor': must be in \\[0, 1\\]"),
    (["--min_lr", "5", "--lr", "0.1"], "'min_lr': must be between 0 and lr"),
    (["--num_cycles", "0"], "'num_cycles': must be >= 1"),
    (["--decay_rate", "-3", "--scheduler", "polynomial_decay"], "'decay_rate': must be > 0"),
    (["--seed", str(2**64 - 1)], "'seed': must be between 0 and 2\\*\\*32 - 1"),
    (["--image_resize", "100000"], "'image_resize': must be at most 4096"),
    (["--eps", "-1"], "'eps': must be > 0"),
    (["--momentum", "1.5"], "'momentum': must be in \\[0, 1\\)"),
    (["--data_dir", "/tmp/a\x00b"], "a NUL character"),
    (["--log_interval", "0"], "'log_interval': must be >= 1"),  # was a ZeroDivisionError at the first step
    (["--scale_lr", "--reference_batch_size", "0"], "'reference_batch_size': must be >= 1"),  # ZeroDivisionError
    (["--reference_batch_size", "-8", "--scale_lr"], "'reference_batch_size': must be >= 1"),  # blamed lr
    (["--loss_scale", "0"], "'loss_scale': must be > 0"),
    (["--aug_repeats", "-1"], "'aug_repeats': must be >= 0"),
    (["--bad_image_limit", "-1"], "'bad_image_limit': must be a share"),
    (["--in_channels", "100000"], "'in_channels': must be 3"),  # was recorded and ignored
    (["--mixup", "0.8", "--cutmix", "-1"], "'cutmix': must be >= 0"),  # named mixup
    (["--color_jitter", "0.4", "0.4", "0.4", "0.9"], "'color_jitter': strengths must be >= 0"),
    (["--re_scale", "0.5", "0.1"], "'re_scale': must be an increasing range"),
    (["--multi_step_decay_milestones", "60", "30"], "'multi_step_decay_milestones': must be increasing"),
])
def test_impossible_values_are_one_line_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        load_config(argv, notices=[])
    assert "\n" not in str(e.value)


# a number where -1 is meaningful: random erasing's fill value
NEGATIVE_ALLOWED = {"re_value"}


def test_every_numeric_key_refuses_negative_and_nan_values() -> None:
    """The class, not the examples: any int/float key set to -1 or nan is a ConfigError naming it, unless -1
    means something for it (NEGATIVE_ALLOWED); never a value that fails later in arithmetic."""
    from vitkit.engine.config import FIELDS

    numeric = [n for n, f in FIELDS.items() if ("int" in str(f.type) or "float" in str(f.type))
               and not f.metadata.get("choices")]
    assert len(numeric) > 40
    for name in numeric:
        for value in ("-1", "nan"):
            if value == "-1" and name in NEGATIVE_ALLOWED:
                continue
            with pytest.raises(ConfigError, match=f"'{name}'|--{name}|{name}") as e:
                load_config([f"--{name}", value], notices=[])
            assert "\n" not in str(e.value)


def test_a_key_written_twice_in_a_recipe_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dup.yaml").write_text("lr: 0.1\nbatch_size: 8\nlr: 0.2\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is written twice \(lines 1 and 3\)"):
        load_config(["-c", str(tmp_path / "dup.yaml")], notices=[])
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 0.1}\noptimizer:\n  <<: *b\n  weight_decay: 0.1\n")
    assert load_config(["-c", str(tmp_path / "merge.yaml")], notices=[]).lr == 0.1  # merge keys still work


def test_image_resize_follows_the_model_unless_given() -> None:
    """The schema's 224 is MindCV's ImageNet size; a 32 px or 384 px model trains at its own size unless a recipe,
    the command line or a checkpoint says otherwise."""
    from vitkit.engine.config import resolve

    base = ["--dataset", "imagefolder", "--data_dir", "/nowhere", "--ckpt_save_dir", "/tmp/vitkit-unused"]
    for model, size in (("vit_n_4_32", 32), ("vit_b_16_384", 384), ("vit_b_32_224", 224)):
        cfg = resolve(["--model", model, *base], notices=[])
        assert cfg.image_resize == size
    cfg = resolve(["--model", "vit_n_4_32", "--image_resize", "64", *base], notices=[])
    assert cfg.image_resize == 64 and cfg.sources["image_resize"] == "command line"


def test_an_alias_bomb_is_never_expanded_into_the_message(tmp_path: Path) -> None:
    levels = ["&a [" + ", ".join(['"lol"'] * 9) + "]"]
    levels += [f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    (tmp_path / "bomb.yaml").write_text("mean: [" + ", ".join(levels) + "]\n")  # 9**9 strings if expanded
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="config key 'mean'") as e:
        load_config(["-c", str(tmp_path / "bomb.yaml")], notices=[])
    assert len(str(e.value)) < 400 and time.perf_counter() - t0 < 5


def test_a_deeply_nested_recipe_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "deep.yaml").write_text("mean: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nests too deeply|expected"):
        load_config(["-c", str(tmp_path / "deep.yaml")], notices=[])


def test_image_resize_that_is_no_patch_multiple_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vitkit.cli", "train", "--smoke", "--dataset", "imagefolder",
                           "--data_dir", str(REPO / "data/cifar10_sample"), "--val_split", "test", "--model",
                           "vit_n_4_32", "--image_resize", "30", "--ckpt_save_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: model vit_n_4_32 with image_resize 30: img_size 30 is not a multiple of patch_size 4"]
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind


LONG = "a" * 5000  # no file system has such a name: pathlib raises ENAMETOOLONG from its first stat


@pytest.mark.parametrize("argv", [
    ["train", "-c", LONG], ["train", "--smoke", "--data_dir", LONG], ["train", "--smoke", "--resume", LONG],
    ["train", "--smoke", "--ckpt_save_dir", "x/" + "b" * 300], ["validate", "--ckpt_path", LONG],
    ["export", LONG], ["convert", LONG, "out.safetensors"], ["data", "check", LONG], ["predict", LONG, "x.jpg"],
])
def test_a_path_no_file_can_have_is_one_line_in_every_verb(argv: list[str], tmp_path: Path, capsys, monkeypatch):
    """Found by the 2000-example fuzz run (`-c` with a 400-character name: an OSError traceback); the class is
    every path a verb takes, so each verb is tried."""
    from vitkit.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    said = "x.jpg does not exist" if argv[0] == "predict" else ("too long", "longer than any")  # images first
    assert (said in lines[0]) if isinstance(said, str) else any(s in lines[0] for s in said), lines[0]
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("argv, said", [
    (["serve", "x", "--threads", "-1"], "argument --threads: must be >= 0 (got -1)"),  # was torch's RuntimeError
    (["serve", "x", "--topk", "0"], "argument --topk: must be >= 1 (got 0)"),  # served empty answers
    (["serve", "x", "--max_queue", "0"], "argument --max_queue: must be >= 1"),
    (["predict", "x", "y.jpg", "--batch_size", "0"], "argument --batch_size: must be >= 1"),
    (["predict", "x", "y.jpg", "--max_pixels", "0"], "argument --max_pixels: must be >= 1"),
    (["export", "x", "--check_count", "-1"], "argument --check_count: must be >= 1"),
    (["export", "x", "--tolerance", "nan"], "argument --tolerance: must be a number (got nan)"),
    (["export", "x", "--max_top1_drop", "nan"], "argument --max_top1_drop: must be a number"),  # never failed
    (["export", "x", "--calib_count", "0"], "argument --calib_count: must be >= 1"),
    (["benchmark", "--batch_size", "0"], "argument --batch_size: must be >= 1"),
    (["benchmark", "--steps", "x"], "argument --steps: expected an integer, not 'x'"),
    (["data", "check", "x", "--imbalance", "0.5"], "argument --imbalance: must be >= 1 (got 0.5)"),
    (["push", "x", "a/b", "--tolerance", "-1"], "argument --tolerance: must be >= 0"),
])
def test_impossible_numbers_on_other_verbs_are_the_parsers_error(argv: list[str], said: str, capsys) -> None:
    """Each was accepted before: a traceback later, an empty answer, or a check that could never pass."""
    from vitkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    verb = "data check" if argv[0] == "data" else argv[0]
    assert e.value.code == 2 and err.splitlines()[-1].startswith(f"vitkit {verb}: error: {said}"), err
