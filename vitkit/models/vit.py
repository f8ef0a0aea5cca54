"""The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929).

One model for every variant: a variant is a `ViTConfig` (see `registry.py`), never a copied class.
Parameter names follow timm's `VisionTransformer`, so timm state dicts load without any key mapping and
every other source (torchvision, transformers, JAX .npz, MindCV .ckpt) is converted to these names in
`vitkit/weights/`. timm's `Eva` (EVA-02, ROPE-ViT, DINOv3) differs in a few names only: `eva_to_vitkit` in
tests/test_backbones.py.

Numerics that differ between reference implementations are configuration, not code paths:
  - `norm_eps`: timm/torchvision/JAX use 1e-6, Hugging Face transformers 1e-12, MindSpore's LayerNorm 1e-7,
    OpenAI CLIP and DINOv3 1e-5.
  - `act`: "gelu" (exact erf) everywhere except MindSpore, whose nn.GELU defaults to the tanh approximation
    ("gelu_tanh", also SigLIP), and OpenAI CLIP's "quick_gelu" x * sigmoid(1.702 x) (timm `QuickGELU`).

The position embedding is one switch, `pos_embed`: "learn" (a parameter, timm's default), "sincos2d" (fixed 2-D
sin-cos, a buffer recomputed for each grid) or "none". Every reader goes through `_grid_pos_embed`.

The backbones of issue 15 are more switches on the same layers (timm file of each in brackets):
  - `reg_tokens`: register tokens (Darcet et al., "Vision Transformers Need Registers", arXiv 2309.16588;
    timm vision_transformer.py `reg_tokens`), a parameter `reg_token` (1, R, D) placed after the class token.
    `num_prefix_tokens` = class + registers; pooling and `forward_intermediates` skip all of them.
  - `no_embed_class`: the position embedding covers the patch tokens only and the prefix tokens are concatenated
    after adding it (DeiT-III, DINOv2 with registers; timm `no_embed_class`). `pos_embed_prefix_tokens` is then 0.
  - `global_pool="map"`: multihead attention pooling (SigLIP, Zhai et al. arXiv 2303.15343; big_vision MAPHead),
    timm layers/attention_pool.py `AttentionPoolLatent` as VisionTransformer(global_pool='map') builds it:
    a learned latent query attends over the patch tokens, then x + mlp(norm(x)) (`AttentionPool` here).
  - `mlp="swiglu"`: SwiGLU (Shazeer, arXiv 2002.05202) in timm's packed layout (layers/mlp.py `SwiGLUPacked` =
    GluMlp(gate_last=False), SiLU): one fc1 of width int(D * mlp_ratio) makes the gate and value halves,
    fc2 reads int(D * mlp_ratio) / 2. That is timm VisionTransformer's rule (vit_giant_patch14_dinov2 has
    mlp_ratio 2.66667 * 2: fc1 8192, fc2 4096); timm `Eva`'s `mlp_ratio` r gives the SwiGLU width itself,
    so Eva's r is 2 * int(D * r) / D here (EVA-02-T: 1024 / 192).
    `scale_mlp_norm`: a LayerNorm on the MLP's hidden activations before fc2 (NormFormer, arXiv 2110.09456;
    timm `scale_mlp_norm`, Eva `scale_mlp`: EVA-02 B and L).
  - `rope`: 2-D axial rotary position embedding (Su et al. RoFormer arXiv 2104.09864; Heo et al. "Rotary
    Position Embedding for Vision Transformer" arXiv 2403.13298) on q and k of the patch tokens, prefix tokens
    unrotated, in every block (timm models/eva.py `Eva(use_rot_pos_emb=True)`, layers/pos_embed_sincos.py):
      "eva":    timm `RotaryEmbeddingCat(in_pixels=False)`: integer grid positions (scaled by
                rope_ref_grid / grid when `rope_ref_grid` is set, EVA's `ref_feat_shape`), frequencies
                temperature ** (-i / (head_dim / 4)), interleaved pairs (x0, x1), (x2, x3)... (EVA-02, timm's
                ROPE-ViT axial models `vit_*_patch16_rope_224` with rope_grid_indexing "xy", temperature 100);
      "dinov3": timm `RotaryEmbeddingDinoV3` (Simeoni et al. arXiv 2508.10104): patch centres normalised to
                [-1, 1] per axis, angles 2 pi x / temperature ** (i / (head_dim / 4)), the "rotate half" layout.
    The table (H*W, 2 * head_dim) = [sin | cos] is a buffer for the native grid, recomputed for any other grid
    (it has no weights, so every input gets its own grid's table). The angles for one head are
    [axis 0 frequencies, axis 1 frequencies]; axis 0 is the row for "ij", the column for "xy" (timm
    `rope_grid_indexing`).
  - `pre_norm` also drops the patch embedding's bias, as timm (`bias=not pre_norm`, CLIP's conv1 has none).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one Vision Transformer. Everything the model's shape and numerics depend on."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0  # MLP width int(embed_dim * mlp_ratio); with mlp="swiglu" that is fc1's (both halves)
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # layer scale (CaiT / DeiT-III); None disables it
    class_token: bool = True
    reg_tokens: int = 0  # register tokens after the class token (Darcet et al. arXiv 2309.16588; timm)
    no_embed_class: bool = False  # pos_embed covers patch tokens only, prefix concatenated after (DeiT-III; timm)
    global_pool: str = "token"  # "token" | "avg" | "map" (SigLIP attention pooling, timm AttentionPoolLatent)
    fc_norm: bool | None = None  # None: True exactly when global_pool == "avg" (timm's rule)
    pre_norm: bool = False  # LayerNorm before the blocks, patch embedding without bias (CLIP-style, timm)
    norm_eps: float = 1e-6
    act: str = "gelu"  # "gelu" | "gelu_tanh" | "quick_gelu" (CLIP: x * sigmoid(1.702 x), timm QuickGELU)
    mlp: str = "mlp"  # "mlp" | "swiglu" (SiLU-gated, timm SwiGLUPacked: one fc1 for gate and value)
    scale_mlp_norm: bool = False  # LayerNorm inside the MLP before fc2 (EVA-02 B/L; timm scale_mlp_norm)
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 to this over the blocks
    dynamic_img_size: bool = False  # resample the position embedding to each input's grid on the fly
    pos_embed: str = "learn"  # "learn" | "sincos2d" | "none"
    rope: str = "none"  # "none" | "eva" | "dinov3": rotary embedding of q, k (module docstring; timm eva.py)
    rope_temperature: float = 10000.0  # RoPE frequency base (timm rope_temperature: EVA-02 1e4, ROPE-ViT/DINOv3 100)
    rope_grid_indexing: str = "ij"  # "ij" | "xy": which grid axis the first frequencies follow (ROPE-ViT: "xy")
    rope_ref_grid: int | None = None  # "eva" only: positions scaled to this grid (EVA-02 ref_feat_shape 16)

    def __post_init__(self) -> None:
        self._check_types_and_ranges()
        choices = {"global_pool": ("token", "avg", "map"), "act": ("gelu", "gelu_tanh", "quick_gelu"),
                   "mlp": ("mlp", "swiglu"), "pos_embed": ("learn", "sincos2d", "none"),
                   "rope": ("none", "eva", "dinov3"), "rope_grid_indexing": ("ij", "xy")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {', '.join(map(repr, allowed[:-1]))} or {allowed[-1]!r}, "
                                 f"got {getattr(self, name)!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {self.reg_tokens}")
        if self.pos_embed == "sincos2d" and self.embed_dim % 4:
            raise ValueError(f"pos_embed='sincos2d' needs embed_dim divisible by 4, got {self.embed_dim}")
        if self.mlp == "swiglu" and self.mlp_hidden % 2:
            raise ValueError(f"mlp='swiglu' needs an even fc1 width int(embed_dim * mlp_ratio), got {self.mlp_hidden}")
        if self.rope != "none" and self.head_dim % 4:
            raise ValueError(f"rope={self.rope!r} needs a head dim divisible by 4, got {self.head_dim}")
        if self.rope_ref_grid is not None and (self.rope != "eva" or self.rope_ref_grid <= 0):
            raise ValueError(f"rope_ref_grid must be a positive grid side for rope='eva', got {self.rope_ref_grid} "
                             f"with rope={self.rope!r}")

    def _check_types_and_ranges(self) -> None:
        """Each field's type (from its annotation; an int passes for a float), finite numbers, and the ranges
        a model can be built with: a description read from a file is checked before any layer is made."""
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}
        for f in fields(self):
            allowed = tuple(k for part in str(f.type).split("|") for k in kinds[part.strip()])
            value = getattr(self, f.name)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed) \
                    or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{f.name} must be {'a finite ' if 'float' in str(f.type) else ''}{f.type}, "
                                 f"got {value!r}")
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, value in (("num_classes", self.num_classes), ("reg_tokens", self.reg_tokens)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("mlp_ratio", "norm_eps", "rope_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        # Sizes no model reaches (ViT-22B: width 6144, MLP 24576, depth 48): a header claiming more is damaged, and
        # is refused here before even a shapes-only (meta) build overflows torch's size arithmetic.
        for name, value, limit in (("embed_dim", self.embed_dim, 2**16), ("depth", self.depth, 2**12),
                                   ("MLP width int(embed_dim * mlp_ratio)", self.mlp_hidden, 2**20),
                                   ("img_size", self.img_size, 2**16), ("in_chans", self.in_chans, 2**12),
                                   ("num_classes", self.num_classes, 2**24), ("reg_tokens", self.reg_tokens, 2**12)):
            if value > limit:
                raise ValueError(f"{name} {value} is beyond any model (at most {limit})")
        if self.mlp_hidden < 1:
            raise ValueError(f"MLP width int(embed_dim * mlp_ratio) must be >= 1, got {self.mlp_hidden}")
        for name in ("drop_rate", "pos_drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """fc1's width (timm's int(dim * mlp_ratio)); SwiGLU splits it into gate and value halves."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the class token, then the registers."""
        return (1 if self.class_token else 0) + self.reg_tokens

    @property
    def pos_embed_prefix_tokens(self) -> int:
        """Prefix tokens that have a row in the position embedding: none with `no_embed_class`."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> ViTConfig:
        return replace(self, **changes)


def _same_grid(new_grid: Sequence[Any], side: int) -> bool:
    """True when `new_grid` is (side, side) in plain ints. Traced sizes (torch.export, torch.compile, jit.trace)
    are never compared, so the graph is not specialised to the example input's grid."""
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    return not tracing and all(isinstance(n, int) for n in new_grid) and tuple(new_grid) == (side, side)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Sequence[Any],
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a learned position embedding (1, prefix + H*W, D) to a new (H', W') grid.

    Same recipe as timm's `resample_abs_pos_embed`: prefix tokens kept, the grid interpolated in float32
    with bicubic + antialias, so weights resampled here equal weights resampled by timm. The new grid may be
    symbolic (ONNX / pt2 / TorchScript exports with dynamic sizes): there interpolating to the unchanged size
    stays in the graph, an exact identity for bicubic with align_corners=False (the taps fall on the centres).
    `num_prefix_tokens` is the count of prefix rows in `pos_embed` (0 for `no_embed_class` models).
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side, dim = math.isqrt(grid.shape[1]), grid.shape[-1]  # static: the parameter's shape
    if side * side != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} grid tokens, which is not a square grid")
    if _same_grid(new_grid, side):
        return pos_embed
    grid = grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid, size=(new_grid[0], new_grid[1]), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)  # (1, H'*W', D)
    return torch.cat([prefix, grid], dim=1)


