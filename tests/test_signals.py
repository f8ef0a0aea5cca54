"""Stop signals (issue 17): SIGTERM (schedulers, `docker stop`) and SIGINT (Ctrl+C) during `vitkit train` save a
resumable checkpoint at the next optimizer-step boundary and exit with 128 + the signal (143, 130), saying where
it saved and how to resume; a second signal exits at once, without a new save. Resuming from the signal's
checkpoint ends bit-identical to the uninterrupted run.

The runs are test_reliability's (vit_n_4_32 on 40 images of the bundled CIFAR-10 sample: 4 epochs of 2 steps), as
real `vitkit train` processes. A small driver pauses the process at an exact point (after optimizer step N, or
inside the N-th checkpoint file write) until the test's signal has arrived, so the signal lands there without
timing luck.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from test_reliability import ENV, assert_same_run, train, train_args

from vitkit.engine.checkpoint import is_complete_pair, load_checkpoint

# `vitkit train` in-process after wrapping one library function, so that the process waits at an exact point for
# the test's signal: `step:N` after optimizer step N (on rank PAUSE_RANK only, when set), `write:N` inside the
# N-th checkpoint file write of this process (its data written, not yet renamed into place). Once the signal
# arrived (the trainer's flag is set) it writes `signalled` and goes on; `hold:N` pauses at step N as `step` does
# and then stays there, so that only a second signal can end it.
DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import vitkit.engine.checkpoint as C
    from vitkit.engine.loop import Trainer
    from vitkit.cli import main

    point, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    kind, n = point.split(":")
    n = int(n)
    trainer = []

    def wait_for_signal(what, hold=False):
        marker.write_text(what)
        deadline = time.monotonic() + 120
        while trainer[0].received_signal is None and time.monotonic() < deadline:
            time.sleep(0.01)
        marker.write_text("signalled")
        while hold and time.monotonic() < deadline:
            time.sleep(0.01)  # the second signal raises out of this sleep

    real_fit = Trainer.fit
    def fit(self):
        trainer.append(self)
        return real_fit(self)
    Trainer.fit = fit

    if kind in ("step", "hold"):
        real_step = Trainer.train_step
        def train_step(self, batches):
            out = real_step(self, batches)
            if self.step == n and self.rank == int(os.environ.get("PAUSE_RANK", self.rank)):
                wait_for_signal(f"step {self.step}", hold=kind == "hold")
            return out
        Trainer.train_step = train_step
    elif kind == "write":
        real_write, calls = C.atomic_write, [0]
        def atomic_write(path, write):
            calls[0] += 1
            if calls[0] != n:
                return real_write(path, write)
            def write_then_wait(tmp):
                write(tmp)
                wait_for_signal(f"writing {path}")
            return real_write(path, write_then_wait)
        C.atomic_write = atomic_write
    sys.exit(main(["train", *argv]))
""")


def start(tmp: Path, point: str, argv: list[str], env: dict[str, str] | None = None,
          marker: Path | None = None) -> tuple[subprocess.Popen, Path]:
    driver, marker = tmp / "driver.py", marker or tmp / "reached"
    driver.write_text(DRIVER)
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(driver), point, str(marker), *argv], env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker


def wait_for(marker: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text() == text):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"training ended (rc {proc.returncode}) before '{text}': {out[-2000:]}{err[-2000:]}")
        assert time.monotonic() < deadline, f"training did not reach '{text}'"
        time.sleep(0.02)


