"""CUDA checks: `pytest -m gpu tests/test_gpu.py` on a machine with a GPU; every test skips without one.

What they pin down, each on a tiny model so the file runs in well under a minute (benchmarks/gpu/kit.py gives
it 60 s, imports and the CUDA start included): bf16 autocast tracks fp32; torch.compile matches eager in the
forward and the gradients; the model's attention runs on the flash kernel (and the default dispatch on a fused
one, never the math fallback); AdamW is torch's fused kernel; a torchrun-launched `vitkit train` on CUDA trains
and saves a checkpoint the CPU loads (and an NCCL group works in this image); GPU JPEG decode (nvJPEG) equals
CPU decode within JPEG tolerance; a checkpoint saved from a CUDA model is plain contiguous fp32 on the CPU.

The device is one constant, DEVICE: with DEVICE = "cpu" (and the skip removed) the same logic runs on the CPU,
which is how this file is checked on machines without a GPU. fp32 comparisons run with TF32 off.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from vitkit.constants import CIFAR10_MEAN, CIFAR10_STD
from vitkit.data.datasets import Subset, build_dataset
from vitkit.data.gpu_decode import GpuDecoder
from vitkit.data.loader import build_loader
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import load_checkpoint, save_checkpoint
from vitkit.engine.optim import create_optimizer, param_groups
from vitkit.models import create_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
GPU = DEVICE == "cuda"
# Profiler: CPU-side op names always; the device's own kernels on a GPU (on the CPU the ops are the kernels).
ACTIVITIES = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if GPU else [ProfilerActivity.CPU]
KERNEL_DEVICE = DeviceType.CUDA if GPU else DeviceType.CPU
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float32."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm()).item()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profiled(fn: Callable[[], Any]) -> tuple[set[str], list[str]]:
    """(names of the ops `fn` ran, names of the device kernels it launched)."""
    with profile(activities=ACTIVITIES) as prof:
        fn()
        if GPU:
            torch.cuda.synchronize()
    events = prof.events()
    return {e.name for e in events if e.device_type == DeviceType.CPU}, \
        [e.name for e in events if e.device_type == KERNEL_DEVICE]


@pytest.fixture(scope="module", autouse=True)
def no_tf32() -> Iterator[None]:
    """Full fp32 matmuls and convolutions, so fp32 results compare at 1e-4 (cuDNN convolutions default to TF32)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module", autouse=True)
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`torchrun --nproc_per_node 1 -m vitkit.cli train --smoke --distribute --device DEVICE ...`, started when the
    module starts so that its ~15 s (two Python starts, CUDA init, 8 steps, saves) overlap the other tests;
    test_torchrun_smoke_run_trains_and_saves waits for it."""
    out = tmp_path_factory.mktemp("smoke")
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "-m", "vitkit.cli", "train", "--smoke", "--distribute", "--device", DEVICE,
           "--data_dir", str(SAMPLE), "--dataset", "imagefolder", "--train_split", "train", "--val_split", "test",
           "--model", "vit_n_4_32", "--image_resize", "32", "--ckpt_save_dir", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, cwd=ROOT, env=env,
                                start_new_session=True)  # its own process group: teardown ends agent and worker
    yield {"proc": proc, "run_dir": run_dir, "stdout": out / "stdout.txt", "stderr": out / "stderr.txt"}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_bf16_autocast_logits_track_fp32() -> None:
    torch.manual_seed(0)
    model = create_model("vit_ti_16_224", depth=2, num_classes=10).to(DEVICE).eval()
    x = torch.randn(64, 3, 224, 224, device=DEVICE)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            low = model(x)
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16  # autocast did run the head in bf16
    low = low.float()
    assert torch.isfinite(low).all()
    assert rel(low, ref) < 3e-2
    # Random-init logits share a large input-independent part (one argmax for every row); compare what varies
    # with the input: the logits less their batch mean (bf16 on the CPU: 2e-2 relative, 97 % argmax agreement).
    c_low, c_ref = low - low.mean(0), ref - ref.mean(0)
    assert c_ref.argmax(1).unique().numel() >= 5  # the rows do disagree, so agreement below means something
    assert rel(c_low, c_ref) < 8e-2
    agree = (c_low.argmax(1) == c_ref.argmax(1)).float().mean().item()
    assert agree >= 0.8, f"bf16 and fp32 top-1 agree on {agree:.0%} of rows"


def test_attention_runs_on_the_flash_kernel() -> None:
    """ViT-B/16 attention (12 heads of 64, 197 tokens, q/k/v strided views of one qkv projection) in bf16."""
    torch.manual_seed(0)
    model = create_model("vit_b_16_224", depth=1).to(DEVICE).eval()
    x = torch.randn(8, 3, 224, 224, device=DEVICE)

    def forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            return model(x)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" if flash cannot take the inputs
        out = forward()
        ops, kernels = profiled(forward)
    assert out.shape == (8, 1000) and torch.isfinite(out.float()).all()
    assert any("_scaled_dot_product_flash_attention" in op for op in ops), sorted(ops)
    assert any("flash" in k.lower() for k in kernels), kernels
    # Unrestricted: a fused kernel is chosen, never the efficient or math fallback. Flash is first in torch's
    # default order; from torch 2.9 cuDNN attention (a flash-style fused kernel too) is put first on sm90/sm100
    # when the cuDNN is recent (sdp_utils.cpp check_prefer_cudnn_attention), so both count.
    ops, kernels = profiled(forward)
    chosen = sorted(op for op in ops if op.startswith("aten::_scaled_dot_product_"))
    assert chosen and all("flash" in op or "cudnn" in op for op in chosen), chosen
    if any("flash" in op for op in chosen):
        assert any("flash" in k.lower() for k in kernels), kernels


def test_adamw_is_the_fused_kernel() -> None:
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=1).to(DEVICE)
    ref = copy.deepcopy(model)
    opt = create_optimizer(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
    assert all(g["fused"] is True for g in opt.param_groups)
    x, y = torch.randn(8, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (8,), device=DEVICE)
    F.cross_entropy(model(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()  # the same gradients for both optimizers
    before = [p.detach().clone() for p in model.parameters()]
    ops, _ = profiled(opt.step)
    assert any("_fused_adamw" in op for op in ops), sorted(ops)
    # torch's single-tensor (for-loop) AdamW on the same parameter groups is the reference
    ref_opt = torch.optim.AdamW(param_groups(ref, weight_decay=0.05), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                foreach=False, fused=False)
    ref_opt.step()
    for (name, p), p0, q in zip(model.named_parameters(), before, ref.parameters()):
        assert p.device.type == DEVICE and torch.isfinite(p).all(), name
        assert opt.state[p]["exp_avg"].device.type == DEVICE, name
        if p.ndim >= 2:  # weight decay alone moves every weight matrix
            assert not torch.equal(p, p0), f"{name} did not change"
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_gpu_decode_matches_cpu_decode() -> None:
    """build_loader(gpu_decode=True) decodes on DEVICE; the same batch decoded by torchvision on the CPU differs
    only by JPEG decoder rounding (nvJPEG vs libjpeg-turbo: chroma upsampling and IDCT)."""
    dc = DataConfig(input_size=48, mean=CIFAR10_MEAN, std=CIFAR10_STD, interpolation="bicubic", crop_pct=0.875)
    # 33 test images over all classes; 32 px sources: center crop 28 px, bicubic up to 48 (crop and resize run)
    ds = Subset(build_dataset(str(SAMPLE), name="imagefolder", split="test", train=False), range(0, 1000, 31))

    def first_batch(decoder: GpuDecoder | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
        # in_memory=False: 32 px images would otherwise take the in-memory path, which never decodes on the GPU
        loader = build_loader(ds, data_config=dc, train=False, batch_size=len(ds), in_memory=False,
                              gpu_decode=True)
        if decoder is not None:
            loader.post_fn = decoder
        images, targets = next(iter(loader))
        return loader, images, targets

    loader, images, targets = first_batch()
    assert isinstance(loader.post_fn, GpuDecoder) and loader.post_fn.device.type == DEVICE
    _, ref, ref_targets = first_batch(GpuDecoder(dc, "cpu"))
    assert images.device.type == DEVICE and ref.device.type == "cpu"
    assert images.shape == ref.shape == (len(ds), 3, 48, 48) and images.dtype == ref.dtype == torch.float32
    assert torch.equal(targets.cpu(), ref_targets)
    mean, std = dc.pixel_mean_std()
    pixels, ref_pixels = images.cpu() * std + mean, ref * std + mean  # back to 0-255 units
    assert ref_pixels.min() >= -0.01 and ref_pixels.max() <= 255.01 and ref_pixels.std() > 20  # real images
    diff = pixels - ref_pixels
    mad, worst = diff.abs().mean().item(), diff.abs().max().item()
    bias = diff.mean(dim=(0, 2, 3)).abs().max().item()  # per channel: a color conversion shift shows here
    assert mad < 2.5 and worst < 48 and bias < 1.5, f"mean |diff| {mad:.3f}, max {worst:.1f}, channel bias {bias:.3f}"


def test_checkpoint_from_a_cuda_model_is_plain_fp32_on_the_cpu(tmp_path: Path) -> None:
    """Trained on DEVICE under bf16 autocast with channels_last weights (the patch conv's weight is not
    contiguous), saved, loaded on the CPU: contiguous fp32 CPU tensors, and the CPU model computes what the
    device model computes in fp32."""
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=2).to(DEVICE).to(memory_format=torch.channels_last)
    assert not model.patch_embed.proj.weight.is_contiguous()
    opt = create_optimizer(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    for _ in range(2):
        x, y = torch.randn(8, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (8,), device=DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, model_name="vit_n_4_32",
                           data_config=DataConfig(input_size=32), step=2)
    ck = load_checkpoint(path)
    assert ck.model_name == "vit_n_4_32" and ck.step == 2 and ck.data_config.input_size == 32
    live = model.state_dict()
    assert ck.state_dict.keys() == live.keys()
    for k, t in ck.state_dict.items():
        assert t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous(), (k, t.device, t.dtype)
        assert torch.equal(t, live[k].cpu()), k
    cpu_model = ck.build_model()
    assert all(p.device.type == "cpu" for p in cpu_model.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out_cpu, out_dev = cpu_model(x), model(x.to(DEVICE)).cpu()
    assert torch.isfinite(out_cpu).all() and rel(out_cpu, out_dev) < 1e-4


def test_compiled_model_matches_eager_forward_and_gradients() -> None:
    """One torch.compile (forward + backward graphs) of a 1-block model. Train mode, where the gradients are;
    every dropout rate is 0, so the forward is the eval forward."""
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=1).to(DEVICE).train()
    x, y = torch.randn(16, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (16,), device=DEVICE)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = fn(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    out_eager, grads_eager = step(model)
    out_comp, grads_comp = step(torch.compile(model))  # shares the parameters with `model`
    assert torch.isfinite(out_comp).all() and rel(out_comp, out_eager) < 1e-4
    assert grads_comp.keys() == grads_eager.keys()
    flat = [torch.cat([g[n].flatten() for n in grads_eager]) for g in (grads_comp, grads_eager)]
    assert rel(*flat) < 1e-4
    for n, g in grads_eager.items():
        assert rel(grads_comp[n], g) < 1e-3, n


def test_torchrun_smoke_run_trains_and_saves(smoke_run: dict[str, Any]) -> None:
    """torchrun with one process runs the real train command on DEVICE and saves a CPU-loadable checkpoint.

    With one process vitkit creates no process group (launch.init_distributed: world size 1 is a plain
    process), so the NCCL part is checked directly: a 1-rank group with the backend string vitkit uses on
    GPUs, and an all-reduce of a device tensor through it."""
    proc = smoke_run["proc"]
    try:
        rc = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the torchrun smoke run did not finish in 240 s")
    stdout, stderr = smoke_run["stdout"].read_text(), smoke_run["stderr"].read_text()
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert "global batch 8 = batch_size 8 per process x 1 process x 1" in stdout
    run_dir: Path = smoke_run["run_dir"]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["device"].startswith(DEVICE) and ("gpu" in info) == GPU
    ck = load_checkpoint(run_dir / "last.safetensors")
    assert ck.step == 8 and ck.epoch == 2 and ck.model_name == "vit_n_4_32"
    assert ck.config["device"] == DEVICE and ck.config["distribute"] is True and ck.config["world_size"] == 1
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ck.state_dict.values())
    model = ck.build_model()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()

    backend = "cpu:gloo,cuda:nccl" if GPU else "gloo"  # what launch.init_distributed asks for
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert ("nccl" if GPU else "gloo") in dist.get_backend_config()
        t = torch.arange(4.0, device=DEVICE)
        dist.all_reduce(t)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        dist.destroy_process_group()
