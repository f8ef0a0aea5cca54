"""The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929).

One model for every variant: a variant is a `ViTConfig` (see `registry.py`), never a copied class.
Parameter names follow timm's `VisionTransformer`, so timm state dicts load without any key mapping and
every other source (torchvision, transformers, JAX .npz, MindCV .ckpt) is converted to these names in
`vitkit/weights/`.

Numerics that differ between reference implementations are configuration, not code paths:
  - `norm_eps`: timm/torchvision/JAX use 1e-6, Hugging Face transformers 1e-12, MindSpore's LayerNorm 1e-7.
  - `act`: "gelu" (exact erf) everywhere except MindSpore, whose nn.GELU defaults to the tanh approximation.

The position embedding is one switch, `pos_embed`: "learn" (a parameter, timm's default), "sincos2d" (fixed 2-D
sin-cos, a buffer recomputed for each grid) or "none". Every reader goes through `_grid_pos_embed`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
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
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # layer scale (CaiT / DeiT-III); None disables it
    class_token: bool = True
    global_pool: str = "token"  # "token" | "avg"
    fc_norm: bool | None = None  # None: True exactly when global_pool == "avg" (timm's rule)
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP-style)
    norm_eps: float = 1e-6
    act: str = "gelu"  # "gelu" | "gelu_tanh"
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 to this over the blocks
    dynamic_img_size: bool = False  # resample the position embedding to each input's grid on the fly
    pos_embed: str = "learn"  # "learn" | "sincos2d" | "none"

    def __post_init__(self) -> None:
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"act must be 'gelu' or 'gelu_tanh', got {self.act!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.pos_embed not in ("learn", "sincos2d", "none"):
            raise ValueError(f"pos_embed must be 'learn', 'sincos2d' or 'none', got {self.pos_embed!r}")
        if self.pos_embed == "sincos2d" and self.embed_dim % 4:
            raise ValueError(f"pos_embed='sincos2d' needs embed_dim divisible by 4, got {self.embed_dim}")

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

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


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, D) with one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.attn_drop = cfg.attn_drop_rate
        self.qkv = nn.Linear(cfg.embed_dim, cfg.embed_dim * 3, bias=cfg.qkv_bias)
        norm = (lambda: nn.LayerNorm(self.head_dim, eps=cfg.norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.proj_drop = nn.Dropout(cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with `num_queries` n, only the first n tokens attend (-> (B, n, D))."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if num_queries is not None:
            q, N = q[:, :, :num_queries], num_queries
        q, k = self.q_norm(q), self.k_norm(k)
        # SDPA picks flash / memory-efficient kernels on GPU; scale defaults to head_dim ** -0.5.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.act = nn.GELU(approximate="tanh" if cfg.act == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


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
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1, self.drop_path1 = scale(), path()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.ls2, self.drop_path2 = scale(), path()

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """With `num_queries` n, only the first n tokens are updated and returned (the others still attend)."""
        y = self.attn(self.norm1(x), num_queries)
        x = (x if num_queries is None else x[:, :num_queries]) + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    model_name: str | None  # the registry name it was built as (`create_model`); None for a bare config
    pretrained_cfg: dict[str, Any] | None  # where its weights came from (`vitkit.weights.fit_weights`)
    pos_embed: torch.Tensor | None  # a parameter ("learn"), a non-persistent buffer ("sincos2d") or None

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.model_name = self.pretrained_cfg = None
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grad_checkpointing = False
        D = cfg.embed_dim

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        if cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.grid_size**2, D))
        else:  # fixed values are not weights: kept out of the state dict, rebuilt on load
            grid = (cfg.grid_size, cfg.grid_size)
            pe = sincos_2d_pos_embed(grid, D, cfg.num_prefix_tokens) if cfg.pos_embed == "sincos2d" else None
            self.register_buffer("pos_embed", pe, persistent=False)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        # stochastic depth decay rule: rate i = drop_path_rate * i / (depth - 1)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[Block(cfg, rate) for rate in rates])
        self.norm = nn.Identity() if cfg.use_fc_norm else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- initialisation (timm's default scheme) -------------------------------------------------
    def init_weights(self) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- the model contract ----------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

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
        """Change the native input size: a learned position embedding is resampled (bicubic, as timm)."""
        grid = img_size // self.cfg.patch_size
        with torch.no_grad():
            new = self._grid_pos_embed((grid, grid))
        self.pos_embed = nn.Parameter(new) if isinstance(self.pos_embed, nn.Parameter) else new
        self.cfg = self.cfg.replace(img_size=img_size)

    def _grid_pos_embed(self, grid_hw: Sequence[Any]) -> torch.Tensor | None:
        """The position embedding (1, prefix + H*W, D) for a (H, W) patch grid; sizes may be symbolic (export)."""
        pe = self.pos_embed
        if pe is None or _same_grid(grid_hw, self.cfg.grid_size):
            return pe
        if self.cfg.pos_embed == "sincos2d":  # recomputed, not interpolated: the formula holds for any grid
            return sincos_2d_pos_embed(grid_hw, self.embed_dim, self.num_prefix_tokens).to(pe)
        return resample_pos_embed(pe, grid_hw, self.num_prefix_tokens)

    def _pos_embed(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        pos_embed = self._grid_pos_embed(grid_hw) if self.cfg.dynamic_img_size else self.pos_embed
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x if pos_embed is None else x + pos_embed)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid_hw = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)
        x = self._pos_embed(self.patch_embed(x), grid_hw)  # (B, prefix + H*W, D)
        return self.norm_pre(x), grid_hw

    def _run_block(self, block: nn.Module, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(block, x, num_queries, use_reentrant=False)
        return block(x, num_queries)

    def forward_features(self, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """Images (B, C, H, W) -> normed tokens (B, prefix + H/p * W/p, D).

        `class_token_only` returns just the class token (B, 1, D), the only output token-pooling reads: the
        last block then updates only that token (its attention still reads every token), which skips most of
        that block's work, about 6% of the model at depth 12, with the same result up to float rounding (~1e-6).
        """
        x, _ = self._embed(x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x, 1 if class_token_only and i == last else None)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
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
        `intermediates_only`. Intermediates drop the prefix tokens; NCHW gives (B, D, H/p, W/p), NLC (B, L, D).
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
        x, (h, w) = self._embed(x)
        intermediates = []
        last = depth if not intermediates_only else max(take) + 1
        for i, block in enumerate(self.blocks[:last]):
            x = self._run_block(block, x)
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


__all__ = ["ViTConfig", "VisionTransformer", "resample_pos_embed", "sincos_2d_pos_embed", "count_params"]
