"""Reliability (issue 8): a killed run loses nothing, a full disk keeps the last good checkpoint, bad input gets
a one-line error with exit code 2, the config parser never crashes, and seeded runs are bit-identical.

Training runs here are real `vitkit train` processes on 40 images of the bundled CIFAR-10 sample (vit_n_4_32,
2 steps per epoch). The crash tests pause a process at a chosen point (after a step, inside a checkpoint
write) through a small driver that wraps library functions, then SIGKILL it: the same as a kill at that
moment, without timing luck.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vitkit.engine.checkpoint import is_complete_pair, load_checkpoint, load_train_state

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"
# One thread everywhere: bit-identical runs need the same reduction order, and the machine is shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train_args(run_dir: Path, *extra: str) -> list[str]:
    """8 steps: 4 epochs of 2 steps (40 images, batch 16, last partial batch dropped); a save per epoch."""
    return ["--model", "vit_n_4_32", "--dataset", "imagefolder", "--data_dir", str(SAMPLE), "--val_split", "test",
            "--image_resize", "32", "--batch_size", "16", "--num_samples", "40", "--num_parallel_workers", "0",
            "--epoch_size", "4", "--warmup_epochs", "1", "--lr", "2e-3", "--seed", "7", "--deterministic",
            "--drop_path_rate", "0.1", "--ema", "--ema_decay", "0.9", "--no-val_while_train",
            "--ckpt_save_dir", str(run_dir), "--keep_checkpoint_max", "10", "--log_interval", "1", *extra]


# Runs `vitkit train` in-process after wrapping one library function, so the process stops (sleeps, waiting
# for SIGKILL) at an exact point: `step:N` after optimizer step N, `write:N` inside the N-th checkpoint file
# write (each save writes the training state, then the weights), with half of the temporary file on disk.
DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import vitkit.engine.checkpoint as C
    from vitkit.engine.loop import Trainer
    from vitkit.cli import main

    point, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    kind, n = point.split(":")
    n = int(n)

    def stop_here(what):
        marker.write_text(what)
        time.sleep(120)  # the test kills us here

    if kind == "step":
        real_step = Trainer.train_step
        def train_step(self, batches):
            out = real_step(self, batches)
            if self.step == n:
                stop_here(f"step {self.step}")
            return out
        Trainer.train_step = train_step
    elif kind == "write":
        real_write, calls = C.atomic_write, [0]
        def atomic_write(path, write):
            calls[0] += 1
            if calls[0] != n:
                return real_write(path, write)
            def half_then_stop(tmp):
                write(tmp)
                data = Path(tmp).read_bytes()
                Path(tmp).write_bytes(data[: len(data) // 2])
                stop_here(f"writing {path}")
            return real_write(path, half_then_stop)
        C.atomic_write = atomic_write
    sys.exit(main(["train", *argv]))
""")


