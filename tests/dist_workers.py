"""Worker processes for tests/test_distributed.py.

Each worker sets one launcher's environment by hand (torchrun's RANK/WORLD_SIZE, Open MPI's OMPI_*, MPICH's
PMI_*) and then goes through vitkit's real `init_distributed`, so the tests cover the launch path too. Run by
`torch.multiprocessing.spawn` from the tests, or as a script under a real launcher:
    mpirun -n 2 python tests/dist_workers.py SCENARIO OUT_DIR
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitkit.data.datasets import ArrayDataset
from vitkit.engine import launch as L
from vitkit.engine import parallel as P
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.engine.config import Config, optimizer_args
from vitkit.engine.data_args import data_config_from_config, loader_from_config
from vitkit.engine.evaluate import evaluate
from vitkit.engine.optim import create_optimizer
from vitkit.engine.runtime import seed_all
from vitkit.models.registry import create_model, get_spec

MODEL = "vit_n_4_32"
BATCH = 4  # per process
STEPS = 3
EVAL_IMAGES = 23  # divides by neither 2 nor 3

LAUNCHER_ENVS: dict[str, Callable[[int, int], dict[str, int]]] = {
    "torchrun": lambda r, w: {"RANK": r, "WORLD_SIZE": w, "LOCAL_RANK": r},
    "ompi": lambda r, w: {"OMPI_COMM_WORLD_RANK": r, "OMPI_COMM_WORLD_SIZE": w, "OMPI_COMM_WORLD_LOCAL_RANK": r},
    "pmi": lambda r, w: {"PMI_RANK": r, "PMI_SIZE": w},  # MPICH / Intel MPI: no local rank variable needed
}



def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

def tiny_cfg(**overrides: Any) -> Config:
    """A deterministic recipe: no dropout or drop path; the loader's pad-crop/flip augmentation is seeded
    per sample from its global position, so it is the same whatever the number of processes.

    SGD with momentum, not Adam: Adam divides by sqrt(v), so a parameter whose exact gradient is zero (the
    key bias: softmax ignores a constant added to every score of a query) moves by up to lr on pure float
    rounding noise, and the different reduction order of 1 vs 2 processes then shows as weight differences
    of ~1e-4 that say nothing about the distributed engine. SGD leaves rounding noise at rounding size."""
    cfg = Config(model=MODEL, device="cpu", seed=7, batch_size=BATCH, image_resize=32, num_parallel_workers=0,
                 opt="momentum", lr=0.05, weight_decay=1e-4, epoch_size=1, warmup_epochs=0)
    return dataclasses.replace(cfg, **overrides)


def tiny_data(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (n,), generator=g).tolist()
    return ArrayDataset(images, targets, [str(i) for i in range(10)])


def build_model(cfg: Config, info: L.DistInfo) -> torch.nn.Module:
    seed_all(cfg.seed)  # the same initial weights on every rank (FSDP does not broadcast)
    model = create_model(MODEL, depth=2, num_classes=10).to(info.device)
    return P.wrap_model(model, fsdp=cfg.fsdp, ema=cfg.ema, device=info.device)


def train_steps(cfg: Config, info: L.DistInfo, steps: int = STEPS, *, model: Any = None, opt: Any = None,
                start_batch: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`steps` optimizer steps of batch_size x world_size x gradient_accumulation_steps images each."""
    if model is None:
        model = build_model(cfg, info)
        opt = create_optimizer(P.unwrap_model(model), **optimizer_args(cfg))
    seed_all(cfg.seed + info.rank)
    accum = cfg.gradient_accumulation_steps
    data_config = data_config_from_config(cfg, get_spec(MODEL))
    loader = loader_from_config(cfg, tiny_data(64, seed=1), train=True, data_config=data_config, rank=info.rank,
                                world_size=info.world_size)
    loader.set_epoch(0, start_batch=start_batch)
    batches = iter(loader)
    for _ in range(steps):
        for micro in range(accum):
            images, targets = next(batches)
            with P.grad_sync(model, sync=micro == accum - 1):
                (F.cross_entropy(model(images.to(info.device)), targets.to(info.device)) / accum).backward()
        opt.step()  # type: ignore[union-attr]
        opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
    return model, opt  # type: ignore[return-value]


def eval_loader(cfg: Config, info: L.DistInfo) -> Any:
    return loader_from_config(cfg, tiny_data(EVAL_IMAGES, seed=2), train=False,
                              data_config=data_config_from_config(cfg, get_spec(MODEL)), rank=info.rank,
                              world_size=info.world_size)