def sincos_2d_pos_embed(grid: Sequence[Any], dim: int, num_prefix_tokens: int = 0,
                        temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (1, prefix + H*W, D), float32.

    big_vision's `posemb_sincos_2d` (big_vision/models/vit.py; Beyer et al., "Better plain ViT baselines",
    arXiv 2205.01580): D/4 frequencies 1 / temperature ** (i / (D/4 - 1)), features [sin x, cos x, sin y, cos y]
    over the row-major patch grid. Prefix tokens get zeros, as MAE's `get_2d_sincos_pos_embed(cls_token=True)`.
    """
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32),
                            indexing="ij")  # each (H, W)
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1))  # (D/4,)
    x = xs.reshape(-1, 1) * omega  # (H*W, D/4)
    y = ys.reshape(-1, 1) * omega
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (H*W, D)
    return torch.cat([pe.new_zeros(num_prefix_tokens, dim), pe])[None]


def rope_embed(grid: Sequence[Any], head_dim: int, kind: str = "eva", temperature: float = 10000.0,
               indexing: str = "ij", ref_grid: int | None = None) -> torch.Tensor:
    """Axial 2-D RoPE table (H*W, 2 * head_dim) = [sin | cos], float32, row-major over the patch grid.

    The numerics of timm's tables, op for op (layers/pos_embed_sincos.py; module docstring): "eva" is
    `RotaryEmbeddingCat(in_pixels=False)` (integer positions, optionally rescaled to `ref_grid`, interleaved
    layout), "dinov3" is `RotaryEmbeddingDinoV3` (centred positions in [-1, 1], 2 pi / period, half layout).
    The grid may be symbolic (exports with dynamic sizes).
    """
    quarter = head_dim // 4  # frequencies per axis
    axes = []
    for side in (grid[0], grid[1]):
        t = torch.arange(side, dtype=torch.float32)
        if kind == "dinov3":
            t = (t + 0.5) / side  # patch centres in (0, 1), each axis by its own size ('separate')
        elif ref_grid is not None:
            t = t / side * ref_grid
        axes.append(t)
    rows, cols = torch.meshgrid(axes[0], axes[1], indexing="ij")  # each (H, W)
    coords = torch.stack([rows, cols] if indexing == "ij" else [cols, rows], dim=-1).reshape(-1, 2)  # (H*W, 2)
    steps = torch.arange(quarter, dtype=torch.float32)
    if kind == "dinov3":
        periods = temperature ** (2.0 * steps / (head_dim // 2))
        angles = (2 * math.pi * (2.0 * coords - 1.0)[:, :, None] / periods).flatten(1)  # (H*W, head_dim / 2)
        sin, cos = angles.sin(), angles.cos()
        sin, cos = torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)  # [f0, f1, .., f0, f1, ..]
    else:
        freqs = 1.0 / temperature ** (steps / quarter)
        angles = (coords[:, :, None] * freqs).flatten(1)
        sin, cos = angles.sin(), angles.cos()
        sin, cos = (torch.stack([t, t], dim=-1).flatten(-2) for t in (sin, cos))  # [f0, f0, f1, f1, ..]
    return torch.cat([sin, cos], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool) -> torch.Tensor:
    """Rotate the patch tokens of x (B, heads, prefix + H*W, head_dim) by a `rope_embed` table; the prefix
    tokens pass unchanged. `half`: pairs (x_i, x_{i + head_dim/2}) ("dinov3"), else (x_2i, x_2i+1) ("eva")."""
    prefix, x = x[:, :, :num_prefix_tokens], x[:, :, num_prefix_tokens:]
    sin, cos = rope.chunk(2, dim=-1)
    if half:
        first, second = x.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return torch.cat([prefix, (x * cos + turned * sin).to(prefix.dtype)], dim=2)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, D) with one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's GELU approximation (timm layers/activations.py `QuickGELU`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    return nn.SiLU() if name == "silu" else nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens  # not rotated by RoPE
        self.rope_half = cfg.rope == "dinov3"
        self.attn_drop = cfg.attn_drop_rate
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim * 3, bias=cfg.qkv_bias)
        norm = (lambda: nn.LayerNorm(self.head_dim, eps=cfg.norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.proj_drop = nn.Dropout(cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor, num_queries: int | None = None, rope: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with `num_queries` n, only the first n tokens attend (-> (B, n, D)).
        `rope` (a `rope_embed` table) rotates q and k of the patch tokens after the q/k norms, as timm's Eva."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope, self.num_prefix_tokens, self.rope_half)
            k = apply_rope(k, rope, self.num_prefix_tokens, self.rope_half)
        if num_queries is not None:
            q, N = q[:, :, :num_queries], num_queries
        # SDPA picks flash / memory-efficient kernels on GPU; scale defaults to head_dim ** -0.5.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """fc1 -> act -> [norm] -> fc2 (timm `Mlp`). `glu`: fc1 gives [gate, value] halves, act(gate) * value, so
    fc2 reads half of fc1's width (timm `GluMlp(gate_last=False)`, i.e. `SwiGLUPacked` with SiLU)."""

    def __init__(self, dim: int, hidden: int, act: str, glu: bool = False, norm_eps: float | None = None,
                 drop: float = 0.0):
        super().__init__()
        inner = hidden // 2 if glu else hidden
        self.glu = glu
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.norm = nn.LayerNorm(inner, eps=norm_eps) if norm_eps is not None else nn.Identity()
        self.fc2 = nn.Linear(inner, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.glu:
            gate, x = x.chunk(2, dim=-1)
            x = self.act(gate) * x
        else:
            x = self.act(x)
        return self.drop(self.fc2(self.norm(self.drop(x))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        scale = (lambda: LayerScale(cfg.embed_dim, cfg.init_values)) if cfg.init_values else nn.Identity
        path = (lambda: DropPath(drop_path)) if drop_path > 0 else nn.Identity
        glu = cfg.mlp == "swiglu"
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1, self.drop_path1 = scale(), path()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_hidden, "silu" if glu else cfg.act, glu,
                       cfg.norm_eps if cfg.scale_mlp_norm else None, cfg.proj_drop_rate)
        self.ls2, self.drop_path2 = scale(), path()

    def forward(self, x: torch.Tensor, num_queries: int | None = None, rope: torch.Tensor | None = None
                ) -> torch.Tensor:
        """With `num_queries` n, only the first n tokens are updated and returned (the others still attend)."""
        y = self.attn(self.norm1(x), num_queries, rope)
        x = (x if num_queries is None else x[:, :num_queries]) + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AttentionPool(nn.Module):
    """global_pool="map": a learned latent query attends over the tokens (one head split like the blocks'),
    then x + mlp(norm(x)); timm `AttentionPoolLatent` as VisionTransformer(global_pool='map') builds it (q, kv
    and proj with bias, no q/k norm, the blocks' mlp_ratio / act / norm, a plain MLP even in SwiGLU models)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, D))
        self.q = nn.Linear(D, D)
        self.kv = nn.Linear(D, 2 * D)
        self.proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mlp = Mlp(D, cfg.mlp_hidden, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D)."""
        B, N, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D))
        return (x + self.mlp(self.norm(x)))[:, 0]


