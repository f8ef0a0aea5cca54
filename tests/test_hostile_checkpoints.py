"""Checkpoints are checked before they are trusted (issue 17): every damaged or inconsistent file is a one-line
error naming it, found from the header before anything is allocated; NaN weights do not load silently."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import TRAIN_STATE_FIELDS, load_checkpoint, load_train_state, save_checkpoint, state_path
from vitkit.errors import VitkitError, WeightsError
from vitkit.models import create_model
from vitkit.models.vit import ViTConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    model = create_model("vit_n_4_32", depth=2)
    return save_checkpoint(tmp_path / "good.safetensors", model, model_name="vit_n_4_32",
                           data_config=DataConfig(input_size=32), ema_model=create_model("vit_n_4_32", depth=2),
                           train_state={"step": 3, "steps_per_epoch": 4, "optimizer": {}, "schedule": {},
                                        "rollbacks": 0, "epoch_meter": {}, "rng": {}, "scaler": {}})


def _parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _rewrite(src: Path, dst: Path, *, tensors=None, **meta_changes) -> Path:
    t, meta = _parts(src)
    meta.update(meta_changes)
    for key in [k for k, v in meta.items() if v is None]:
        del meta[key]
    save_file(tensors if tensors is not None else t, str(dst), metadata=meta)
    return dst


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(WeightsError, match=match) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_good_checkpoint_still_loads(good: Path) -> None:
    ckpt = load_checkpoint(good)
    assert ckpt.arch.depth == 2 and ckpt.ema_state_dict is not None
    ckpt.build_model(use_ema=True)


@pytest.mark.parametrize("key, value, match", [
    ("arch", "{not json", "metadata 'arch' is not valid JSON"),
    ("arch", "[1, 2]", "metadata 'arch' is a list, expected dict"),
    ("arch", json.dumps({"depth": 2, "no_such_field": 1}), "describes no valid model"),
    ("data_config", "nul", "metadata 'data_config' is not valid JSON"),
    ("data_config", "{}", "data_config lacks input_size, mean, std"),  # found by the fuzz (a KeyError before)
    ("data_config", json.dumps({**DataConfig(32).to_dict(), "std": [0.5, 0, 0.5]}), "std .* has a value <= 0"),
    ("data_config", json.dumps({**DataConfig(32).to_dict(), "mean": ["a", 1, 2]}), "mean .* not 3 finite"),
    ("data_config", json.dumps({**DataConfig(32).to_dict(), "interpolation": "cubic"}), "interpolation"),
    ("data_config", json.dumps({**DataConfig(32).to_dict(), "crop_pct": 0}), r"crop_pct .* \(0, 1\]"),
    ("class_names", "{}", "metadata 'class_names' is a dict"),
    ("step", "three", "metadata 'step' is not an integer"),
    ("model_name", None, "no 'model_name'"),
    ("arch", None, "no 'arch'"),
])
def test_damaged_metadata_is_one_line(good: Path, tmp_path: Path, key: str, value, match: str) -> None:
    _one_line_error(_rewrite(good, tmp_path / "bad.safetensors", **{key: value}), match)


def test_tensors_of_another_model_under_this_metadata(good: Path, tmp_path: Path) -> None:
    other = {k: v.contiguous() for k, v in create_model("vit_n_4_32", depth=1).state_dict().items()}
    _one_line_error(_rewrite(good, tmp_path / "other.safetensors", tensors=other), "1-block, 128-wide model")
    wider = {k: v.contiguous() for k, v in create_model("vit_n_4_32", depth=2, mlp_ratio=2.0).state_dict().items()}
    _one_line_error(_rewrite(good, tmp_path / "mlp.safetensors", tensors=wider), "tensor blocks.0.mlp.fc1")


def test_a_header_claiming_a_huge_model_fails_before_allocating(good: Path, tmp_path: Path) -> None:
    arch = json.loads(_parts(good)[1]["arch"])
    arch.update(embed_dim=65536, depth=64, num_heads=64)  # ~51 GB of weights, if anything were built
    bomb = _rewrite(good, tmp_path / "bomb.safetensors", arch=json.dumps(arch))
    t0 = time.perf_counter()
    _one_line_error(bomb, "2-block, 128-wide model but its metadata says depth 64, embed_dim 65536")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("change, match", [
    ({"mlp_ratio": 140737488355328.0}, "MLP width int\\(embed_dim \\* mlp_ratio\\) 18014398509481984 is beyond"),
    ({"mlp_ratio": 1e-9}, "MLP width int\\(embed_dim \\* mlp_ratio\\) must be >= 1, got 0"),
    ({"num_classes": 2**40}, "num_classes 1099511627776 is beyond any model"),
    ({"depth": 10**6}, "depth 1000000 is beyond any model"),
])
def test_arch_sizes_beyond_any_model_are_one_line(good: Path, tmp_path: Path, change: dict, match: str) -> None:
    """Found by the 2000-example fuzz run: an mlp_ratio of 2**47 overflowed torch's size arithmetic (a
    RuntimeError traceback from the shapes-only build) instead of a one-line error."""
    arch = {**json.loads(_parts(good)[1]["arch"]), **change}
    _one_line_error(_rewrite(good, tmp_path / "big.safetensors", arch=json.dumps(arch)), match)


def test_integer_weights_are_refused(good: Path, tmp_path: Path) -> None:
    tensors = _parts(good)[0]
    tensors["norm.weight"] = tensors["norm.weight"].to(torch.int32)
    _one_line_error(_rewrite(good, tmp_path / "int.safetensors", tensors=tensors), "norm.weight is I32")


def test_nan_weights_are_an_error_unless_asked_for(good: Path, tmp_path: Path) -> None:
    tensors = _parts(good)[0]
    tensors["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    nan = _rewrite(good, tmp_path / "nan.safetensors", tensors=tensors)
    _one_line_error(nan, "blocks.1.attn.qkv.weight holds NaN or infinite values.*--allow_nonfinite")
    assert torch.isnan(load_checkpoint(nan, allow_nonfinite=True).state_dict["blocks.1.attn.qkv.weight"]).any()


@pytest.mark.parametrize("drop, replace", [("optimizer", None), ("step", None), (None, ("step", "3"))])
def test_training_state_with_missing_or_wrong_keys(good: Path, drop, replace) -> None:
    sp = state_path(good)
    state = torch.load(sp, weights_only=True)
    if drop:
        del state[drop]
    if replace:
        state[replace[0]] = replace[1]
    torch.save(state, sp)
    with pytest.raises(VitkitError, match="a damaged or foreign training state") as e:
        load_train_state(good, required=TRAIN_STATE_FIELDS)
    assert "\n" not in str(e.value)


def test_a_text_file_named_safetensors_is_one_line_in_validate(tmp_path: Path) -> None:
    fake = tmp_path / "model.safetensors"
    fake.write_text("this is not a checkpoint\n")
    proc = subprocess.run([sys.executable, str(REPO / "validate.py"), "--ckpt_path", str(fake), "--data_dir",
                           str(REPO / "data/cifar10_sample"), "--dataset", "imagefolder", "--val_split", "test"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    import numpy as np

    from vitkit.weights import load_weights

    path = tmp_path / "w.npz"
    np.savez(path, **{"embedding/kernel": np.array([{"__reduce__": "os.system"}], dtype=object)})
    with pytest.raises(WeightsError, match="could not be read as weights") as e:
        load_weights(str(path), model_name="vit_n_4_32")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dims", [[-2, -3], [2**62, 2**62, 4], [3]])
def test_mindspore_ckpt_dims_that_do_not_fit_are_refused(tmp_path: Path, dims: list[int]) -> None:
    from vitkit.weights import mindspore_ckpt as ms

    value = ms._value_class()(tag="backbone.cls_token")
    value.tensor.dims.extend(dims)
    value.tensor.tensor_type = "Float32"
    value.tensor.tensor_content = b"\0" * 24  # 6 floats
    raw = value.SerializeToString()
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"\x0a" + bytes([len(raw)]) + raw)  # Checkpoint.value (field 1), one entry
    with pytest.raises(WeightsError, match="file corrupt|could not be read"):
        ms.read_mindspore_ckpt(path)


# -- fuzz: any change to a good checkpoint or its training state loads, or fails in one line naming the file ------
# VITKIT_FUZZ_EXAMPLES raises the budget (benchmarks/fuzz_boundaries.py records a long run).
FUZZ_N = int(os.environ.get("VITKIT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=FUZZ_N, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
META_KEYS = ["arch", "data_config", "class_names", "config", "epoch", "step", "metrics", "model_name", "pair_id",
             "format", "no_such_key"]
ARCH_FIELDS = [f.name for f in dataclasses.fields(ViTConfig)]


@pytest.fixture(scope="module")
def good_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good checkpoint (and its training state) to mutate."""
    return good.__wrapped__(tmp_path_factory.mktemp("fuzz_good"))


