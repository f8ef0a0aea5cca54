"""The training loop: one validated Config in, a run directory of trustworthy checkpoints out.

A run's position is its optimizer step: the epoch is `step // steps_per_epoch`, the batch to read next is
`(step % steps_per_epoch) * gradient_accumulation_steps`, and the lr is `schedule(step)`. A checkpoint stores
that step with everything else that changes over a run (weights, EMA, optimizer, loss scaler, RNG states), and
the loader's order and augmentation are functions of (seed, epoch, position) (`vitkit.data.loader`), so a
resumed run, mid-epoch too, continues exactly as if it had never stopped. Data loading runs inside
`torch.random.fork_rng`, so the model's random stream (dropout, drop path) never depends on how the data was
read.

A signal stops a run where it can be continued exactly. SIGTERM (schedulers, `docker stop`) and SIGINT (Ctrl+C)
set a flag; at the next optimizer-step boundary (after the validation or save in progress, if any) the run
saves `last` with its training state, as a max_steps stop does, and `fit` raises `Stopped` (exit code 128 +
the signal: 143, 130) with one line saying where it saved and how to resume. A second signal stops at once,
without saving (`Stopped` from the handler; checkpoint writes are atomic, so the previous save stays whole).
Under torchrun every rank takes the same decision at the same step (a one-integer all-reduce per step, only
when a process group is up). A save never writes non-finite weights: NaN/inf in the model or EMA at a save
is a divergence (`nan_policy`), so a rollback always finds a finite checkpoint.

A run folder holds one run. A new run refuses a folder that holds another (`--resume` continues it,
`--overwrite` replaces it), builds data and model before it writes anything, and a start that fails once it
did write removes what it wrote (a folder that was missing or empty is left as it was).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from vitkit.data.datasets import stratified_subset
from vitkit.engine import launch, parallel, runtime
from vitkit.engine.card import write_card
from vitkit.engine.checkpoint import (
    TRAIN_STATE_FIELDS,
    check_resume_values,
    is_complete_pair,
    load_checkpoint,
    load_train_state,
    read_metadata,
    save_checkpoint,
    state_path,
)
from vitkit.engine.config import Config, optimizer_args, precision_args, schedule_args
from vitkit.engine.data_args import data_config_from_config, dataset_from_config, loader_from_config, mixup_from_config
from vitkit.engine.ema import ModelEMA
from vitkit.engine.evaluate import evaluate
from vitkit.engine.loss import classification_loss
from vitkit.engine.monitor import Monitor, format_duration, plot_confusion, run_info
from vitkit.engine.optim import create_optimizer
from vitkit.engine.precision import resolve_precision
from vitkit.engine.saver import (
    BEST,
    CONFIG,
    CONFUSION,
    LAST,
    PREV,
    RUN_INFO,
    CheckpointSaver,
    clear_run,
    next_free_run_dir,
    used_by_run,
)
from vitkit.engine.schedule import build_schedule, set_lr
from vitkit.errors import ConfigError, DataError, VitkitError, WeightsError, path_problem
from vitkit.models import get_spec, resolve_model_name
from vitkit.models.vit import count_params
from vitkit.weights import create_model, load_weights

MAX_ROLLBACKS = 3  # nan_policy rollback: give up after this many reloads
ROLLBACK_LR_FACTOR = 0.5
MAX_SKIPPED_STEPS = 25  # fp16: consecutive overflowed (skipped) steps that mean divergence, not a bad scale


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what schedulers, `docker stop` and Ctrl+C send


class Diverged(Exception):
    """Training left the finite numbers; `nan_policy` decides (`Trainer._on_divergence`)."""


class NonFiniteLoss(Diverged):
    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"non-finite loss {loss} / gradient norm {grad_norm} at step {step}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


class NonFiniteWeights(Diverged):
    """Found before a save: such weights are never written (a rollback could only reload them)."""

    def __init__(self, step: int, key: str | None):
        where = f"{key} holds NaN or inf" if key else "NaN or inf on another process"
        super().__init__(f"non-finite weights after step {step} ({where}; not saved)")
        self.step, self.key = step, key


class Stopped(KeyboardInterrupt):
    """A signal stopped `fit`: at a step boundary after saving (`saved`), or at once on a second signal (`saved`
    None). A KeyboardInterrupt, so that `except Exception` does not swallow it; `exit_code` is 128 + signal."""

    def __init__(self, signum: int, message: str, saved: Path | None = None):
        super().__init__(message)
        self.signum, self.message, self.saved = signum, message, saved
        self.exit_code = 128 + signum


# Up to this many classes the validation counts a confusion matrix (confusion.png, the model card).
CONFUSION_MAX_CLASSES = 100


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def resolve_resume_path(cfg: Config) -> Path | None:
    """The checkpoint to continue from: `--resume PATH`, `--resume true` (last in ckpt_save_dir), or
    `--ckpt_path P --resume_opt`. None for a fresh run. `last` torn by a kill or a full disk between its
    two files falls back to `prev`, the save before it."""
    if cfg.resume is True:
        path, prev = Path(cfg.ckpt_save_dir) / LAST, Path(cfg.ckpt_save_dir) / PREV
        if not path.is_file() and not is_complete_pair(prev):
            raise VitkitError(f"--resume: no checkpoint to resume in {cfg.ckpt_save_dir} ({path.name} is missing "
                              f"there and in every timestamped run folder under it); pass --resume PATH or the "
                              f"run's --ckpt_save_dir")
        if not is_complete_pair(path) and is_complete_pair(prev):
            return prev
        return path  # complete, or load_train_state says why not
    given = [(key, value) for key, value in (("--resume", cfg.resume), ("--ckpt_path", cfg.ckpt_path))
             if isinstance(value, str) and value and (key == "--resume" or cfg.resume_opt)]
    if not given:
        return None
    key, value = given[0]
    if (why := path_problem(value)) is not None:  # before anything is built or written
        raise WeightsError(f"{key} {value} {why}; give the run's last.safetensors (or --resume true)")
    return Path(value)


def finished_run(cfg: Config) -> tuple[str, dict[str, Any]] | None:
    """(what to say, its metrics) when the run `cfg` resumes has nothing left to do: its checkpoint is at the end
    of the schedule (or at max_steps). Read from the checkpoint's metadata alone; None otherwise."""
    path = resolve_resume_path(cfg)
    meta = read_metadata(path) if path is not None and path.is_file() else None
    if not meta or meta.get("format") != "vitkit":
        return None  # a fresh run, or the Trainer says what is wrong with the checkpoint
    epoch, step = int(meta.get("epoch", 0)), int(meta.get("step", 0))
    where = f"run in {path.parent}"
    if epoch >= cfg.epoch_size:  # epoch = step // steps_per_epoch: step >= the schedule's last step
        text = (f"{where} is already complete (epoch {epoch}/{cfg.epoch_size}, step {step}); nothing to do — start "
                f"a new run with a fresh --ckpt_save_dir or raise --epoch_size")
    elif cfg.max_steps is not None and step >= cfg.max_steps:
        text = (f"{where} is already at step {step} (max_steps {cfg.max_steps}); nothing to do — raise --max_steps "
                f"or drop it to train to the end (epoch {cfg.epoch_size})")
    else:
        return None
    return text, json.loads(meta.get("metrics", "{}"))


