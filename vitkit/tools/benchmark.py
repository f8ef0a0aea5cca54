"""`vitkit benchmark`: images/s, step time, peak memory and MFU of a registered model, optionally beside timm.

Our model and the reference run in the same process, on the same batch, interleaved repeat by repeat, and
the median is reported, so a busy machine slows both alike. Compile warm-up is excluded from every figure.

The reference of a backbone-family name (DINOv2, SigLIP, CLIP, EVA-02, ROPE-ViT, DINOv3, DeiT III) is timm's own
model of that name (`timm.create_model(timm name, pretrained=False)`: VisionTransformer or Eva, with timm's own
layers, e.g. EVA-02 B's separate q/k/v and SwiGLU projections), holding our weights (`vitkit_to_eva` for Eva);
for the plain names it is timm's VisionTransformer built from the same ViTConfig.

    vitkit benchmark --model vit_b_32_224 --batch_size 8 --compare timm
    vitkit benchmark --model vit_s_14_reg4_dinov2 --batch_size 4 --mode infer --compare timm
    vitkit benchmark --model vit_b_16_224 --batch_size 256 --precision bf16 --compile --compare timm
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F

from vitkit.args import VerbParser, at_least
from vitkit.engine.optim import create_optimizer
from vitkit.engine.runtime import keep_large_blocks, pick_device, setup_tf32
from vitkit.models import create_model, get_spec
from vitkit.models.registry import count_macs, timm_model_name
from vitkit.models.vit import ViTConfig, VisionTransformer
from vitkit.weights.formats import is_eva, vitkit_to_eva

# Dense peak FLOP/s from the vendors' data sheets (no sparsity), for MFU. Keys are substrings of device names.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},  # SXM; fp32 figure is TF32
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    impl: str
    mode: str
    images_per_s: float
    step_ms: float
    peak_mem_mb: float | None
    mfu: float | None
    warmup_s: float = 0.0  # the untimed warm-up steps (compilation and autotuning with --compile)
    # vitkit's row beside a reference: the median over repeats of ref's time / vitkit's in the same repeat (the
    # two ran back to back), which cancels the machine's drift that a ratio of medians keeps
    paired_ratio: float | None = None


def timm_twin(cfg: ViTConfig, timm_model: str | None = None) -> torch.nn.Module:
    """timm's model with the same architecture (the reference we compare against): `timm_model` (a backbone
    family's timm name, `timm_model_name`) built by timm with cfg's depth, input size and head, else timm's
    VisionTransformer built from cfg (registers, no_embed_class, "map" pooling, quick GELU and packed SwiGLU
    included; RoPE needs timm's Eva, i.e. a timm name). One combination is the same work but not the same
    function: "map" with SwiGLU, whose pool MLP timm runs with the blocks' SiLU, vitkit with cfg.act."""
    import timm
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if timm_model is not None:
        return timm.create_model(timm_model, pretrained=False, depth=cfg.depth, img_size=cfg.img_size,
                                 num_classes=cfg.num_classes, global_pool=cfg.global_pool)
    if cfg.rope != "none" or cfg.scale_mlp_norm:
        raise ValueError("timm's VisionTransformer has no RoPE or MLP norm; compare a backbone-family name "
                         "(its timm twin is timm's Eva)")
    glu = cfg.mlp == "swiglu"
    act = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}[cfg.act]
    return TimmViT(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, init_values=cfg.init_values, class_token=cfg.class_token,
        reg_tokens=cfg.reg_tokens, no_embed_class=cfg.no_embed_class, global_pool=cfg.global_pool,
        fc_norm=cfg.fc_norm, pre_norm=cfg.pre_norm, dynamic_img_size=cfg.dynamic_img_size,
        pos_embed="learn" if cfg.pos_embed == "learn" else "none",
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps),
        act_layer=torch.nn.SiLU if glu else act, **({"mlp_layer": SwiGLUPacked} if glu else {}),
    )


def same_weights(ref: torch.nn.Module, ours: VisionTransformer) -> torch.nn.Module:
    """`ref` (timm's twin) holding `ours`'s weights, loaded strictly (so it is the same architecture)."""
    like = ref.state_dict()
    sd = ours.state_dict()
    ref.load_state_dict(vitkit_to_eva(sd, like) if is_eva(like) else sd)
    return ref


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[precision]
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(impl: str, model: torch.nn.Module, same_optimizer: bool) -> torch.optim.Optimizer:
    """AdamW as each toolkit's trainer builds it (vitkit: `engine.optim`; timm: `timm.optim.create_optimizer_v2`,
    what timm's train.py uses), or with `same_optimizer` torch's fused AdamW for both, to compare models alone."""
    if same_optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    if impl == "timm":
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)
    return create_optimizer(model, opt="adamw", lr=1e-4, weight_decay=0.05)  # the device is the parameters'


