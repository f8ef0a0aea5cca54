"""A training state that loads must also resume and train (issue 17, past the load boundary).

`load_train_state` checks a state's keys and types; `Trainer.restore` then applies it. These tests damage the
run's own last state, anywhere inside it (a nested value replaced by junk or a tensor of another shape, a key
removed, bytes cut or overwritten), and check that restoring it and taking one optimizer step either works, or
stops at the restore with one line naming the state file, never a traceback from the step after it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vitkit.engine.checkpoint import check_resume_values, load_train_state, state_path
from vitkit.engine.config import resolve
from vitkit.engine.loop import Diverged, Trainer
from vitkit.errors import VitkitError

FUZZ_N = int(os.environ.get("VITKIT_FUZZ_EXAMPLES", "60"))  # benchmarks/fuzz_boundaries.py raises it
FUZZ = settings(max_examples=FUZZ_N, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
TENSORS = st.builds(lambda shape, fill: torch.full(shape, fill),
                    st.lists(st.integers(0, 4), max_size=3).map(tuple),
                    st.sampled_from([0.0, -1.0, 3.0, float("nan"), float("inf")]))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A smoke run of the demo recipe stopped after 2 steps, a trainer resumed from it, and one batch to step on."""
    run_dir = tmp_path_factory.mktemp("resume_fuzz") / "run"
    argv = ["--smoke", "--ckpt_save_dir", str(run_dir), "--device", "cpu", "--num_parallel_workers", "0",
            "--max_steps", "2", "--val_while_train", "false"]
    Trainer(resolve(argv, notices=[])).fit()
    last = run_dir / "last.safetensors"
    trainer = Trainer(resolve([*argv, "--resume", str(last)], notices=[]))
    g = torch.Generator().manual_seed(0)
    size, classes = trainer.model.cfg.img_size, trainer.model.cfg.num_classes
    batch = (torch.randn(4, 3, size, size, generator=g), torch.randint(0, classes, (4,), generator=g))
    return Run({"trainer": trainer, "last": last, "state": state_path(last).read_bytes(), "batch": batch})


class Run(dict):
    """The fixture's values; a short repr, so that a failing example does not print 25 MB of state bytes."""

    def __repr__(self) -> str:
        return f"<run {self['last']}>"


def _paths(value: Any, prefix: tuple = (), depth: int = 5) -> list[tuple]:
    """Every key path into the nested dicts and lists of a state (what a nested mutation may replace)."""
    out = [prefix] if prefix else []
    if depth and isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k), depth - 1)
    elif depth and isinstance(value, list | tuple):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i), depth - 1)
    return out


def _replace(value: Any, path: tuple, new: Any, remove: bool) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        out = dict(value)
        if remove and not rest:
            out.pop(head, None)
        else:
            out[head] = _replace(value[head], rest, new, remove)
        return out
    items = list(value)
    items[head] = _replace(items[head], rest, new, remove and bool(rest))
    return type(value)(items) if isinstance(value, tuple) else items


def _resume_and_step(run: dict[str, Any], path: Path) -> None:
    """Restore `path` into the run's trainer and take one step: works, or one line naming the file at restore."""
    trainer = run["trainer"]
    try:
        trainer.restore(path)
    except VitkitError as e:
        assert "\n" not in str(e) and (path.name in str(e) or state_path(path).name in str(e)), str(e)
        event("refused at restore, one line")
        return
    try:
        loss, _ = trainer.train_step([run["batch"]])
    except Diverged:  # non-finite numbers after the step: the trainer's nan_policy takes it from here
        event("restored, the step diverged (nan_policy's case)")
        return
    assert isinstance(loss, float)
    event("restored and stepped")


def _write(run: dict[str, Any], tmp: Path, state_bytes: bytes) -> Path:
    path = tmp / "last.safetensors"
    path.write_bytes(run["last"].read_bytes())
    state_path(path).write_bytes(state_bytes)
    return path


def test_the_runs_own_state_resumes_and_steps(run, tmp_path) -> None:
    path = _write(run, tmp_path, run["state"])
    run["trainer"].restore(path)
    assert run["trainer"].step == load_train_state(path)["step"] == 2
    loss, _ = run["trainer"].train_step([run["batch"]])
    assert 0 < loss < 10