def _created_by_this_run(run_dir: Path) -> Path | None:
    """The outermost folder of `run_dir` (itself or a parent) that does not exist yet, or None."""
    missing = None
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            break
        missing = p
    return missing


class Trainer:
    """Builds data, model, optimizer, schedule, precision and bookkeeping from `cfg`; `fit()` runs them."""

    def __init__(self, cfg: Config, *, argv: Sequence[str] | None = None, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, monitor: Monitor | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.model_name = resolve_model_name(cfg.model)  # vit_b_32, ViT-B/32, vit_base_patch32_224 -> vit_b_32_224
        self.started = time.perf_counter()  # metrics.jsonl's elapsed_s (time to accuracy) counts from here
        self.device = device or runtime.pick_device(cfg.device)  # several processes: cuda:local_rank or cpu
        runtime.seed_everything(cfg.seed, cfg.deterministic)
        runtime.setup_tf32(self.device, cfg.deterministic)
        self.run_dir = Path(cfg.ckpt_save_dir)
        resume = resolve_resume_path(cfg)
        if resume is None and not cfg.overwrite:
            self._refuse_used_run_dir()
        # Nothing is written before data and model are built: a bad data dir or model leaves no folder behind.
        self._build_data()
        self._build_model()
        created = _created_by_this_run(self.run_dir)
        was_empty = created is None and self.run_dir.is_dir() and not any(self.run_dir.iterdir())
        # what a failure before this run's first checkpoint removes (nothing when it continues another run)
        self._fresh = (created, was_empty) if resume is None else None
        try:
            self._start(resume, argv, monitor)
        except BaseException:
            if rank == 0:
                self._undo_start(created, was_empty)
            raise

    def _refuse_used_run_dir(self) -> None:
        """A new run into a folder that holds another run: a one-line error saying the three ways on."""
        used = used_by_run(self.run_dir)
        if used:
            raise VitkitError(f"{self.run_dir} already holds a run ({', '.join(used)}); continue it with --resume, "
                              f"start a new one with --ckpt_save_dir {next_free_run_dir(self.run_dir)}, or replace "
                              f"it with --overwrite")

    def _start(self, resume: Path | None, argv: Sequence[str] | None, monitor: Monitor | None) -> None:
        """The part of construction that writes into the run folder: overwrite, monitor, saver, restore."""
        cfg = self.cfg
        removed = clear_run(self.run_dir) if cfg.overwrite and self.rank == 0 else []
        self.monitor = monitor or Monitor(self.run_dir, enabled=self.rank == 0, log_interval=cfg.log_interval)
        if removed:
            self.monitor.print(f"overwrite: removed the previous run's {len(removed)} files from {self.run_dir}")
        if self.precision.notice:
            self.monitor.print(self.precision.notice)
        self.saver = CheckpointSaver(self.run_dir, model_name=self.model_name, policy=cfg.ckpt_save_policy,
                                     keep_max=cfg.keep_checkpoint_max, epoch_files=not cfg.smoke)
        self.argv = list(argv) if argv is not None else None
        self.step, self.lr_factor, self.rollbacks, self.skipped = 0, 1.0, 0, 0
        self.epoch_meter = {"loss_sum": 0.0, "steps": 0}
        self.last_metrics: dict[str, Any] = {}
        self.received_signal: int | None = None  # the first stop signal this process got (`_on_signal`)
        self.stop_signal: int | None = None  # the one every rank agreed to stop on (`_stop_requested`)
        self._saved_step: int | None = None  # the step of this invocation's latest save
        self._diverged = False  # set when a divergence ends the run (`_on_divergence`)
        if resume is not None:
            self.restore(resume)
            torn = " (the last save was interrupted; continuing from the one before)" if resume.name == PREV else ""
            self.monitor.print(f"resumed from {resume} at epoch {self.epoch + 1}, step {self.step}{torn}")

    def _undo_start(self, created: Path | None, was_empty: bool) -> None:
        """A failed start: remove what it wrote, when the run folder was missing or empty before."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()  # the TensorBoard writer holds a file in the folder
        if created is not None and self.run_dir.is_dir():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for p in self.run_dir.parents:  # the parents this run made, while empty (a parallel run may use them)
                if p == created.parent or not p.is_dir() or any(p.iterdir()):
                    break
                p.rmdir()
        elif was_empty and self.run_dir.is_dir():
            for p in self.run_dir.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    # -- construction -----------------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg = self.cfg
        # ckpt_path without resume_opt: start from those weights (any format), through the pretrained loader;
        # read first, so that the eval preprocessing follows their source
        weights = cfg.ckpt_path if cfg.ckpt_path and not cfg.resume_opt else cfg.pretrained
        self.weights = load_weights(weights, model_name=cfg.model) if weights else None
        stated = self.weights.data if self.weights else None
        self.data_config = data_config_from_config(cfg, get_spec(cfg.model), stated)
        train_ds = dataset_from_config(cfg, cfg.train_split, train=True)
        self.class_names = list(train_ds.classes)
        if cfg.num_classes is not None and cfg.num_classes != len(self.class_names):
            raise DataError(f"num_classes is {cfg.num_classes} but {cfg.data_dir}/{cfg.train_split} has "
                            f"{len(self.class_names)} classes; drop --num_classes or fix the dataset")
        self.num_classes = len(self.class_names)
        self.train_loader = loader_from_config(cfg, train_ds, train=True, data_config=self.data_config,
                                               rank=self.rank, world_size=self.world_size)
        self.val_loader = None
        self.val_confusion: torch.Tensor | None = None  # of the last validation (`CONFUSION_MAX_CLASSES`)
        if cfg.val_while_train:
            val_ds = dataset_from_config(cfg, cfg.val_split, train=False)
            if cfg.val_num_samples is not None:
                val_ds = stratified_subset(val_ds, cfg.val_num_samples, cfg.seed)
            self.val_loader = loader_from_config(cfg, val_ds, train=False, data_config=self.data_config,
                                                 rank=self.rank, world_size=self.world_size)
        self.mixup = mixup_from_config(cfg, self.num_classes)
        self.accum = cfg.gradient_accumulation_steps
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.train_loader)} training batches per epoch is fewer than "
                            f"gradient_accumulation_steps={self.accum}; lower batch_size or accumulation")

    def _build_model(self) -> None:
        cfg = self.cfg
        try:
            self.model = create_model(cfg.model, pretrained=self.weights or False, num_classes=self.num_classes,
                                      img_size=cfg.image_resize, drop_rate=cfg.drop_rate,
                                      drop_path_rate=cfg.drop_path_rate)
        except ValueError as e:  # the architecture refuses these values (e.g. image_resize not a patch multiple)
            raise ConfigError(f"model {cfg.model} with image_resize {cfg.image_resize}: {e}") from None
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.freeze_backbone:  # a linear probe: the optimizer gets the head's parameters only
            self.model.freeze_backbone()
        self.precision = resolve_precision(**precision_args(cfg), device=self.device)  # its notice: _start
        self.model.to(self.device, dtype=self.precision.param_dtype)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema else None
        # DDP (or FSDP, which shards self.model in place) over all processes; a single process is unwrapped.
        # Same seed for the init above on every rank; from here each rank draws its own dropout/drop path.
        wrapped = parallel.wrap_model(self.model, fsdp=cfg.fsdp, ema=cfg.ema, device=self.device)
        if self.world_size > 1:
            runtime.seed_all(cfg.seed + self.rank)  # ranks draw different augmentations and dropout masks
        self.optimizer = create_optimizer(self.model, **optimizer_args(cfg), device=self.device)
        self.schedule = build_schedule(**schedule_args(cfg), steps_per_epoch=self.steps_per_epoch)
        self.train_model: nn.Module = torch.compile(wrapped) if cfg.compile else wrapped

    # -- position ---------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.step // self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epoch_size

    @property
    def last_step(self) -> int:
        """Where this invocation stops: the end of training, or max_steps (the schedule is not shortened)."""
        return min(self.total_steps, self.cfg.max_steps or self.total_steps)

    # -- checkpoints ------------------------------------------------------------------------------------
    def train_state(self, optimizer_state: dict[str, Any] | None = None,
                    rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything besides the weights that resuming needs; plain values and tensors only. Distributed
        runs pass the gathered optimizer state and every rank's RNG state (`save`)."""
        return {
            "format": "vitkit-train-state", "version": 1,
            "step": self.step, "epoch": self.epoch, "steps_per_epoch": self.steps_per_epoch,
            "optimizer": optimizer_state if optimizer_state is not None else self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler.is_enabled() else {},
            "schedule": {"lr_factor": self.lr_factor, "name": self.schedule.name},
            "rollbacks": self.rollbacks, "epoch_meter": dict(self.epoch_meter),
            "rng": runtime.rng_state(),
            **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
        }

    def _write(self, path: Path, model: nn.Module | None = None, train_state: dict | None = None) -> None:
        save_checkpoint(path, model or self.model, model_name=self.model_name, data_config=self.data_config,
                        class_names=self.class_names, config=self.cfg.to_dict(),
                        ema_model=self.ema.module if self.ema else None, epoch=self.epoch, step=self.step,
                        metrics=self.last_metrics, train_state=train_state or self.train_state())

    def _nonfinite_key(self) -> str | None:
        """The first tensor of the model (or `ema.` of the EMA copy) holding NaN or inf, or None. Each process
        checks its own tensors (its shards under FSDP); all of them learn whether any found one."""
        tensors = [(k, v) for k, v in self.model.state_dict().items()]
        if self.ema is not None:
            tensors += [("ema." + k, v) for k, v in self.ema.state_dict().items()]
        tensors = [(k, v.to_local() if isinstance(v, DTensor) else v) for k, v in tensors]
        tensors = [(k, v) for k, v in tensors if v.is_floating_point() and v.numel()]
        finite = torch.stack([torch.isfinite(v).all() for _, v in tensors]).cpu() if tensors else torch.ones(0)
        bad = [k for (k, _), ok in zip(tensors, finite.tolist()) if not ok]
        if self._all_ranks_max(int(bool(bad))):
            return bad[0] if bad else ""
        return None

    def save(self, *, keep_epoch: bool, val_top1: float | None = None) -> Path | None:
        """Write `last` (and the epoch/best files the policy keeps). Non-finite weights are never written: they
        raise NonFiniteWeights, a divergence (`nan_policy`), on every rank."""
        key = self._nonfinite_key()
        if key is not None:
            raise NonFiniteWeights(self.step, key or None)
        write: Any = self._write
        if self.world_size > 1:  # every rank gathers (collectives under FSDP); rank 0 alone writes full tensors
            model = parallel.gathered_model(self.train_model)
            state = self.train_state(parallel.optimizer_state_dict(self.train_model, self.optimizer),
                                     launch.gather_objects(runtime.rng_state()))
            write = None if self.rank != 0 else lambda path: self._write(path, model, state)
        saved = None if write is None else self.saver.save(write, epoch=self.epoch, step=self.step,
                                                            val_top1=val_top1, keep_epoch=keep_epoch)
        self._saved_step = self.step
        return saved

    def restore(self, path: Path) -> None:
        """Load weights, EMA and training state from a checkpoint written by `save`."""
        ckpt = load_checkpoint(path)
        if ckpt.model_name != self.model_name or ckpt.arch != self.model.cfg:
            raise WeightsError(f"{path} holds {ckpt.model_name} ({ckpt.arch.num_classes} classes, "
                               f"{ckpt.arch.img_size} px); this run builds {self.cfg.model} "
                               f"({self.model.cfg.num_classes} classes, {self.model.cfg.img_size} px). Resume with "
                               f"the run's own config, or start from its weights with --ckpt_path (no --resume_opt)")
        state = load_train_state(path, required=TRAIN_STATE_FIELDS)
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise VitkitError(f"{path} was written with {state['steps_per_epoch']} steps per epoch, this run has "
                              f"{self.steps_per_epoch}: resuming exactly needs the same data, batch_size, "
                              f"gradient_accumulation_steps and number of processes")
        check_resume_values(path, state, self.optimizer, step=ckpt.step)
        try:
            dtype = self.precision.param_dtype
            parallel.load_model_state_dict(self.train_model, {k: v.to(dtype) if v.is_floating_point() else v
                                                              for k, v in ckpt.state_dict.items()})
            if self.ema is not None:
                if ckpt.ema_state_dict is None:
                    raise VitkitError(f"{path} has no EMA weights but this run has ema: true")
                self.ema.load_state_dict(ckpt.ema_state_dict)
            parallel.load_optimizer_state_dict(self.train_model, self.optimizer, state["optimizer"])
            if state["scaler"]:
                self.precision.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            self.lr_factor = float(state["schedule"]["lr_factor"])
            self.rollbacks = int(state["rollbacks"])
            self.epoch_meter = dict(state["epoch_meter"])
            self.last_metrics = dict(ckpt.metrics)
            if self.world_size > 1:  # each rank its own stream; any number of processes can resume
                runtime.restore_rank_rng(state.get("rng_ranks") or [state["rng"]], self.rank, self.cfg.seed)
            else:
                runtime.set_rng_state(state["rng"])
        except VitkitError:
            raise
        except Exception as e:  # noqa: BLE001 - a value the checks above let through: still one line
            raise VitkitError(f"{state_path(path)} could not be resumed ({type(e).__name__}: {str(e)[:80]!r}); "
                              f"a damaged or foreign training state: resume from the run's prev.safetensors or "
                              f"an epoch checkpoint instead") from None
        self.saver.forget_after(self.step)
        self.monitor.truncate_metrics(self.epoch, step=self.step)

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """Forward and backward over the micro-batches, then one optimizer update. Returns (mean loss, grad norm).

        The same code runs fp32, autocast and fp16 with loss scaling: autocast and the scaler are disabled
        (pass-through) when not in use.
        """
        cfg, scaler = self.cfg, self.precision.scaler
        self.train_model.train()
        total = torch.zeros((), device=self.device)
        for micro, (images, targets) in enumerate(batches):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            smoothing = cfg.label_smoothing
            if self.mixup is not None:  # soft targets with smoothing already folded in
                images, targets = self.mixup(images, targets, self.step * self.accum + micro)
                smoothing = 0.0
            sync = micro == len(batches) - 1
            with self._no_sync(sync), self.precision.autocast():
                logits = self.train_model(images.to(self.precision.param_dtype))
                loss = classification_loss(logits, targets, kind=cfg.loss, smoothing=smoothing)
            with self._no_sync(sync):
                scaler.scale(loss / len(batches)).backward()
            total += loss.detach()
        scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if cfg.clip_grad:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_value, grad_norm)
        # The mean loss over ranks, so every rank logs it and takes the same non-finite decision.
        loss_value, norm_value = torch.stack([launch.mean_across_ranks(total / len(batches)),
                                              launch.full_tensor(grad_norm).float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.skipped += 1
            if not scaler.is_enabled() or self.skipped >= MAX_SKIPPED_STEPS:
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(self.step, loss_value, norm_value)
        else:
            self.skipped = 0
        set_lr(self.optimizer, self.schedule(self.step) * self.lr_factor)
        scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
        self.precision.update_scaler()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return loss_value, norm_value

    def _no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Under DDP/FSDP, skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        return parallel.grad_sync(self.train_model, sync)

    # -- epochs -----------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of this epoch's batches, read outside the model's RNG stream."""
        loader = self.train_loader
        loader.set_epoch(self.epoch, start_batch=(self.step % self.steps_per_epoch) * self.accum)
        with torch.random.fork_rng(devices=[]):
            it = iter(loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch[0], batch[1]

    def train_epoch(self) -> dict[str, float]:
        """Steps until the end of the epoch (or max_steps); returns throughput figures."""
        cfg, spe = self.cfg, self.steps_per_epoch
        epoch, first = self.epoch, self.step % spe
        stop = min(spe, self.last_step - epoch * spe)
        if first == 0:
            self.epoch_meter = {"loss_sum": 0.0, "steps": 0}
        self.monitor.start_epoch(epoch, cfg.epoch_size, spe, first, last_step=self.last_step)
        batches = self._batches()
        images, wait, start = 0, 0.0, time.perf_counter()
        for done in range(first + 1, stop + 1):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.accum)]
            wait += time.perf_counter() - t0
            loss, grad_norm = self.train_step(micro)
            self.epoch_meter["loss_sum"] += loss
            self.epoch_meter["steps"] += 1
            images += sum(len(b[1]) for b in micro) * self.world_size
            elapsed = time.perf_counter() - start
            lr = self.schedule(self.step - 1) * self.lr_factor
            stats = {"loss": loss, "lr": lr, "images_per_s": images / elapsed, "data_wait": wait / elapsed}
            self.monitor.update(done, stats, eta_s=elapsed / (done - first) * (stop - done))
            if self.step % cfg.log_interval == 0:
                self.monitor.log_step({"loss": loss, "lr": lr, "grad_norm": grad_norm}, self.step)
            if done < stop and self._stop_requested():  # the epoch's last boundary: `fit` asks, after its end
                break
        batches.close()
        self.monitor.end_epoch()
        elapsed = time.perf_counter() - start
        return {"images_per_s": images / elapsed if elapsed else 0.0, "data_wait": wait / elapsed if elapsed else 0.0,
                "epoch_time_s": elapsed}

    def validate(self) -> dict[str, Any]:
        """val_top1/top5/loss of the model (and of the EMA weights), by the same `evaluate` as `vitkit validate`."""
        assert self.val_loader is not None
        out: dict[str, Any] = {}
        models = [("", self.model)] + ([("_ema", self.ema.module)] if self.ema else [])
        loader: Any = self.val_loader
        if parallel.is_fsdp(self.model):  # every FSDP forward is a collective: ranks must run as many
            size = self.cfg.image_resize
            loader = parallel.even_batches(loader, (self.model.cfg.in_chans, size, size))
        for suffix, model in models:
            confusion = not suffix and self.num_classes <= CONFUSION_MAX_CLASSES
            with torch.random.fork_rng(devices=[]):
                r = evaluate(model, loader, device=self.device, amp_dtype=self.precision.eval_dtype,
                             num_classes=self.num_classes, confusion=confusion,
                             progress=self.monitor.progress_bar(f"val{suffix}"))
            if confusion:
                self.val_confusion = r["confusion"]
            out.update({f"val_top1{suffix}": r["top1"], f"val_top5{suffix}": r["top5"], f"val_loss{suffix}": r["loss"]})
        out["val_images"] = r["num_images"]
        return out

    def end_of_epoch(self, throughput: dict[str, float]) -> None:
        cfg, epoch = self.cfg, self.epoch  # epochs completed, 1-based from here
        last = epoch == cfg.epoch_size or self.step >= self.last_step
        record: dict[str, Any] = {
            "epoch": epoch, "step": self.step,
            "train_loss": self.epoch_meter["loss_sum"] / max(1, self.epoch_meter["steps"]),
            "lr": self.schedule(self.step - 1) * self.lr_factor,
            "val_top1": None, "val_top5": None,
            "images_per_s": throughput["images_per_s"], "data_wait": throughput["data_wait"],
        }
        if self.val_loader is not None and (epoch % cfg.val_interval == 0 or last):
            record.update(self.validate())
        record["elapsed_s"] = round(time.perf_counter() - self.started, 2)  # this process: data, model, steps, val
        stats = self.train_loader.stats() if hasattr(self.train_loader, "stats") else {}
        if stats.get("bad_images"):
            record["bad_images"] = stats["bad_images"]
        self.last_metrics = {k: v for k, v in record.items() if v is not None}
        self.monitor.log_epoch(record, self.step)
        saved = None
        if epoch % cfg.ckpt_save_interval == 0 or last:
            best_before = self.saver.best_top1
            saved = self.save(keep_epoch=True, val_top1=record["val_top1"])
            if saved is not None and self.saver.best_top1 != best_before:
                self.write_card(new_best=True)
        self.monitor.print(self._summary(record, throughput, saved))

    def write_card(self, *, new_best: bool = False) -> None:
        """The model card of `best` (README.md) in the run folder, with confusion.png of the validation that made
        it best (`new_best`). A card that cannot be written is a notice, never the end of a run."""
        best = self.run_dir / BEST
        if self.rank != 0 or not best.is_file():
            return
        try:
            if new_best and self.val_confusion is not None:
                top1 = self.saver.best_top1
                plot_confusion(self.val_confusion, self.class_names, self.run_dir / CONFUSION,
                               f"{self.model_name} on {self.cfg.val_split}: top-1 {top1:.2f}% (epoch {self.epoch})")
            write_card(self.run_dir, load_checkpoint(best, weights=False), run_dir=self.run_dir)
        except (OSError, ValueError, VitkitError) as e:
            self.monitor.print(f"notice: no model card written ({type(e).__name__}: {e})")

    def _summary(self, r: dict[str, Any], throughput: dict[str, float], saved: Path | None) -> str:
        parts = [f"epoch {r['epoch']}/{self.cfg.epoch_size}", f"train loss {r['train_loss']:.4f}",
                 f"lr {r['lr']:.3g}"]
        if r.get("val_top1") is not None:
            val = f"val top-1 {r['val_top1']:.2f}% top-5 {r['val_top5']:.2f}%"
            if r.get("val_top1_ema") is not None:
                val += f" (EMA top-1 {r['val_top1_ema']:.2f}%)"
            parts.append(val)
        parts.append(f"{r['images_per_s']:.0f} img/s, data wait {100 * r['data_wait']:.0f}%, "
                     f"{format_duration(throughput['epoch_time_s'])}")
        if r.get("bad_images"):
            parts.append(f"{r['bad_images']} unreadable images replaced")
        if saved is not None:
            parts.append(f"saved {saved}")
        return " | ".join(parts)

    # -- the run ----------------------------------------------------------------------------------------
    def _header(self) -> str:
        cfg, n_train = self.cfg, getattr(self.train_loader, "num_images", None)
        global_batch = cfg.batch_size * self.accum * self.world_size
        lines = [
            f"run dir     {self.run_dir}",
            f"model       {cfg.model} ({count_params(self.model) / 1e6:.2f} M params, {self.num_classes} classes, "
            f"{cfg.image_resize} px){' + EMA' if self.ema else ''}",
            f"data        {cfg.data_dir} ({n_train} training images/epoch, {self.steps_per_epoch} steps of "
            f"{global_batch} images{'' if self.accum == 1 else f' in {self.accum} micro-batches'})",
            f"device      {self.device}, {self.precision.describe()}{', compiled' if cfg.compile else ''}",
            f"optimizer   {cfg.opt}, lr {cfg.lr:g} ({cfg.scheduler}, {cfg.warmup_epochs:g} warmup epochs), "
            f"weight decay {cfg.weight_decay:g} ({cfg.weight_decay_filter})",
            f"schedule    {cfg.epoch_size} epochs = {self.total_steps} steps"
            + (f"; stopping at step {self.last_step} (max_steps)" if self.last_step < self.total_steps else ""),
        ]
        return "\n".join(lines)

    def write_run_records(self) -> None:
        self.monitor.write_text(CONFIG, self.cfg.to_yaml())
        self.monitor.write_json(RUN_INFO, run_info(self.device, self.argv))

    def fit(self) -> dict[str, Any]:
        """Train until epoch_size epochs (or max_steps); returns the last epoch's metrics. A stop signal
        (SIGTERM, SIGINT) ends it with `Stopped` (see the module docstring)."""
        self.write_run_records()
        self.monitor.print(self._header())
        at_once = False
        try:
            with self._stop_on_signals():
                while self.step < self.last_step:
                    try:
                        throughput = self.train_epoch()  # to the epoch's end, max_steps, or an agreed stop
                        if self.step % self.steps_per_epoch == 0:
                            self.end_of_epoch(throughput)
                        elif self.stop_signal is None:  # max_steps mid-epoch: --resume continues exactly here
                            saved = self.save(keep_epoch=False)
                            self.monitor.print(f"stopped at step {self.step} (max_steps); resume with --resume "
                                               f"{saved or ''}".rstrip())
                        if self.step < self.last_step and self._stop_requested():
                            self._stop()
                    except Diverged as e:
                        self._on_divergence(e)
                if self.cfg.smoke and self.step >= self.total_steps and self.rank == 0:
                    self.saver.drop_prev()  # a smoke run keeps one checkpoint: last (and best)
        except Stopped as e:
            at_once = e.saved is None
            raise
        except Exception:
            # a failure before this new run saved anything (a bad value found at the first step, a data error):
            # the folder goes as a failed start's does, so the same command can be run again once fixed
            if self._fresh is not None and self._saved_step is None and not self.saver.last.is_file() \
                    and not self._diverged:  # a diverged run's logs say how it diverged: they stay
                at_once = True
                if self.rank == 0:
                    self._undo_start(*self._fresh)
            raise
        finally:
            if not at_once:
                self.monitor.plot_curves()
                self.write_card()  # now with the final curves
            self.monitor.close()
        return self.last_metrics

    # -- stop signals -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT handlers around the loop, and the previous ones back after it (main thread only:
        Python runs handlers there, and only there may they be set)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._pid = os.getpid()
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        try:
            for s in STOP_SIGNALS:
                signal.signal(s, self._on_signal)
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker (Ctrl+C signals the whole process group)
            return
        name = signal_name(signum)
        if self.received_signal is not None:
            last = self.saver.last if self.saver.last.is_file() else None
            kept = f"the last checkpoint {last} is intact; resume with --resume {last}" if last else \
                "no checkpoint was saved yet"
            raise Stopped(signum, f"{name} again: stopped at step {self.step} without saving; {kept}"
                          if self.rank == 0 else "")
        self.received_signal = signum
        if self.rank == 0:  # a raw write: a handler may run in the middle of a print to the same stream
            with contextlib.suppress(OSError, ValueError):
                below_bar = "\n" if os.isatty(2) else ""
                os.write(2, f"{below_bar}{name}: stopping at the end of this step with a checkpoint (send {name} "
                            f"again to stop at once, without saving)\n".encode())

    def _all_ranks_max(self, value: int) -> int:
        """`value`'s maximum over the processes (one small all-reduce; `value` itself without a process group)."""
        if not launch.dist_ready():
            return value
        on = "cpu" if "gloo" in str(dist.get_backend()) else self.device  # vitkit's groups: gloo for CPU tensors
        t = torch.tensor([value], dtype=torch.int64, device=on)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _stop_requested(self) -> bool:
        """At a step boundary: whether to stop now. Every rank asks at the same boundaries and gets the same
        answer (the highest signal number any of them received), so all stop at the same step."""
        if self.stop_signal is None:
            agreed = self._all_ranks_max(self.received_signal or 0)
            self.stop_signal = agreed or None
        return self.stop_signal is not None

    def _stop(self) -> None:
        """Save where the run stands (unless this step is already saved: an epoch end), say so, raise Stopped."""
        assert self.stop_signal is not None
        if self._saved_step != self.step:
            self.save(keep_epoch=False)
        name, where = signal_name(self.stop_signal), self.saver.last
        message = (f"stopped at step {self.step} ({name}); saved {where}; resume with --resume {where}"
                   if self.rank == 0 else "")
        raise Stopped(self.stop_signal, message, saved=where)

    def _on_divergence(self, e: Diverged) -> None:
        last = self.saver.last if self.saver.last.is_file() else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        if self.cfg.nan_policy == "rollback" and last is not None and self.rollbacks < MAX_ROLLBACKS:
            rollbacks, factor = self.rollbacks + 1, ROLLBACK_LR_FACTOR
            self.restore(last)
            self.rollbacks, self.lr_factor = rollbacks, self.lr_factor * factor
            self.monitor.print(f"warning: {e}; rolled back to {last} (step {self.step}) and continuing with "
                               f"lr x{self.lr_factor:g} (rollback {rollbacks}/{MAX_ROLLBACKS})")
            return
        self._diverged = True
        hint = ("" if self.cfg.nan_policy == "rollback" else "; or rerun with --nan_policy rollback")
        # the epoch of the step that diverged: the one being taken (a loss), or the one just taken (weights)
        epoch = (self.step - 1) // self.steps_per_epoch + 1 if isinstance(e, NonFiniteWeights) else self.epoch + 1
        raise VitkitError(f"training diverged: {e} (epoch {epoch}); {where}. Resume from it with a lower "
                          f"--lr (or --clip_grad){hint}")
