"""The real entry point under torchrun (issue 6): `torchrun --standalone --nproc_per_node 2 train.py ...` against
one process with the same global batch; resume across process counts; an FSDP run validated in one process.

Tiny runs: vit_n_4_32 on 80 CIFAR-10 sample images, global batch 16 (5 steps per epoch), plain SGD with
momentum and no dropout (see tests/dist_workers.py for why not Adam). Slow: each torchrun start imports torch
in two processes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkit.engine.checkpoint import load_checkpoint, load_train_state
from vitkit.engine.train import run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"
ATOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training images per class; 33 test images (6 of the first class, 3 of the others), so at batch 8
    two ranks hold 17 and 16 images: 3 and 2 batches (uneven work that FSDP's collectives must survive)."""
    root = tmp_path_factory.mktemp("cifar_tiny")
    for split, n in (("train", 8), ("test", 3)):
        for c, cls in enumerate(sorted(p.name for p in (SAMPLE / split).iterdir())):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((SAMPLE / split / cls).iterdir())[:n + 3 * (split == "test" and c == 0)]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--model", "vit_n_4_32", "--dataset", "imagefolder", "--data_dir", str(data), "--val_split", "test",
            "--image_resize", "32", "--num_parallel_workers", "0", "--epoch_size", "2", "--warmup_epochs", "0",
            "--opt", "momentum", "--lr", "0.05", "--weight_decay", "1e-4", "--val_while_train",
            "--ckpt_save_dir", str(run_dir), "--log_interval", "1", *extra]


def torchrun(nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "train.py"), *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.safetensors").state_dict


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= ATOL, f"max weight difference {worst:.3g} > {ATOL}"


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 16, 7 steps (the second epoch is cut at step 7 by max_steps)."""
    out = tmp_path_factory.mktemp("ref")
    run(args(data, out, "--batch_size", "16", "--max_steps", "7"))
    return out


def test_two_processes_equal_one_process_with_the_global_batch(data: Path, reference: Path, tmp_path: Path) -> None:
    proc = torchrun(2, args(data, tmp_path, "--batch_size", "8", "--max_steps", "7", "--distribute"))
    assert_same_weights(weights(tmp_path), weights(reference))
    assert load_checkpoint(tmp_path / "last.safetensors").step == 7
    # rank 0 alone printed the header and the global batch
    assert proc.stdout.count("global batch 16 = batch_size 8 per process x 2 processes x 1") == 1
    # validation after epoch 1 counted the 30 test images once, with the same top-1 as one process
    ours, ref = [json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in (tmp_path, reference)]
    assert ours["val_images"] == ref["val_images"] == 33 and ours["val_top1"] == ref["val_top1"]


def test_two_processes_with_gradient_accumulation(data: Path, reference: Path, tmp_path: Path) -> None:
    torchrun(2, args(data, tmp_path, "--batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "7"))
    assert_same_weights(weights(tmp_path), weights(reference))


def test_resume_from_one_process_in_two_and_back(data: Path, reference: Path, tmp_path: Path) -> None:
    """1 process to step 3 -> 2 processes to step 5 -> 1 process to step 7 == 1 process straight to 7; the
    optimizer state (momentum) travels through every hand-over."""
    run(args(data, tmp_path, "--batch_size", "16", "--max_steps", "3"))
    torchrun(2, ["--resume", "--ckpt_save_dir", str(tmp_path), "--batch_size", "8", "--max_steps", "5"])
    assert load_checkpoint(tmp_path / "last.safetensors").step == 5
    assert len(load_train_state(tmp_path / "last.safetensors")["rng_ranks"]) == 2
    run(["--resume", "--ckpt_save_dir", str(tmp_path), "--batch_size", "16", "--max_steps", "7"])
    assert_same_weights(weights(tmp_path), weights(reference))
    ours = load_train_state(tmp_path / "last.safetensors")["optimizer"]["state"]
    ref = load_train_state(reference / "last.safetensors")["optimizer"]["state"]
    for i in ref:
        assert (ours[i]["momentum_buffer"] - ref[i]["momentum_buffer"]).abs().max() <= ATOL


def test_fsdp_run_validates_in_one_process(data: Path, reference: Path, tmp_path: Path) -> None:
    """FSDP over 2 processes trains the same weights and validates during training (uneven batches per
    rank); its gathered checkpoint validates in one process (`vitkit validate`) with the same top-1, and
    resumes there (fsdp: true in one process trains unsharded)."""
    torchrun(2, args(data, tmp_path, "--batch_size", "8", "--max_steps", "5", "--fsdp"))
    epoch1 = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    ref1 = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch1["val_images"] == 33 and epoch1["val_top1"] == ref1["val_top1"]
    from vitkit.tools.validate import main as validate

    results = tmp_path / "val.json"
    assert validate(["--ckpt_path", str(tmp_path / "last.safetensors"), "--results_file", str(results)]) == 0
    single = json.loads(results.read_text())
    assert single["num_images"] == 33 and single["top1"] == epoch1["val_top1"]
    run(["--resume", "--ckpt_save_dir", str(tmp_path), "--batch_size", "16", "--max_steps", "7"])
    assert_same_weights(weights(tmp_path), weights(reference))
