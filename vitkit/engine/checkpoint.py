"""Self-describing checkpoints.

A checkpoint is one safetensors file, `<name>.safetensors`:
  - tensors: the model's state dict under its own keys, and the EMA weights (if any) under `ema.<key>`;
  - metadata (safetensors' str -> str header): `format=vitkit`, `format_version`, `model_name`, `arch` (the
    ViTConfig as JSON), `data_config` (eval preprocessing, JSON), `class_names` (JSON list), `config` (the
    resolved run config, JSON), `epoch`, `step`, `metrics` (JSON).
Training state that only `--resume` needs (optimizer, scheduler, scaler, RNG states, sampler position) sits
beside it in `<name>.state.pt`, holding only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: no checkpoint ever runs code on load.

Every write is atomic (temporary file, flush, fsync, rename, fsync of the folder): a kill at any moment
leaves the previous good file in place. The two files of a pair share a random `pair_id` (in the metadata
and in the state), so a save interrupted between the two writes (new state, old weights) is detected, never
resumed as a mixed pair (`is_complete_pair`; the saver keeps the previous pair as `prev` for that case).
"""
from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vitkit.data.preprocess import DataConfig
from vitkit.errors import VitkitError, WeightsError, path_problem
from vitkit.io import atomic_write
from vitkit.models.vit import ViTConfig, VisionTransformer
from vitkit.weights.formats import EMA_PREFIX

FORMAT_VERSION = "1"
# What `--resume` reads from a training state, with its type (checked on load, before any of it is used).
TRAIN_STATE_FIELDS: dict[str, Any] = {"step": int, "steps_per_epoch": int, "optimizer": dict, "schedule": dict,
                                      "rollbacks": int, "epoch_meter": dict, "rng": dict, "scaler": dict}


@dataclass
class Checkpoint:
    """What a checkpoint file holds, loaded."""

    path: Path
    model_name: str
    arch: ViTConfig
    data_config: DataConfig
    state_dict: dict[str, torch.Tensor]
    ema_state_dict: dict[str, torch.Tensor] | None = None
    class_names: list[str] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def build_model(self, use_ema: bool = False) -> VisionTransformer:
        """The model with these weights (EMA weights with `use_ema`), in eval mode."""
        if use_ema and self.ema_state_dict is None:
            raise WeightsError(f"{self.path} has no EMA weights; drop --use_ema or train with ema: true")
        model = VisionTransformer(self.arch)
        model.model_name = self.model_name
        model.load_state_dict(self.ema_state_dict if use_ema else self.state_dict, strict=True)
        return model.eval()


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    model_name: str,
    data_config: DataConfig,
    class_names: list[str] | None = None,
    config: dict[str, Any] | None = None,
    ema_model: torch.nn.Module | None = None,
    epoch: int = 0,
    step: int = 0,
    metrics: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write `<path>` (weights + metadata) and, with `train_state`, `<stem>.state.pt` beside it."""
    path = Path(path)
    arch: ViTConfig = model.cfg  # type: ignore[assignment]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if ema_model is not None:
        tensors.update({EMA_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in ema_model.state_dict().items()})
    pair_id = secrets.token_hex(8)  # ties <stem>.state.pt to these weights (is_complete_pair)
    meta = {
        "format": "vitkit",
        "format_version": FORMAT_VERSION,
        "pair_id": pair_id,
        "model_name": model_name,
        "arch": json.dumps(arch.to_dict()),
        "data_config": data_config.to_json(),
        "class_names": json.dumps(class_names),
        "config": json.dumps(config or {}),
        "epoch": str(epoch),
        "step": str(step),
        "metrics": json.dumps(metrics or {}),
    }
    if train_state is not None:
        train_state = {**train_state, "pair_id": pair_id}
        atomic_write(state_path(path), lambda tmp: _torch_save(train_state, tmp))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def _torch_save(obj: Any, path: str) -> None:
    """torch.save through a Python file, so a failed write keeps its OSError (torch.save(obj, path) says only
    `unexpected pos`)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def state_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".state.pt")


def read_metadata(path: str | Path) -> dict[str, str] | None:
    """The safetensors header metadata, or None when the file is not a safetensors file (or not a regular
    file: a FIFO would block the open)."""
    if path_problem(path) is not None:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None


def is_vitkit_checkpoint(path: str | Path) -> bool:
    meta = read_metadata(path)
    return bool(meta) and meta.get("format") == "vitkit"  # type: ignore[union-attr]