def _mutate_bytes(data: bytes, at: int, junk: bytes) -> bytes:
    at %= len(data)
    return data[:at] if not junk else data[:at] + junk + data[at + len(junk):]


def _loads_or_one_line(call, path: Path) -> None:
    """`call` returns, or raises a one-line VitkitError naming the checkpoint or its training state."""
    try:
        call()
    except VitkitError as e:
        assert "\n" not in str(e) and (path.name in str(e) or state_path(path).name in str(e)), str(e)


@FUZZ
@given(change=st.one_of(
    st.tuples(st.just("meta"), st.sampled_from(META_KEYS), st.none() | st.text(max_size=40) | JSONISH.map(json.dumps)),
    st.tuples(st.just("arch"), st.sampled_from(ARCH_FIELDS), JSONISH),
    st.tuples(st.just("bytes"), st.integers(0, 10**7), st.binary(max_size=16))))
def test_fuzzed_checkpoints_load_or_fail_in_one_line(good_files, tmp_path_factory, change) -> None:
    data, state, meta = good_files.read_bytes(), state_path(good_files).read_bytes(), _parts(good_files)[1]
    path = tmp_path_factory.mktemp("fuzz") / "fuzzed.safetensors"
    kind, key, value = change
    if kind == "bytes":
        path.write_bytes(_mutate_bytes(data, key, value))
    else:
        src = path.with_name("src.safetensors")
        src.write_bytes(data)
        if kind == "arch":
            arch = json.loads(meta["arch"])
            arch[key] = value
            value, key = json.dumps(arch), "arch"
        _rewrite(src, path, **{key: value})
    state_path(path).write_bytes(state)

    def load_and_build() -> None:
        load_checkpoint(path).build_model()

    _loads_or_one_line(load_and_build, path)


@FUZZ
@given(change=st.one_of(
    st.tuples(st.just("key"), st.sampled_from([*TRAIN_STATE_FIELDS, "pair_id"]), st.just(None) | JSONISH),
    st.tuples(st.just("bytes"), st.integers(0, 10**7), st.binary(max_size=16))))
def test_fuzzed_training_states_load_or_fail_in_one_line(good_files, tmp_path_factory, change) -> None:
    data, state = good_files.read_bytes(), state_path(good_files).read_bytes()
    path = tmp_path_factory.mktemp("fuzz") / "fuzzed.safetensors"
    path.write_bytes(data)
    kind, key, value = change
    if kind == "bytes":
        state_path(path).write_bytes(_mutate_bytes(state, key, value))
    else:
        loaded = torch.load(io.BytesIO(state), weights_only=True)
        if value is None:
            loaded.pop(key, None)
        else:
            loaded[key] = value
        torch.save(loaded, state_path(path))
    _loads_or_one_line(lambda: load_train_state(path, required=TRAIN_STATE_FIELDS), path)