@pytest.mark.parametrize("change, match", [
    (lambda s: {**s, "step": 1}, "'step' is 1, the checkpoint's metadata says 2"),
    (lambda s: {**s, "rollbacks": -1}, "'rollbacks' is -1"),
    (lambda s: {**s, "schedule": {}}, "lr_factor' is None"),
    (lambda s: {**s, "schedule": {"lr_factor": float("nan")}}, "lr_factor' is nan"),
    (lambda s: {**s, "epoch_meter": {"loss_sum": "x", "steps": 1}}, "epoch_meter"),
    (lambda s: {**s, "optimizer": {}}, "parameter group"),
    (lambda s: _replace(s, ("optimizer", "param_groups", 0, "betas"), "high", False), "'betas' is 'high'"),
    (lambda s: _replace(s, ("optimizer", "param_groups", 0, "params"), [0], False), "parameter indices"),
    (lambda s: _replace(s, ("optimizer", "state", 0, "exp_avg"), torch.zeros(3), False), "has shape \\(3,\\)"),
    (lambda s: _replace(s, ("optimizer", "state", 0, "exp_avg_sq"), None, False), "is None, expected a tensor"),
    (lambda s: _replace(s, ("optimizer", "state", 1, "step"), torch.tensor(-4.0), False), "step counter"),
    (lambda s: _replace(s, ("optimizer", "state", 2, "exp_avg"), None, True), "lacks \\['exp_avg'\\]"),
    (lambda s: _replace(s, ("optimizer", "state", 2, "exp_avg"), 3.0, False), "is 3.0, expected a tensor"),
    (lambda s: _replace(s, ("optimizer", "state", 2, "step"), torch.ones(2), False), "step' for parameter 2 has"),
    (lambda s: _replace(s, ("optimizer", "state", 2), {}, False), None),  # torch re-creates an empty entry
    (lambda s: {**s, "rng": {"torch": torch.zeros(3, dtype=torch.uint8)}}, "could not be resumed"),
])
def test_each_damaged_value_is_one_line_before_anything_trains(run, tmp_path, change, match) -> None:
    trainer = run["trainer"]
    buf = io.BytesIO()
    torch.save(change(torch.load(io.BytesIO(run["state"]), weights_only=True)), buf)
    path = _write(run, tmp_path, buf.getvalue())
    if match is None:  # a state torch's optimizer itself accepts (an empty entry is re-created at the step)
        trainer.restore(path)
        assert 0 < trainer.train_step([run["batch"]])[0] < 10
        return
    (tmp_path / "good").mkdir()
    trainer.restore(_write(run, tmp_path / "good", run["state"]))  # a known state to compare with
    step, moment = trainer.step, trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(VitkitError, match=match) as e:
        trainer.restore(path)
    assert "\n" not in str(e.value) and str(state_path(path)) in str(e.value)
    if "could not be resumed" not in match:  # refused by the checks, before any of the state was applied
        assert trainer.step == step and torch.equal(trainer.optimizer.state_dict()["state"][0]["exp_avg"], moment)


def test_check_resume_values_accepts_what_the_trainer_saves(run) -> None:
    trainer = run["trainer"]
    state = trainer.train_state()
    check_resume_values(run["last"], state, trainer.optimizer, step=trainer.step)


@FUZZ
@given(data=st.data())
def test_fuzzed_states_resume_and_step_or_fail_in_one_line(run, tmp_path_factory, data) -> None:
    state = torch.load(io.BytesIO(run["state"]), weights_only=True)
    kind = data.draw(st.sampled_from(["nested", "remove", "bytes"]))
    if kind == "bytes":
        raw = run["state"]
        at, junk = data.draw(st.integers(0, len(raw) - 1)), data.draw(st.binary(max_size=16))
        mutated = raw[:at] if not junk else raw[:at] + junk + raw[at + len(junk):]
    else:
        where = data.draw(st.sampled_from(_paths(state)))
        new = data.draw(JUNK | TENSORS)
        buf = io.BytesIO()
        torch.save(_replace(state, where, new, remove=kind == "remove"), buf)
        mutated = buf.getvalue()
    _resume_and_step(run, _write(run, tmp_path_factory.mktemp("fuzz"), mutated))