def _field(path: Path, meta: dict[str, str], key: str, kind: type, default: Any = None) -> Any:
    """One metadata entry, parsed (JSON, or an integer) and of type `kind`; anything else names the key."""
    if key not in meta:
        if default is not None or kind is type(None):
            return default
        raise WeightsError(f"{path}: the checkpoint's metadata has no '{key}' (a damaged or hand-edited file)")
    try:
        value = int(meta[key]) if kind is int else json.loads(meta[key])
    except (ValueError, TypeError, RecursionError):
        raise WeightsError(f"{path}: metadata '{key}' is not {'an integer' if kind is int else 'valid JSON'} "
                           f"(a damaged or hand-edited file)") from None
    if not isinstance(value, kind) and not (value is None and default is None):
        raise WeightsError(f"{path}: metadata '{key}' is a {type(value).__name__}, expected {kind.__name__}")
    return value


def _check_tensors(path: Path, arch: ViTConfig, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
    """The file's tensors against its architecture, from the header alone: nothing is allocated before the
    shapes are known to be the ones a model of `arch` has (a header claiming a 51 GB model fails here)."""
    blocks = {k.split(".")[1] for k in shapes if k.startswith("blocks.")}
    width = shapes.get("patch_embed.proj.weight", (None,))[0]
    if len(blocks) != arch.depth or width != arch.embed_dim:
        raise WeightsError(f"{path}: its tensors are a {len(blocks)}-block, {width}-wide model but its metadata "
                           f"says depth {arch.depth}, embed_dim {arch.embed_dim} (tensors of another model?)")
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: tuple(v.shape) for k, v in VisionTransformer(arch).state_dict().items()}
    for key in sorted(expected.keys() | shapes.keys()):
        if expected.get(key) != shapes.get(key):
            raise WeightsError(f"{path}: tensor {key} is {shapes.get(key, 'missing')}, a {arch.embed_dim}-wide "
                               f"model of this architecture has {expected.get(key, 'none')} (tensors of another "
                               f"model under this metadata?)")
        if not dtypes[key].startswith(("F", "BF")):
            raise WeightsError(f"{path}: tensor {key} is {dtypes[key]}, not floating point")


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise WeightsError(f"{path}: tensor {key} holds NaN or infinite values (the run diverged before this "
                               f"save?); `vitkit validate` and `vitkit predict` load it for inspection with "
                               f"--allow_nonfinite")


def load_checkpoint(path: str | Path, *, allow_nonfinite: bool = False, weights: bool = True) -> Checkpoint:
    """Read a vitkit checkpoint, checking every field before it is used: a missing, truncated, foreign or
    inconsistent file (metadata that is not JSON, tensors of another model, NaN weights) is a one-line
    WeightsError naming the file. `weights=False` checks the header the same way and reads no tensor
    (`state_dict` is empty): what the checkpoint is, for model cards and listings."""
    path = Path(path)
    if (why := path_problem(path)) is not None:
        raise WeightsError(f"checkpoint {path} {why}")
    meta = read_metadata(path)
    if meta is None:
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt?)")
    if meta.get("format") != "vitkit":
        raise WeightsError(f"{path} is not a vitkit checkpoint; load foreign weights with --pretrained {path} "
                           f"or convert them with `vitkit convert`")
    model_name = meta.get("model_name")
    if not model_name:
        raise WeightsError(f"{path}: the checkpoint's metadata has no 'model_name' (a damaged or hand-edited file)")
    try:
        arch = ViTConfig(**_field(path, meta, "arch", dict))
        data_config = DataConfig.from_dict(_field(path, meta, "data_config", dict))
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: its metadata describes no valid model ({e})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} could not be read ({e}); the file is truncated or corrupt") from None
    own = {k: v for k, v in shapes.items() if not k.startswith(EMA_PREFIX)}
    _check_tensors(path, arch, own, dtypes)
    if len(own) < len(shapes):
        _check_tensors(path, arch, {k[len(EMA_PREFIX):]: v for k, v in shapes.items() if k.startswith(EMA_PREFIX)},
                       {k[len(EMA_PREFIX):]: v for k, v in dtypes.items() if k.startswith(EMA_PREFIX)})
    try:
        tensors = load_file(str(path)) if weights else {}  # weights=False: what it is, from the header alone
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} could not be read ({e}); the file is truncated or corrupt") from None
    if not allow_nonfinite:
        _check_finite(path, tensors)
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    return Checkpoint(
        path=path, model_name=model_name, arch=arch, data_config=data_config, state_dict=state,
        ema_state_dict=ema or None, class_names=_field(path, meta, "class_names", list),
        config=_field(path, meta, "config", dict, {}), epoch=_field(path, meta, "epoch", int, 0),
        step=_field(path, meta, "step", int, 0), metrics=_field(path, meta, "metrics", dict, {}),
    )


