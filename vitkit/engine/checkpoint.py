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
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vitkit.data.preprocess import DataConfig
from vitkit.errors import VitkitError, WeightsError
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
    """The safetensors header metadata, or None when the file is not a safetensors file."""
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
                               f"save?); pass --allow_nonfinite to load it anyway for inspection")


def load_checkpoint(path: str | Path, *, allow_nonfinite: bool = False, weights: bool = True) -> Checkpoint:
    """Read a vitkit checkpoint, checking every field before it is used: a missing, truncated, foreign or
    inconsistent file (metadata that is not JSON, tensors of another model, NaN weights) is a one-line
    WeightsError naming the file. `weights=False` checks the header the same way and reads no tensor
    (`state_dict` is empty): what the checkpoint is, for model cards and listings."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
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