def train(run_dir: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitkit.cli", "train", *train_args(run_dir, *extra)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def train_until_killed(tmp: Path, run_dir: Path, point: str, *extra: str, timeout: float = 120) -> str:
    """Start a training process, SIGKILL it once it reaches `point`; returns what it was doing."""
    driver, marker = tmp / "driver.py", tmp / "reached"
    driver.write_text(DRIVER)
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(driver), point, str(marker), *train_args(run_dir, *extra)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {point}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"training did not reach {point}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, EMA weights and optimizer state of two checkpoints."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    for x, y in ((ca.state_dict, cb.state_dict), (ca.ema_state_dict, cb.ema_state_dict)):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])]
    sa, sb = load_train_state(a)["optimizer"]["state"], load_train_state(b)["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end up equal to."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = train(run_dir)
    assert done.returncode == 0, done.stderr
    return run_dir / "last.safetensors"


# -- 1. crash safety ---------------------------------------------------------------------------------------------

def test_sigkill_mid_epoch_and_mid_save_then_resume_equals_uninterrupted_run(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    # Killed mid-epoch 2 (step 3 of 8): the epoch-1 checkpoint (step 2) is what a resume continues from.
    assert train_until_killed(tmp_path, run_dir, "step:3") == "step 3"
    assert load_checkpoint(run_dir / "last.safetensors").step == 2
    # Resumed from step 2, killed while writing the weights of the step-4 save (its training state is already
    # on disk): the step-2 checkpoint still loads, and a resume must not pair step-2 weights with step-4 state.
    where = train_until_killed(tmp_path, run_dir, "write:2", "--resume")
    assert where == f"writing {run_dir / 'last.safetensors'}"
    assert load_checkpoint(run_dir / "last.safetensors").step == 2
    # Resumed again, killed while writing the training state of the step-6 save (the second save).
    where = train_until_killed(tmp_path, run_dir, "write:3", "--resume")
    assert where == f"writing {run_dir / 'last.state.pt'}"
    assert load_checkpoint(run_dir / "last.safetensors").step == 4
    done = train(run_dir, "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_run(run_dir / "last.safetensors", reference_run)

    assert not list(run_dir.glob(".*.tmp"))  # temporaries the kills left behind were cleaned up


@pytest.mark.slow
def test_sigkill_at_random_moments_until_done_equals_uninterrupted_run(tmp_path):
    """No pauses: a longer run (6 epochs of 5 steps) killed at random moments once training has started,
    resumed each time, until it finishes; the final checkpoint equals an uninterrupted run's."""
    import random

    longer = ("--num_samples", "80", "--epoch_size", "6")
    reference = train(tmp_path / "reference", *longer)
    assert reference.returncode == 0, reference.stderr
    run_dir, rng, kills = tmp_path / "run", random.Random(0), 0
    for attempt in range(40):  # noqa: B007 (reported after the loop)
        # killed before its first checkpoint, the folder still holds the attempt's config.yaml: start it over
        extra = (*longer, "--resume") if (run_dir / "last.safetensors").exists() else (*longer, "--overwrite")
        proc = subprocess.Popen([sys.executable, "-m", "vitkit.cli", "train", *train_args(run_dir, *extra)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not (run_dir / "run_info.json").exists():
            time.sleep(0.02)  # run_info.json is written once data and model are built
        (run_dir / "run_info.json").unlink(missing_ok=True)
        try:
            proc.wait(timeout=rng.uniform(0.05, 1.5))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        err = proc.stderr.read()
        proc.stderr.close()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err
    assert proc.returncode == 0 and kills >= 3, (attempt, kills)
    assert_same_run(run_dir / "last.safetensors", tmp_path / "reference" / "last.safetensors")


# -- 2. full disk ------------------------------------------------------------------------------------------------

@pytest.fixture
def in_process(monkeypatch):
    """In-process runs: one thread (bit-identical to the subprocess reference), deterministic mode put back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def cli(*argv: str, capsys) -> tuple[int, list[str]]:
    """`vitkit ...` in this process: (exit code, stderr lines)."""
    from vitkit.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err.splitlines()


def fill_disk_for(monkeypatch, name: str, how: str) -> None:
    """The next atomic write of `name` hits a full disk. `write`: its temporary file is /dev/full, so the real
    writer (torch.save) gets ENOSPC from the kernel; `fsync`: the data is written, and fsync reports ENOSPC,
    as file systems with delayed allocation (ext4, XFS, NFS) do. (safetensors replaces a /dev/full link with a
    file, so the weights take the fsync path; its own ENOSPC message is checked in test_errno_of_...)"""
    import tempfile

    import vitkit.io as C

    if how == "write":
        real = tempfile.mkstemp

        def mkstemp(suffix=None, prefix=None, dir=None, text=False):
            fd, tmp = real(suffix=suffix, prefix=prefix, dir=dir, text=text)
            if prefix == f".{name}.":
                os.unlink(tmp)
                os.symlink("/dev/full", tmp)  # fd stays on the unlinked file: chmod never touches /dev/full
            return fd, tmp
        monkeypatch.setattr(C.tempfile, "mkstemp", mkstemp)
    else:
        real_fsync = os.fsync

        def fsync(fd):
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)
        monkeypatch.setattr(C.os, "fsync", fsync)


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
@pytest.mark.parametrize("name, how", [("last.state.pt", "write"), ("last.safetensors", "fsync")])
def test_full_disk_during_a_save_keeps_the_last_good_checkpoint(reference_run, tmp_path, monkeypatch, capsys,
                                                               in_process, name, how):
    """Disk full while writing the training state (first) or the weights (after the state was replaced): a
    one-line error naming the file; the step-4 checkpoint still loads; after freeing space, --resume goes on
    and ends bit-identical to the uninterrupted run."""
    run_dir = tmp_path / "run"
    assert cli("train", *train_args(run_dir, "--max_steps", "4"), capsys=capsys)[0] == 0
    fill_disk_for(monkeypatch, name, how)
    rc, err = cli("train", *train_args(run_dir, "--resume"), capsys=capsys)
    assert rc == 2 and err[-1].startswith(f"error: the disk is full: could not write {run_dir / name} ("), err
    assert [line for line in err if line.startswith("error")] == err[-1:]
    assert load_checkpoint(run_dir / "last.safetensors").step == 4
    load_checkpoint(run_dir / "last.safetensors").build_model()
    # The weights failed after the state was replaced: `last` is a torn pair, `prev` the complete step-4 one.
    assert is_complete_pair(run_dir / "last.safetensors") == (name == "last.state.pt")
    assert is_complete_pair(run_dir / "prev.safetensors")
    assert not list(run_dir.glob(".*.tmp"))
    monkeypatch.undo()
    torch.set_num_threads(1)
    assert cli("train", *train_args(run_dir, "--resume"), capsys=capsys)[0] == 0
    assert_same_run(run_dir / "last.safetensors", reference_run)


def test_errno_of_a_failed_write_behind_library_errors():
    """The exceptions torch.save (through a Python file) and safetensors 0.8 raised on a full 2 MiB tmpfs."""
    from safetensors import SafetensorError

    from vitkit.io import _write_errno

    assert _write_errno(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")) \
        == errno.ENOSPC
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as e:
        assert _write_errno(e) == errno.ENOSPC
    assert _write_errno(RuntimeError("a bug")) is None  # re-raised as is, not dressed up as a user error


@needs_dev_full
@pytest.mark.parametrize("entry", ["vitkit train", "python train.py"])
def test_full_disk_on_a_log_write_is_a_one_line_error(tmp_path, monkeypatch, capsys, in_process, entry):
    """The disk filled by another process: the first write to fail is a small one (metrics.jsonl)."""
    from vitkit.cli import main as vitkit_main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    args = train_args(run_dir, "--max_steps", "2")
    if entry == "vitkit train":
        rc, err = cli("train", *args, capsys=capsys)
    else:
        monkeypatch.setattr(sys, "argv", ["train.py", *args])
        rc, err = vitkit_main(["train", *sys.argv[1:]]), capsys.readouterr().err.splitlines()  # train.py's line
    assert rc == 2 and err[-1] == "error: the disk is full (a write failed); free space, then resume (--resume)", err


# -- 3. bad input: exit code 2 and one line that names the problem -------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Folders, checkpoints and recipes that are wrong in one way each."""
    import shutil

    from safetensors.torch import save_file

    from vitkit.data.preprocess import DataConfig
    from vitkit.engine.checkpoint import save_checkpoint
    from vitkit.models import create_model

    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "no_images" / "train" / "a").mkdir(parents=True)
    (root / "no_images" / "train" / "b").mkdir()
    shutil.copy(next((SAMPLE / "train" / "cat").iterdir()), root / "no_images" / "train" / "a" / "0.jpg")
    other = create_model("vit_ti_4_32", num_classes=10)  # another model: 192 wide, 3 heads
    save_checkpoint(root / "ti.safetensors", other, model_name="vit_ti_4_32", data_config=DataConfig(32),
                    train_state={"step": 0})
    torch.save(other.state_dict(), root / "ti.pth")
    mine = create_model("vit_n_4_32", num_classes=10)
    save_checkpoint(root / "n.safetensors", mine, model_name="vit_n_4_32", data_config=DataConfig(32))
    for src, dst in (("n.safetensors", "cut.safetensors"), ("ti.pth", "cut.pth")):
        data = (root / src).read_bytes()
        (root / dst).write_bytes(data[: len(data) // 2])
    save_file(mine.state_dict(), str(root / "raw.safetensors"))
    (root / "typo.yaml").write_text("model: vit_n_4_32\nlrr: 0.1\n")
    (root / "fast.yaml").write_text("lr: fast\n")
    return root


D = ("--data_dir", str(SAMPLE))
BAD = {  # case: (arguments after the tiny base run, what the error line must say)
    "missing data_dir": (("--data_dir", "{bad}/nope"), r"data_dir '.*nope' does not exist"),
    "empty data_dir": (("--data_dir", "{bad}/empty"), r"data_dir '.*empty' is empty"),
    "split folder missing": (D + ("--train_split", "training"), r"split folder .*training' does not exist "
                                                                 r"\(found: test, train\)"),
    "class without images": (("--data_dir", "{bad}/no_images"), r"class folder\(s\) with no images: b"),
    "num_classes disagrees": (D + ("--num_classes", "5"), r"num_classes is 5 but .* has 10 classes"),
    "ckpt_path of another model": (D + ("--ckpt_path", "{bad}/ti.safetensors"),
                                   r"ti.safetensors holds another architecture than vit_n_4_32 \(num_heads 3"),
    "pretrained of another model": (D + ("--pretrained", "{bad}/ti.pth"), r"pos_embed: weights have shape "
                                                                          r"\(1, 65, 192\), vit_n_4_32 expects"),
    "resume of another model": (D + ("--resume", "{bad}/ti.safetensors"), r"holds vit_ti_4_32 .* builds vit_n_4_32"),
    "resume of a weights-only file": (D + ("--resume", "{bad}/raw.safetensors"), r"not a vitkit checkpoint"),
    "truncated safetensors": (D + ("--ckpt_path", "{bad}/cut.safetensors"), r"cut.safetensors is not a readable "
                                                                            r"safetensors file"),
    "truncated resume": (D + ("--resume", "{bad}/cut.safetensors"), r"cut.safetensors is not a readable"),
    "truncated .pth": (D + ("--pretrained", "{bad}/cut.pth"), r"cut.pth is a damaged zip archive"),
    "unknown key": (D + ("--lrr", "0.1"), r"unknown config key 'lrr' \(command line\); did you mean 'lr'\?"),
    "unknown key in YAML": (D + ("-c", "{bad}/typo.yaml"), r"unknown config key 'lrr' \(yaml:.*typo.yaml\); "
                                                           r"did you mean 'lr'\?"),
    "wrong type in YAML": (D + ("-c", "{bad}/fast.yaml"), r"config key 'lr' \(yaml:.*\): expected a number, "
                                                          r"got 'fast'"),
    "wrong type": (D + ("--lr", "fast"), r"config key 'lr' \(command line\): expected a number, got 'fast'"),
    "infinite lr": (D + ("--lr", "1e400"), r"config key 'lr' \(command line\): expected a number"),
    "negative lr": (D + ("--lr", "-0.1"), r"config key 'lr': must be > 0 \(got -0.1\)"),
    "batch_size 0": (D + ("--batch_size", "0"), r"config key 'batch_size': must be >= 1 \(got 0\)"),
    "warmup longer than training": (D + ("--warmup_epochs", "5"), r"config key 'warmup_epochs': must be between "
                                                                  r"0 and epoch_size \(1\)"),
    "zero std": (D + ("--std", "0", "0.5", "0.5"), r"config key 'std': must be > 0"),
    "CUDA on a CPU machine": (D + ("--device", "cuda"), r"'cuda' but CUDA is not available; use --device cpu"),
    "GPU N on a CPU machine": (D + ("--device", "cuda:1"), r"'cuda:1' but CUDA is not available"),
    "fp16 weights": (D + ("--amp_level", "O3", "--amp_dtype", "float16"), r"O3 \(half-precision weights\) needs "
                                                                         r"bfloat16"),
}
BASE = ("--model", "vit_n_4_32", "--dataset", "imagefolder", "--image_resize", "32", "--batch_size", "8",
        "--num_samples", "20", "--num_parallel_workers", "0", "--epoch_size", "1", "--warmup_epochs", "0",
        "--no-val_while_train", "--max_steps", "1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU cases expect a machine without CUDA")
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_error_with_exit_code_2(case, bad_inputs, tmp_path, capsys, in_process):
    import re

    extra, expected = BAD[case]
    argv = [a.replace("{bad}", str(bad_inputs)) for a in (*BASE, "--ckpt_save_dir", str(tmp_path), *extra)]
    rc, err = cli("train", *argv, capsys=capsys)
    assert rc == 2, err
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors == err[-1:] and "Traceback" not in "\n".join(err), err
    assert re.search(expected, errors[0]), errors[0]


@pytest.mark.parametrize("in_memory", ["false", "true"])
def test_grayscale_cmyk_16bit_and_zero_byte_files(tmp_path, in_memory):
    """Real files through the training loader: 16-bit PNG, CMYK and grayscale JPEGs decode to the right RGB
    values (a flat image stays flat through crop and resize); a zero-byte file is counted and replaced."""
    import numpy as np
    from PIL import Image

    from vitkit.data import DataConfig
    from vitkit.engine.config import load_config
    from vitkit.engine.data_args import dataset_from_config, loader_from_config

    size = 48 if in_memory == "true" else 80  # <= 64 px: decoded into memory; larger: decoded per sample
    root = tmp_path / "train"
    expected = {"cmyk": 255, "deep": 200, "gray": 90}  # 8-bit value of every pixel
    for cls in expected:
        (root / cls).mkdir(parents=True)
    for i in range(2):
        Image.new("CMYK", (size, size), (0, 0, 0, 0)).save(root / "cmyk" / f"{i}.jpg", quality=95)
        Image.fromarray(np.full((size, size), 200 * 257, np.uint16)).save(root / "deep" / f"{i}.png")
        Image.new("L", (size, size), 90).save(root / "gray" / f"{i}.jpg", quality=95)
    assert Image.open(root / "deep" / "0.png").mode.startswith("I")  # really 16-bit on disk
    (root / "gray" / "empty.jpg").write_bytes(b"")
    cfg = load_config(["--data_dir", str(tmp_path), "--num_parallel_workers", "0", "--batch_size", "7",
                       "--image_resize", "32", "--in_memory", in_memory, "--no-drop_remainder",
                       "--bad_image_limit", "1"], notices=[])
    ds = dataset_from_config(cfg, "train", train=True)
    loader = loader_from_config(cfg, ds, train=True, data_config=DataConfig(32, mean=(0, 0, 0), std=(1, 1, 1)))
    loader.set_epoch(0)
    batches = list(loader)
    assert loader.stats()["bad_paths"] == [str(root / "gray" / "empty.jpg")]
    images, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(targets) == 7
    for image, target in zip(images, targets):
        center = image[:, 8:24, 8:24]  # the in-memory path pads 1/8 of the side (CIFAR pad-and-crop)
        want = expected[ds.classes[int(target)]] / 255
        torch.testing.assert_close(center, torch.full_like(center, want), atol=2 / 255, rtol=0)


# -- 4. property-based fuzz of the config parser -------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vitkit.engine.config import FIELDS, from_dict, load_config  # noqa: E402
from vitkit.errors import VitkitError  # noqa: E402

NAMES = st.sampled_from(sorted(FIELDS))
KEYS = st.one_of(NAMES, NAMES, NAMES, st.text(min_size=1, max_size=12))  # mostly real keys: deeper paths
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=16), st.sampled_from(
    ["1e-5", "1e400", "1" + "0" * 400, ".inf", "-.nan", "[0.1, 0.2]", "{a: 1}", "~", "cuda:0", "O2", "true", "0x10",
     "1_000", "!!python/object:os.system", "&a [*a]"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def _typed(tp) -> st.SearchStrategy:
    """Values of a config field's own type (numbers anywhere in their range, non-finite ones too), so that
    many examples get past type checks into validation and the round trip."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_typed(a) for a in args])
    if origin in (tuple, list):
        inner = [_typed(a) for a in args]
        return st.tuples(*inner).map(list) if origin is tuple else st.lists(inner[0], max_size=3)
    return {bool: st.booleans(), int: st.integers(-2, 300) | st.integers(), float: st.floats(-10, 1000) | st.floats(),
            str: st.text(max_size=8), type(None): st.none()}.get(tp, SCALARS)


def _field_values() -> st.SearchStrategy:
    import typing

    from vitkit.engine.config import Config

    hints = typing.get_type_hints(Config)
    return st.sampled_from(sorted(FIELDS)).flatmap(lambda k: st.tuples(st.just(k), _typed(hints[k])))


TYPED = st.lists(_field_values(), max_size=4).map(dict)
FUZZ = settings(max_examples=int(os.environ.get("VITKIT_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=12), KEYS.map(lambda k: "--" + k), st.sampled_from(
    ["-c", "--", "--=", "--lr=", "--no-ema", "--scale", "-1", "1e-3", "nan", "1e400", "1" + "0" * 400, "[1, 2", "{",
     "--config=", "!!python/name:os.system"])),
    max_size=8))
def test_command_line_fuzz_raises_only_config_errors(argv):
    try:
        load_config(argv, notices=[])
    except VitkitError as e:
        assert "\n" not in str(e)  # the CLI prints it as one line


def _numbers(value):
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return [value] if isinstance(value, float) else []


@FUZZ
@given(st.one_of(TYPED, st.dictionaries(KEYS, VALUES, max_size=4)))
def test_yaml_and_dict_fuzz_raises_only_config_errors(tmp_path, values):
    """Any mapping: a ConfigError, or a validated config whose numbers are finite and whose saved form (the
    run directory's config.yaml) loads back to the same config."""
    import math

    import yaml

    try:
        from_dict(values)
    except VitkitError as e:
        assert "\n" not in str(e)
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        cfg = load_config(["-c", str(path)], notices=[])
    except VitkitError as e:
        assert "\n" not in str(e)
        return
    assert all(math.isfinite(x) for v in cfg.to_dict().values() for x in _numbers(v)), cfg
    path.write_text(cfg.to_yaml())
    assert load_config(["-c", str(path)], notices=[]) == cfg
    assert from_dict(cfg.to_dict()) == cfg


@FUZZ
@given(st.text(max_size=120))
def test_any_yaml_text_raises_only_config_errors(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(["-c", str(path)], notices=[])
    except VitkitError as e:
        assert "\n" not in str(e)


# -- 5. reproducibility ----------------------------------------------------------------------------------------------

def test_seeded_deterministic_runs_are_bit_identical_and_recorded(reference_run, tmp_path):
    """`--seed 7 --deterministic` again: bit-identical weights, EMA and optimizer; another seed differs. The
    run directory says how the run was made: git revision, versions, device, command, resolved config."""
    import json

    import yaml

    import vitkit

    again = train(tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert_same_run(tmp_path / "again" / "last.safetensors", reference_run)
    other = train(tmp_path / "other", "--seed", "8")
    assert other.returncode == 0, other.stderr
    w_other = load_checkpoint(tmp_path / "other" / "last.safetensors").state_dict
    w_ref = load_checkpoint(reference_run).state_dict
    assert not all(torch.equal(w_other[k], w_ref[k]) for k in w_ref)

    info = json.loads((tmp_path / "again" / "run_info.json").read_text())
    assert info["device"] == "cpu" and info["torch"] == torch.__version__ and info["vitkit"] == vitkit.__version__
    assert "--deterministic" in info["command"] and info["python"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: the revision (with -dirty when the tree has changes)
        assert info["git_revision"] and head.stdout.startswith(info["git_revision"].removesuffix("-dirty"))
    text = (tmp_path / "again" / "config.yaml").read_text()
    assert "seed: 7  # command line" in text and "deterministic: true  # command line" in text
    assert "opt: adamw  # default" in text
    saved = yaml.safe_load(text)
    assert saved == load_checkpoint(tmp_path / "again" / "last.safetensors").config  # the resolved config


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    """Both files of a checkpoint are readable by the group/others the umask allows (not mkstemp's 0600)."""
    import stat

    from vitkit.data.preprocess import DataConfig
    from vitkit.engine.checkpoint import save_checkpoint
    from vitkit.io import _UMASK, atomic_write
    from vitkit.models import create_model

    model = create_model("vit_n_4_32", depth=1)
    path = save_checkpoint(tmp_path / "m.safetensors", model, model_name="vit_n_4_32",
                           data_config=DataConfig(input_size=32))
    atomic_write(tmp_path / "m.state.pt", lambda tmp: torch.save({"step": 1}, tmp))
    for p in (path, tmp_path / "m.state.pt"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_UMASK, p
    assert not list(tmp_path.glob(".*.tmp"))