class VisionTransformer(nn.Module):
    model_name: str | None  # the registry name it was built as (`create_model`); None for a bare config
    pretrained_cfg: dict[str, Any] | None  # where its weights came from (`vitkit.weights.fit_weights`)
    pos_embed: torch.Tensor | None  # a parameter ("learn"), a non-persistent buffer ("sincos2d") or None
    rope: torch.Tensor | None  # the native grid's RoPE table (non-persistent buffer), None without RoPE

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.model_name = self.pretrained_cfg = None
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grad_checkpointing = False
        self.backbone_frozen = False  # freeze_backbone(): a linear probe
        D, grid = cfg.embed_dim, (cfg.grid_size, cfg.grid_size)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, bias=not cfg.pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        if cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_prefix_tokens + cfg.grid_size**2, D))
        else:  # fixed values are not weights: kept out of the state dict, rebuilt on load
            pe = sincos_2d_pos_embed(grid, D, cfg.pos_embed_prefix_tokens) if cfg.pos_embed == "sincos2d" else None
            self.register_buffer("pos_embed", pe, persistent=False)
        self.register_buffer("rope", self._rope_table(grid), persistent=False)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        # stochastic depth decay rule: rate i = drop_path_rate * i / (depth - 1)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[Block(cfg, rate) for rate in rates])
        self.norm = nn.Identity() if cfg.use_fc_norm else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn_pool = AttentionPool(cfg) if cfg.global_pool == "map" else None
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- initialisation (timm's default scheme) -------------------------------------------------
    def init_weights(self) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.attn_pool is not None:  # timm: trunc_normal_tf_(latent, std=D ** -0.5), cut at 2 std
            std = self.embed_dim**-0.5
            nn.init.trunc_normal_(self.attn_pool.latent, std=std, a=-2 * std, b=2 * std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- the model contract ----------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | ({"reg_token"} if self.reg_token is not None else set())  # as timm

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def freeze_backbone(self) -> None:
        """A linear probe (DINOv2's, CLIP's protocol): every parameter but the head's stops taking gradients,
        and every module but the head stays in eval mode through `train()` (no dropout or drop path in the
        frozen features). The head (and the dropout before it) trains as usual."""
        if self.num_classes == 0:
            raise ValueError("a model without a head (num_classes 0) has nothing to train in a linear probe")
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith("head."))
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> VisionTransformer:
        super().train(mode)
        if self.backbone_frozen:
            for module in self.children():
                if module is not self.head and module is not self.head_drop:
                    module.eval()
        return self

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (fresh init) for `num_classes` outputs; 0 removes it."""
        if global_pool is not None and global_pool != self.cfg.global_pool:
            raise ValueError("changing global_pool would change which norm layers exist; build a new model")
        self.num_classes = num_classes
        self.cfg = self.cfg.replace(num_classes=num_classes)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.head.to(self.patch_embed.proj.weight.device)

    def set_input_size(self, img_size: int) -> None:
        """Change the native input size: a learned position embedding is resampled (bicubic, as timm), fixed
        tables (sincos2d, RoPE) are recomputed for the new grid."""
        grid = img_size // self.cfg.patch_size
        with torch.no_grad():
            new = self._grid_pos_embed((grid, grid))
            rope = self._grid_rope((grid, grid))
        self.pos_embed = nn.Parameter(new) if isinstance(self.pos_embed, nn.Parameter) else new
        self.rope = rope
        self.cfg = self.cfg.replace(img_size=img_size)

    def _grid_pos_embed(self, grid_hw: Sequence[Any]) -> torch.Tensor | None:
        """The position embedding (1, rows + H*W, D) for a (H, W) patch grid, rows = `pos_embed_prefix_tokens`;
        sizes may be symbolic (export)."""
        pe = self.pos_embed
        if pe is None or _same_grid(grid_hw, self.cfg.grid_size):
            return pe
        if self.cfg.pos_embed == "sincos2d":  # recomputed, not interpolated: the formula holds for any grid
            return sincos_2d_pos_embed(grid_hw, self.embed_dim, self.cfg.pos_embed_prefix_tokens).to(pe)
        return resample_pos_embed(pe, grid_hw, self.cfg.pos_embed_prefix_tokens)

    def _rope_table(self, grid_hw: Sequence[Any]) -> torch.Tensor | None:
        cfg = self.cfg
        if cfg.rope == "none":
            return None
        return rope_embed(grid_hw, cfg.head_dim, cfg.rope, cfg.rope_temperature, cfg.rope_grid_indexing,
                          cfg.rope_ref_grid)

    def _grid_rope(self, grid_hw: Sequence[Any]) -> torch.Tensor | None:
        """The RoPE table for a (H, W) patch grid, whatever `dynamic_img_size` (it has no weights to resample)."""
        if self.rope is None or _same_grid(grid_hw, self.cfg.grid_size):
            return self.rope
        return self._rope_table(grid_hw).to(self.rope)

    def _pos_embed(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        pos_embed = self._grid_pos_embed(grid_hw) if self.cfg.dynamic_img_size else self.pos_embed
        if pos_embed is not None and self.cfg.no_embed_class:  # add to the patches, then prepend the prefix
            x, pos_embed = x + pos_embed, None
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        return self.pos_drop(x if pos_embed is None else x + pos_embed)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """Images -> (tokens (B, prefix + H*W, D), patch grid (H, W), its RoPE table or None)."""
        grid_hw = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)
        x = self._pos_embed(self.patch_embed(x), grid_hw)  # (B, prefix + H*W, D)
        return self.norm_pre(x), grid_hw, self._grid_rope(grid_hw)

    def _run_block(self, block: nn.Module, x: torch.Tensor, num_queries: int | None = None,
                   rope: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(block, x, num_queries, rope, use_reentrant=False)
        return block(x, num_queries, rope)

    def forward_features(self, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """Images (B, C, H, W) -> normed tokens (B, prefix + H/p * W/p, D).

        `class_token_only` returns just the class token (B, 1, D), the only output token-pooling reads: the
        last block then updates only that token (its attention still reads every token), which skips most of
        that block's work, about 6% of the model at depth 12, with the same result up to float rounding (~1e-6).
        """
        x, _, rope = self._embed(x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x, 1 if class_token_only and i == last else None, rope)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn_pool is not None:  # timm VisionTransformer: the patch tokens only
            return self.attn_pool(x[:, self.num_prefix_tokens :])
        if self.cfg.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, class_token_only=self.cfg.global_pool == "token"))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of chosen blocks. `indices`: an int n takes the last n blocks; a list takes those blocks
        (negative counts from the end); None takes all. Returns (final features, intermediates) unless
        `intermediates_only`. Intermediates drop the prefix tokens (class and registers); NCHW gives
        (B, D, H/p, W/p), NLC (B, L, D).
        """
        depth = len(self.blocks)
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            take = list(range(depth - indices, depth))
        else:
            take = [i % depth for i in indices]
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        x, (h, w), rope = self._embed(x)
        intermediates = []
        last = depth if not intermediates_only else max(take) + 1
        for i, block in enumerate(self.blocks[:last]):
            x = self._run_block(block, x, None, rope)
            if i in take:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens :]
                if output_fmt == "NCHW":
                    y = y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def count_params(model: nn.Module | ViTConfig) -> int:
    """Parameters (not buffers) of a model, or of the model a config builds (on the meta device: no memory)."""
    if isinstance(model, ViTConfig):
        with torch.device("meta"):
            model = VisionTransformer(model)
    return sum(p.numel() for p in model.parameters())


__all__ = ["ViTConfig", "VisionTransformer", "resample_pos_embed", "sincos_2d_pos_embed", "rope_embed",
           "count_params"]