def save_run(path: Path, cfg: Config, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """What a training loop does at a checkpoint: gather on every rank, write on rank 0."""
    optim_state = P.optimizer_state_dict(model, opt)
    plain = P.gathered_model(model)
    if L.is_main():
        save_checkpoint(path, plain, model_name=MODEL, data_config=data_config_from_config(cfg, get_spec(MODEL)),
                        config=cfg.to_dict(), step=STEPS, train_state={"optimizer": optim_state})
    L.barrier()


# -- scenarios: each runs on every rank and leaves rank 0's findings in OUT_DIR ------------------------------

def scenario_train(out: Path) -> None:
    """Evaluation and collectives (as `scenario_eval`), then DDP with and without gradient accumulation, and
    FSDP; FSDP writes a gathered checkpoint, then resumes a single-process checkpoint
    (out/single.safetensors, written by the test) for one more step."""
    from vitkit.engine.checkpoint import load_checkpoint, load_train_state

    with L.distributed_session(distribute=True, device="cpu") as info:
        _eval_and_collectives(tiny_cfg(distribute=True), info, out)
        results: dict[str, Any] = {}
        for name, overrides in {"ddp": {}, "ddp_accum2": {"gradient_accumulation_steps": 2},
                                "fsdp_accum2": {"fsdp": True, "gradient_accumulation_steps": 2},
                                "fsdp": {"fsdp": True}}.items():
            cfg = tiny_cfg(distribute=True, **overrides)
            model, opt = train_steps(cfg, info)
            results[name] = P.model_state_dict(model)
            results[name + "_fsdp"] = P.is_fsdp(model)
            if name == "fsdp":
                save_run(out / "fsdp.safetensors", cfg, model, opt)
                # batch 11: the ranks hold 12 and 11 images, 2 and 1 batches; FSDP forwards are collectives
                loader = eval_loader(tiny_cfg(batch_size=11), info)
                results["fsdp_eval"] = evaluate(model, P.even_batches(loader, (3, 32, 32)), device=info.device)
                # 1 -> 2 processes: resume the single-process checkpoint under FSDP, one more step.
                ckpt = load_checkpoint(out / "single.safetensors")
                model = build_model(cfg, info)
                P.load_model_state_dict(model, ckpt.state_dict)
                opt = create_optimizer(P.unwrap_model(model), **optimizer_args(cfg))
                P.load_optimizer_state_dict(model, opt, load_train_state(ckpt.path)["optimizer"])
                model, opt = train_steps(cfg, info, 1, model=model, opt=opt, start_batch=STEPS)
                results["fsdp_resumed"] = P.model_state_dict(model)
        if info.is_main:
            torch.save(results, out / "train.pt")


def _eval_and_collectives(cfg: Config, info: L.DistInfo, out: Path) -> None:
    model = build_model(cfg, info)
    result = evaluate(model, eval_loader(cfg, info), device=info.device, collect=True)
    shard = len(eval_loader(cfg, info).plan.epoch(0)[0])
    facts = {
        "info": L.gather_objects((info.rank, info.world_size, info.local_rank, info.is_main, str(info.device))),
        "shards": L.gather_objects(shard),
        "rank_sum": L.all_reduce_sum(torch.tensor([info.rank + 1.0])).item(),
        "broadcast": broadcast_object({"from": info.rank}),
        "master": (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]),
    }
    if info.is_main:
        torch.save({"result": result, **facts}, out / "eval.pt")


def scenario_eval(out: Path) -> None:
    """Distributed evaluation of a fixed model on EVAL_IMAGES images, plus the small collectives."""
    cfg = tiny_cfg(distribute=True)
    with L.distributed_session(distribute=cfg.distribute, device=cfg.device) as info:
        _eval_and_collectives(cfg, info, out)


SCENARIOS: dict[str, Callable[[Path], None]] = {"train": scenario_train, "eval": scenario_eval}


def spawn_entry(rank: int, scenario: str, launcher: str, world: int, port: int, out: str) -> None:
    """torch.multiprocessing.spawn target: play launcher `launcher` for rank `rank`, then run `scenario`."""
    os.environ.update({k: str(v) for k, v in LAUNCHER_ENVS[launcher](rank, world).items()})
    os.environ["MASTER_PORT"] = str(port)  # MASTER_ADDR left unset: init_distributed's default is tested
    torch.set_num_threads(1)
    SCENARIOS[scenario](Path(out))


if __name__ == "__main__":  # under a real launcher (mpirun, torchrun), which set the environment
    torch.set_num_threads(1)
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]))