def train_until_signalled(tmp: Path, run_dir: Path, point: str, sig: int, *extra: str) -> tuple[int, str]:
    """Start a training process, send it `sig` once it reaches `point`; returns (exit code, stderr)."""
    proc, marker = start(tmp, point, train_args(run_dir, *extra))
    kind, n = point.split(":")
    wait_for(marker, f"step {n}" if kind == "step" else f"writing {run_dir / 'last.state.pt'}", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run (test_reliability's): 8 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = train(run_dir)
    assert done.returncode == 0, done.stderr
    return run_dir / "last.safetensors"


def test_sigterm_mid_epoch_and_sigint_during_a_save_then_resume_equals_uninterrupted_run(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "last.safetensors"
    # SIGTERM after step 3, mid-epoch 2: a checkpoint at step 3 (the epoch-1 one is at step 2), exit 143.
    rc, out = train_until_signalled(tmp_path, run_dir, "step:3", signal.SIGTERM)
    assert rc == 143, out
    assert f"stopped at step 3 (SIGTERM); saved {last}; resume with --resume {last}" in out.splitlines(), out
    assert "SIGTERM: stopping at the end of this step with a checkpoint" in out
    assert "Traceback" not in out and "error" not in out
    assert load_checkpoint(last).step == 3 and is_complete_pair(last)
    # Resumed; SIGINT while the step-4 save (epoch 2's end) writes its training state: the save completes (epoch
    # file included), then the run stops there, with Ctrl+C's 130.
    rc, out = train_until_signalled(tmp_path, run_dir, "write:1", signal.SIGINT, "--resume")
    assert rc == 130, out
    assert f"stopped at step 4 (SIGINT); saved {last}; resume with --resume {last}" in out.splitlines(), out
    assert load_checkpoint(last).step == 4 and is_complete_pair(last)
    assert load_checkpoint(run_dir / "vit_n_4_32-e0002.safetensors").step == 4
    assert not list(run_dir.glob(".*.tmp"))
    done = train(run_dir, "--resume")
    assert done.returncode == 0, done.stderr
    assert_same_run(last, reference_run)
    assert [p.name for p in sorted(run_dir.glob("*-e*.safetensors"))] == [f"vit_n_4_32-e000{e}.safetensors"
                                                                        for e in (1, 2, 3, 4)]


def test_a_second_signal_exits_at_once_without_saving(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "last.safetensors"
    proc, marker = start(tmp_path, "hold:3", train_args(run_dir))
    wait_for(marker, "step 3", proc)
    before = last.read_bytes()  # the epoch-1 checkpoint, step 2
    proc.send_signal(signal.SIGTERM)
    wait_for(marker, "signalled", proc)  # the first one is in: the run would save after this step
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 143, out + err
    assert err.splitlines()[-1] == (f"SIGTERM again: stopped at step 3 without saving; the last checkpoint {last} "
                                    f"is intact; resume with --resume {last}"), err
    assert "Traceback" not in err and took < 30
    assert last.read_bytes() == before and load_checkpoint(last).step == 2 and is_complete_pair(last)
    assert not list(run_dir.glob(".*.tmp"))


def test_handlers_only_around_fit_in_the_main_thread(tmp_path, capsys):
    """In-process: during fit the trainer's handlers are in place, after it the previous ones are back; fit in
    another thread (where Python cannot set handlers) trains without them. A SIGTERM this process sends itself
    after step 1 stops the run there, with 143."""
    from vitkit.cli import main
    from vitkit.engine.loop import Trainer

    seen: dict[str, object] = {}
    real_step = Trainer.train_step

    def train_step(self, batches):
        out = real_step(self, batches)
        seen.setdefault(threading.current_thread().name, signal.getsignal(signal.SIGTERM))
        if self.step == 1 and threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer.train_step = train_step
        assert main(["train", *train_args(tmp_path / "main", "--max_steps", "3")]) == 143
        assert getattr(seen["MainThread"], "__func__", None) is Trainer._on_signal
        assert {s: signal.getsignal(s) for s in before} == before
        assert load_checkpoint(tmp_path / "main" / "last.safetensors").step == 1
        rc: list[int] = []
        worker = threading.Thread(target=lambda: rc.append(main(["train", *train_args(tmp_path / "thread",
                                                                                        "--max_steps", "1")])),
                                  name="worker")
        worker.start()
        worker.join()
        assert rc == [0] and seen["worker"] == before[signal.SIGTERM]
    finally:
        Trainer.train_step = real_step
        torch.set_num_threads(threads)
    assert "stopped at step 1 (SIGTERM)" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_two_processes_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """Two processes (vitkit's torchrun path, set up by hand; gloo): SIGTERM to rank 1 alone after step 3. Rank 0,
    which got no signal, learns it at the same boundary (the per-step all-reduce): both save together (rank 0
    writes) and exit with 143."""
    run_dir = tmp_path / "run"
    argv = train_args(run_dir, "--batch_size", "8")  # 40 images over 2 ranks: 2 steps of 2 x 8 per epoch
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PAUSE_RANK": "1"}
        (tmp_path / str(rank)).mkdir()
        procs.append(start(tmp_path / str(rank), "step:3", argv, env=env))
    (p0, _), (p1, marker) = procs
    wait_for(marker, "step 3", p1)
    p1.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p, _ in procs]
    assert [p.returncode for p, _ in procs] == [143, 143], outs
    last = run_dir / "last.safetensors"
    assert f"stopped at step 3 (SIGTERM); saved {last}; resume with --resume {last}" in outs[0][1].splitlines()
    assert "stopped" not in outs[1][1]  # rank 0 speaks for the run
    assert load_checkpoint(last).step == 3 and is_complete_pair(last)