def make_step(model: torch.nn.Module, x: torch.Tensor, mode: str, precision: str,
              opt: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One training step (forward, CE loss, backward, `opt`) or one inference forward (`opt` unused)."""
    device = x.device
    dtype = DTYPES[precision]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast():
                model(x)
        return infer
    if opt is None:
        raise ValueError("a train step needs its optimizer (make_optimizer)")
    model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    y = torch.randint(0, max(model.num_classes, 1), (x.shape[0],), device=device)

    def train() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return train


def time_steps(step: Callable[[], None], device: torch.device, steps: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def run(
    model_name: str, batch_size: int, *, mode: str = "both", precision: str = "fp32", compile: bool = False,
    compare: str | None = None, steps: int = 5, warmup: int = 2, repeats: int = 3, device: str = "auto",
    img_size: int | None = None, same_optimizer: bool = False, peak_tflops: float | None = None,
) -> list[Result]:
    """Median images/s of each implementation; MFU against `peak_tflops` (a measured ceiling) when given, else
    against the data sheet's dense peak of a known GPU."""
    dev = pick_device(device)
    setup_tf32(dev)  # the fp32 fast path on Ampere and later, as training uses
    if dev.type == "cpu" and compare:
        # Both models' weights from the same heap: with glibc's defaults the model built first (vitkit's) gets each
        # large weight in an mmap of its own and the one built after partly from the heap, which alone made DeiT III
        # 0.935x timm when it was the process's first model and 1.064x when it was the second (2026-12-06, AMD
        # EPYC); with this both ways measured 1.056-1.068x.
        keep_large_blocks()
    torch.manual_seed(0)
    ours = create_model(model_name, img_size=img_size).to(dev)
    impls = {"vitkit": ours}
    if compare == "timm":
        ref = same_weights(timm_twin(ours.cfg, timm_model_name(model_name)), ours)  # same weights: same work
        impls["timm"] = ref.to(dev)
    elif compare:
        raise SystemExit(f"--compare supports 'timm', got {compare!r}")
    size = ours.cfg.img_size
    x = torch.randn(batch_size, ours.cfg.in_chans, size, size, device=dev)
    macs = count_macs(ours.cfg)
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(dev, precision)
    results: list[Result] = []
    for m in (["infer", "train"] if mode == "both" else [mode]):
        steps_fns, warm = {}, {}
        for name, model in impls.items():
            fn_model = torch.compile(model) if compile else model
            opt = make_optimizer(name, model, same_optimizer) if m == "train" else None
            steps_fns[name] = make_step(fn_model, x, m, precision, opt)
            # compile and autotune happen here, outside every timing
            warm[name] = time_steps(steps_fns[name], dev, warmup) * warmup if warmup else 0.0
        times: dict[str, list[float]] = {n: [] for n in impls}
        mem: dict[str, float | None] = {}
        for r in range(repeats):  # interleave so that load on the machine hits both alike; alternate who goes
            order = list(steps_fns.items())  # first, so neither always runs on the other's warm caches
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                times[name].append(time_steps(fn, dev, steps))
                mem[name] = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        flops_per_image = (6 if m == "train" else 2) * macs  # backward costs about twice the forward
        others = [n for n in impls if n != "vitkit"]
        paired = (statistics.median(o / v for o, v in zip(times[others[0]], times["vitkit"], strict=True))
                  if others else None)
        for name in impls:
            t = statistics.median(times[name])
            ips = batch_size / t
            results.append(Result(name, m, ips, t * 1e3, mem[name], ips * flops_per_image / peak if peak else None,
                                  warm[name], paired if name == "vitkit" else None))
    return results


def format_table(results: Sequence[Result], header: str = "") -> str:
    lines = [header] if header else []
    lines.append("| impl | mode | images/s | step ms | peak mem MB | MFU | vitkit/ref | paired |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    by_mode: dict[str, dict[str, Result]] = {}
    for r in results:
        by_mode.setdefault(r.mode, {})[r.impl] = r
    for mode, rs in by_mode.items():
        for impl, r in rs.items():
            ratio = paired = ""
            if impl == "vitkit" and len(rs) > 1:
                other = next(v for k, v in rs.items() if k != "vitkit")
                ratio = f"{r.images_per_s / other.images_per_s:.3f}"
                paired = f"{r.paired_ratio:.3f}" if r.paired_ratio is not None else ""
            mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
            mem = f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else "-"
            cells = [impl, mode, f"{r.images_per_s:.1f}", f"{r.step_ms:.1f}", mem, mfu, ratio, paired]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> str:
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    try:
        import timm
        timm_v = timm.__version__
    except ImportError:
        timm_v = "-"
    return f"device: {dev}; torch {torch.__version__}; timm {timm_v}; python {platform.python_version()}"


def main(argv: Sequence[str]) -> int:
    p = VerbParser("benchmark", __doc__)
    p.add_argument("--model", default="vit_b_32_224")
    p.add_argument("--batch_size", type=at_least(1), default=8)
    p.add_argument("--img_size", type=int, default=None)
    p.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    p.add_argument("--precision", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (warm-up excluded)")
    p.add_argument("--compare", default=None, help="'timm': measure timm's same architecture in the same run")
    p.add_argument("--steps", type=at_least(1), default=5)
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--same_optimizer", action="store_true",
                   help="train both with torch's fused AdamW (the models alone) instead of each toolkit's own AdamW")
    p.add_argument("--peak_tflops", type=float, default=None, help="MFU against this measured ceiling")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(list(argv))
    get_spec(a.model)  # unknown names fail here with a suggestion
    results = run(a.model, a.batch_size, mode=a.mode, precision=a.precision, compile=a.compile, compare=a.compare,
                  steps=a.steps, warmup=a.warmup, repeats=a.repeats, device=a.device, img_size=a.img_size,
                  same_optimizer=a.same_optimizer, peak_tflops=a.peak_tflops)
    if a.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        head = (f"{a.model} batch {a.batch_size} {a.precision}{' compiled' if a.compile else ''}"
                f"{', same optimizer' if a.same_optimizer else ''}, "
                f"median of {a.repeats} x {a.steps} steps; {environment()}")
        print(format_table(results, head))
    return 0