def load_train_state(path: str | Path, required: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resume-only state beside a checkpoint, loaded without unpickling code; `required` maps the keys the
    caller reads to their types (the trainer's: TRAIN_STATE_FIELDS), checked before any is used."""
    sp = state_path(path)
    if not sp.is_file():
        raise VitkitError(f"{sp} is missing: {path} holds weights only and cannot resume a run "
                          f"(use it with --ckpt_path to start a new run from these weights)")
    try:
        state = torch.load(sp, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle: both are user-fixable
        raise VitkitError(f"{sp} could not be loaded ({type(e).__name__}); it is truncated or not a vitkit "
                          f"training state") from None
    if not _same_pair(path, state):
        raise VitkitError(f"{sp} belongs to another save than {path} (a save was interrupted between the two "
                          f"files); resume from the run's prev.safetensors or an epoch checkpoint instead")
    for key, kind in (required or {}).items():
        if not isinstance(state.get(key), kind):
            raise VitkitError(f"{sp}: '{key}' is {'missing' if key not in state else type(state[key]).__name__}, "
                              f"expected {getattr(kind, '__name__', kind)} (a damaged or foreign training state)")
    return state


def check_resume_values(path: str | Path, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                        step: int | None = None) -> None:
    """The values of a training state that `load_train_state` typed, checked against this run before any is used,
    so that a state which passes also trains: counters not negative, the lr factor in (0, 1], the epoch meter
    finite, the loss scale finite and positive, the step the checkpoint's own (`step`: its metadata's; a wrong
    one would drop metrics records on resume), and the optimizer state fitting this run's parameters (as many
    as it holds, each saved tensor of its parameter's shape and finite, `step` counters not negative, group
    hyperparameters of this run's types and finite). Raises a one-line VitkitError naming the file."""
    sp = state_path(path)

    def refuse(what: str) -> None:
        raise VitkitError(f"{sp}: {what} (a damaged or foreign training state); resume from the run's "
                          f"prev.safetensors or an epoch checkpoint instead")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("step", "rollbacks"):
        if state[key] < 0:
            refuse(f"'{key}' is {state[key]}, expected >= 0")
    if step is not None and state["step"] != step:
        refuse(f"'step' is {state['step']}, the checkpoint's metadata says {step}")
    factor = state["schedule"].get("lr_factor")
    if not number(factor) or not 0 < factor <= 1:
        refuse(f"schedule 'lr_factor' is {_short(factor)}, expected a number in (0, 1]")
    meter = state["epoch_meter"]
    if not number(meter.get("loss_sum")) or not isinstance(meter.get("steps"), int) or meter["steps"] < 0:
        refuse(f"'epoch_meter' is {_short(meter, 60)}, expected a finite loss_sum and steps >= 0")
    if state["scaler"] and not (number(state["scaler"].get("scale")) and state["scaler"]["scale"] > 0):
        refuse(f"the loss scaler's 'scale' is {_short(state['scaler'].get('scale'))}, expected a positive number")
    saved = state["optimizer"]
    groups, per_param = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, dict) or len(groups) != len(
            optimizer.param_groups) or not all(isinstance(g, dict) for g in groups):
        refuse(f"the optimizer state does not have this run's {len(optimizer.param_groups)} parameter group(s)")
    index: dict[Any, torch.Tensor] = {}
    for mine, theirs in zip(optimizer.param_groups, groups):
        ids = theirs.get("params")
        if not isinstance(ids, list) or len(ids) != len(mine["params"]) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            refuse(f"an optimizer parameter group holds {_short(ids, 40)} as parameters, this run's "
                   f"{len(mine['params'])} parameter indices")
        index.update(zip(ids, mine["params"]))
        for key, value in mine.items():
            if key in ("params", "fused", "foreach", "capturable") or key not in theirs or value is None:
                continue  # the kernel choice stays this run's (`parallel.load_optimizer_state_dict`)
            other = theirs[key]
            if number(value):
                same = number(other)
            elif isinstance(value, tuple):
                same = isinstance(other, (tuple, list)) and len(other) == len(value) and all(map(number, other))
            else:
                same = type(other) is type(value)
            if not same:
                refuse(f"the optimizer's '{key}' is {_short(other, 40)}, expected a value like {_short(value)}")
    layouts = []
    for n, (mine, theirs) in enumerate(zip(optimizer.param_groups, groups)):
        try:
            layouts.append(_state_layout(optimizer, mine, theirs))
        except ValueError as e:
            refuse(f"optimizer parameter group {n}'s saved settings do not work ({e})")
    group_of = {i: n for n, g in enumerate(groups) for i in g["params"]}
    for i, entry in per_param.items():
        param = index.get(i)
        if param is None or not isinstance(entry, dict):
            refuse(f"the optimizer state names parameter {_short(i)}, which this run's optimizer does not hold")
        layout = layouts[group_of[i]]
        if entry and layout is not None and not layout.keys() <= entry.keys():
            refuse(f"the optimizer state of parameter {i} lacks {sorted(layout.keys() - entry.keys())}")
        for key, value in entry.items():
            kind = (layout or {}).get(key)
            if not torch.is_tensor(value):
                if kind in ("param", "scalar") or not (number(value) or value is None and kind in (None, "none")):
                    refuse(f"the optimizer's {_short(key)} for parameter {i} is {_short(value, 40)}, expected "
                           f"{'a tensor' if kind in ('param', 'scalar') else 'a tensor or a number'}")
                continue
            if (value.dim() > 0 and (kind == "scalar" or tuple(value.shape) != tuple(param.shape))
                    or value.dim() == 0 and kind == "param"):
                refuse(f"the optimizer's {_short(key)} for parameter {i} has shape {tuple(value.shape)}, the parameter "
                       f"{tuple(param.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                refuse(f"the optimizer's {_short(key)} for parameter {i} holds NaN or infinite values")
            if key == "step" and value.numel() == 1 and float(value) < 0:
                refuse(f"the optimizer's step counter for parameter {i} is {float(value):g}, expected >= 0")


def _short(value: Any, limit: int = 60) -> str:
    """A value's repr on one line, cut to `limit` characters (for error messages)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _state_layout(optimizer: torch.optim.Optimizer, mine: dict[str, Any],
                  theirs: dict[str, Any]) -> dict[str, str] | None:
    """What one step of this optimizer keeps per parameter with a saved group's settings, found as torch would
    resume it: a copy of the optimizer on a 2-element parameter loads the saved group (this run's kernel choice
    kept) and steps once. Returns key -> "param" (a tensor of the parameter's shape), "scalar" (a 0-d tensor),
    "number" or "none"; None when the optimizer cannot be copied that way (then nothing is checked). Raises
    ValueError when the saved settings do not load or do not step (a key missing, a value of no use)."""
    probe = torch.zeros(2, requires_grad=True)
    try:
        copy = type(optimizer)([{**{k: v for k, v in mine.items() if k != "params"}, "params": [probe]}])
    except Exception:  # noqa: BLE001 - a custom optimizer with another constructor: not checked this way
        return None
    kernels = {k: mine[k] for k in ("fused", "foreach", "capturable") if k in mine}
    saved = {k: v for k, v in theirs.items() if k not in ("params", "param_names")}
    try:
        copy.load_state_dict({"state": {}, "param_groups": [{**saved, **kernels, "params": [0]}]})
        missing = sorted(mine.keys() - copy.param_groups[0].keys())
        if missing:
            raise KeyError(f"no {missing}")
        probe.grad = torch.ones(2)
        copy.step()
    except Exception as e:  # noqa: BLE001 - whatever torch raises on these settings, said in one line
        raise ValueError(f"{type(e).__name__}: {_short(str(e), 80)}") from None
    return {k: "param" if torch.is_tensor(v) and v.dim() > 0 else "scalar" if torch.is_tensor(v)
            else "none" if v is None else "number" for k, v in copy.state[probe].items()}


def _same_pair(path: Path, state: Any) -> bool:
    meta = read_metadata(path) or {}
    return isinstance(state, dict) and state.get("pair_id") == meta.get("pair_id")


def is_complete_pair(path: str | Path) -> bool:
    """Whether `path` and its training state were written by the same save (not torn by a kill between them)."""
    sp = state_path(path)
    if read_metadata(path) is None or not sp.is_file():
        return False
    try:  # mmap: the tensors are not read, only the small pickle that names them
        return _same_pair(Path(path), torch.load(sp, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - a truncated or foreign state file is not a complete pair
        return False
