"""Issue 15 backbones: each new ViTConfig option against timm's own model of that family, same weights.

timm builds the reference (`timm.create_model(name, pretrained=False, ...)`, shrunk to 1-2 blocks and a narrow
width), every parameter gets noise (`perturb`) so LayerNorms, biases, layer scales, zero-initialised heads and the
attention pattern are all non-trivial, and its state dict loads strictly into the vitkit model: as is for timm's
VisionTransformer (DINOv2, SigLIP, CLIP), through `eva_to_vitkit` for timm's Eva (EVA-02, ROPE-ViT, DINOv3).
fp32, eval, CPU.
Each option also exports to ONNX (torch.onnx.export(dynamo=True) with dynamic batch and size, as `vitkit export`)
and onnxruntime matches eager at the native and at another size.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from vitkit.models.vit import ViTConfig, VisionTransformer, rope_embed

timm = pytest.importorskip("timm")


# -- helpers --------------------------------------------------------------------------------------------------

def eva_to_vitkit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `Eva` state dict (models/eva.py) in vitkit's (= timm VisionTransformer's) names.

    - blocks.i.gamma_1 / gamma_2 -> blocks.i.ls1.gamma / ls2.gamma (layer scale)
    - fused qkv with separate biases: attn.q_bias, attn.v_bias -> attn.qkv.bias = [q_bias, 0, v_bias]
      (Eva's k bias is a zero, non-persistent buffer; qkv.weight keeps its name)
    - unfused (qkv_fused=False, EVA-02 B/L): attn.q_proj / k_proj / v_proj .weight -> attn.qkv.weight (concatenated
      q, k, v), .bias -> attn.qkv.bias (k_proj has no bias: zeros)
    - SwiGLU with separate fc1 (scale_mlp or swiglu_align_to, EVA-02 B/L, DINOv3 S+/H+/7B): mlp.fc1_g / fc1_x
      -> mlp.fc1 = [fc1_g; fc1_x] (gate first, as SwiGLUPacked); mlp.norm and mlp.fc2 keep their names
    - everything else (cls_token, reg_token, pos_embed, patch_embed, norm1/2, attn.proj, mlp.fc1/fc2 of the packed
      GluMlp, norm, fc_norm, head) keeps its name; RoPE tables are buffers on both sides, not weights.
    """
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({m.group(1) for k in sd if (m := re.match(r"(blocks\.\d+\.)", k))})
    moved = re.compile(r"blocks\.\d+\.(attn\.(q_bias|v_bias|[qkv]_proj\..*)|mlp\.fc1_[gx]\..*)")
    for key, value in sd.items():
        if not moved.fullmatch(key):
            out[re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)] = value
    for b in blocks:
        a = b + "attn."
        if a + "q_proj.weight" in sd:
            out[a + "qkv.weight"] = torch.cat([sd[a + f"{n}_proj.weight"] for n in "qkv"])
        q_bias = sd.get(a + "q_bias", sd.get(a + "q_proj.bias"))
        v_bias = sd.get(a + "v_bias", sd.get(a + "v_proj.bias"))
        if q_bias is not None:
            out[a + "qkv.bias"] = torch.cat([q_bias, sd.get(a + "k_proj.bias", torch.zeros_like(q_bias)), v_bias])
        for p in ("weight", "bias"):
            if f"{b}mlp.fc1_g.{p}" in sd:
                out[f"{b}mlp.fc1.{p}"] = torch.cat([sd[f"{b}mlp.fc1_g.{p}"], sd[f"{b}mlp.fc1_x.{p}"]])
    return out


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights that make every part matter (module docstring): linear and conv weights get noise of std
    fan_in ** -0.5 (unit-variance outputs, attention far from uniform, so position encodings show), tokens and
    position embeddings std 0.5, layer scales about 0.5 (timm inits them at 1e-5), other vectors std 0.02."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            weight = p.ndim >= 2 and name.endswith("weight")
            std = p[0].numel() ** -0.5 if weight else 0.02 if p.ndim == 1 else 0.5
            p.add_(torch.randn(p.shape, generator=g) * std + (0.5 if "gamma" in name else 0.0))
    return model.eval()


def reference(name: str, **kw: object) -> torch.nn.Module:
    """timm's model `name`, shrunk by `kw`, perturbed."""
    torch.manual_seed(0)
    return perturb(timm.create_model(name, pretrained=False, **kw))


def ours(cfg: ViTConfig, ref: torch.nn.Module, eva: bool = False) -> VisionTransformer:
    """A vitkit model of `cfg` holding `ref`'s weights: a strict load, so the two have the same parameters."""
    model = VisionTransformer(cfg).eval()
    sd = ref.state_dict()
    model.load_state_dict(eva_to_vitkit(sd) if eva else sd, strict=True)
    return model


def images(h: int, w: int | None = None, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, h, w or h, generator=torch.Generator().manual_seed(seed))


def assert_same(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.01  # a real signal, not near-zero outputs
    assert (got - expected).abs().max().item() <= tol


def assert_same_model(model: VisionTransformer, ref: torch.nn.Module, x: torch.Tensor) -> None:
    """forward_features (all tokens, normed) and logits equal timm's."""
    with torch.no_grad():
        assert_same(model.forward_features(x), ref.forward_features(x))
        assert_same(model(x), ref(x))


def eva_mlp_ratio(dim: int, eva_ratio: float) -> float:
    """Eva's SwiGLU `mlp_ratio` r sizes the gated width int(dim * r); ours sizes fc1, both halves."""
    return 2 * int(dim * eva_ratio) / dim


# The published families, shrunk: timm's name and its overrides, and the same architecture as a ViTConfig.
SMALL = dict(depth=2, num_classes=10)
DINOV2_REG4 = ("vit_small_patch14_reg4_dinov2", dict(SMALL, embed_dim=96, num_heads=6, img_size=518),
               ViTConfig(img_size=518, patch_size=14, embed_dim=96, depth=2, num_heads=6, num_classes=10,
                         init_values=1e-5, reg_tokens=4, no_embed_class=True))
DINOV2_G_REG4 = ("vit_giant_patch14_reg4_dinov2", dict(SMALL, embed_dim=96, num_heads=6, img_size=224),
                 ViTConfig(img_size=224, patch_size=14, embed_dim=96, depth=2, num_heads=6, num_classes=10,
                           init_values=1e-5, reg_tokens=4, no_embed_class=True, mlp="swiglu", mlp_ratio=2.66667 * 2))
SIGLIP = ("vit_base_patch16_siglip_224", dict(SMALL, embed_dim=64, num_heads=4, img_size=64, act_layer="gelu_tanh"),
          ViTConfig(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                    class_token=False, global_pool="map", act="gelu_tanh"))
CLIP = ("vit_base_patch16_clip_quickgelu_224", dict(SMALL, embed_dim=64, num_heads=4, img_size=64),
        ViTConfig(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                  pre_norm=True, norm_eps=1e-5, act="quick_gelu"))
EVA02_T = ("eva02_tiny_patch14_224", dict(SMALL, embed_dim=96, num_heads=3),
           ViTConfig(img_size=224, patch_size=14, embed_dim=96, depth=2, num_heads=3, num_classes=10,
                     mlp="swiglu", mlp_ratio=eva_mlp_ratio(96, 4 * 2 / 3), global_pool="avg",
                     rope="eva", rope_ref_grid=16))
EVA02_B = ("eva02_base_patch14_224", dict(SMALL, embed_dim=96, num_heads=3),
           EVA02_T[2].replace(scale_mlp_norm=True))
ROPE_VIT = ("vit_small_patch16_rope_224", dict(SMALL, embed_dim=96, num_heads=3, img_size=64),
            ViTConfig(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=10,
                      init_values=1e-5, pos_embed="none", rope="eva", rope_temperature=100.0,
                      rope_grid_indexing="xy"))
DINOV3 = ("vit_small_patch16_dinov3", dict(SMALL, embed_dim=96, num_heads=3, img_size=64),
          ViTConfig(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=10,
                    qkv_bias=False, init_values=1e-5, reg_tokens=4, global_pool="avg", fc_norm=False,
                    norm_eps=1e-5, pos_embed="none", rope="dinov3", rope_temperature=100.0, dynamic_img_size=True))
DINOV3_QKVB = ("vit_small_patch16_dinov3_qkvb", DINOV3[1], DINOV3[2].replace(qkv_bias=True))
DINOV3_SPLUS = ("vit_small_plus_patch16_dinov3", DINOV3[1],  # SwiGLU, separate fc1_g / fc1_x, swiglu_align_to 8
                DINOV3[2].replace(mlp="swiglu", mlp_ratio=eva_mlp_ratio(96, 4.0)))
EVA_FAMILIES = {"eva02_tiny_patch14_224", "eva02_base_patch14_224", "vit_small_patch16_rope_224",
                "vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3"}


def build(family: tuple, **changes: object) -> tuple[VisionTransformer, torch.nn.Module]:
    """(vitkit model, timm model) of one family, both with `changes` (vitkit field names; timm's where they agree)."""
    name, kw, cfg = family
    ref = reference(name, **{**kw, **changes})
    return ours(cfg.replace(**changes), ref, eva=name in EVA_FAMILIES), ref


# -- the options, one family each -----------------------------------------------------------------------------

@pytest.mark.parametrize("size, patch, grid", [(224, 14, 16), (518, 14, 37), (224, 8, 28)])
def test_patch_14_and_8_grids(size: int, patch: int, grid: int) -> None:
    model = VisionTransformer(ViTConfig(img_size=size, patch_size=patch, embed_dim=32, depth=1, num_heads=2,
                                        num_classes=0, reg_tokens=4, no_embed_class=True))
    assert model.pos_embed.shape == (1, grid * grid, 32)  # no prefix rows with no_embed_class
    with torch.no_grad():
        tokens = model.forward_features(images(size, batch=1))
        (fmap,) = model.forward_intermediates(images(size, batch=1), indices=1, intermediates_only=True)
    assert tokens.shape == (1, 1 + 4 + grid * grid, 32) and fmap.shape == (1, 32, grid, grid)


@pytest.mark.parametrize("kw", [
    dict(reg_tokens=2),  # registers with their own pos_embed rows
    dict(reg_tokens=2, no_embed_class=True, global_pool="avg"),
    dict(no_embed_class=True),  # DeiT-III
    dict(reg_tokens=1, class_token=False, no_embed_class=True, global_pool="avg"),
], ids=["reg", "reg-no_embed_class-avg", "deit3", "reg-no_class-avg"])
def test_reg_tokens_and_no_embed_class_match_timm(kw: dict) -> None:
    shrink = dict(depth=2, num_classes=10, embed_dim=64, num_heads=4, img_size=32, patch_size=8)
    ref = reference("vit_base_patch16_224", **shrink, **kw)
    model = ours(ViTConfig(**shrink, **kw), ref)
    assert model.num_prefix_tokens == ref.num_prefix_tokens and model.pos_embed.shape == ref.pos_embed.shape
    x = images(32)
    assert_same_model(model, ref, x)
    with torch.no_grad():  # the intermediates skip every prefix token
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        expected = ref.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for g, e in zip(got, expected):
        assert_same(g, e)


@pytest.mark.parametrize("family", [DINOV2_REG4, DINOV2_G_REG4], ids=["dinov2_reg4", "dinov2_giant_swiglu_reg4"])
def test_dinov2_with_registers_matches_timm(family: tuple) -> None:
    model, ref = build(family)
    if family is DINOV2_G_REG4:  # timm's SwiGLUPacked widths: fc1 int(96 * 5.33334) = 512, fc2 reads 256
        assert model.blocks[0].mlp.fc1.out_features == 512 and model.blocks[0].mlp.fc2.in_features == 256
    x = images(family[2].img_size)
    assert_same_model(model, ref, x)
    with torch.no_grad():
        got, inter = model.forward_intermediates(x, indices=1, norm=True)
        expected, inter_ref = ref.forward_intermediates(x, indices=1, norm=True)
    assert_same(got, expected)
    assert inter[0].shape == (2, 96, family[2].grid_size, family[2].grid_size)
    assert_same(inter[0], inter_ref[0])


def test_dinov2_reg4_resampling_matches_timm() -> None:
    """no_embed_class: the pos_embed has no prefix rows, so the whole table is the grid (set_input_size and
    dynamic_img_size both resample it as timm does)."""
    model, ref = build(DINOV2_REG4, img_size=224)
    model.set_input_size(168)
    ref.set_input_size(img_size=(168, 168))
    assert model.pos_embed.shape == ref.pos_embed.shape == (1, 12 * 12, 96)
    assert (model.pos_embed - ref.pos_embed).abs().max() <= 1e-6
    assert_same_model(model, ref, images(168))
    model, ref = build(DINOV2_REG4, img_size=224, dynamic_img_size=True)
    assert_same_model(model, ref, images(196, 252))


def test_siglip_attention_pool_matches_timm() -> None:
    model, ref = build(SIGLIP)
    names = {k for k in model.state_dict() if k.startswith("attn_pool.")}
    assert names == {k for k in ref.state_dict() if k.startswith("attn_pool.")}
    assert {"attn_pool.latent", "attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.proj.weight",
            "attn_pool.norm.weight", "attn_pool.mlp.fc1.weight", "attn_pool.mlp.fc2.weight"} <= names
    assert_same_model(model, ref, images(64))
    with torch.no_grad():
        assert_same(model.forward_head(model.forward_features(images(64)), pre_logits=True),
                    ref.forward_head(ref.forward_features(images(64)), pre_logits=True))
    model.set_input_size(96)
    ref.set_input_size(img_size=(96, 96))
    assert_same_model(model, ref, images(96))
    model, ref = build(SIGLIP, dynamic_img_size=True)
    assert_same_model(model, ref, images(48, 80))


def test_siglip_init_follows_timm() -> None:
    model = VisionTransformer(SIGLIP[2].replace(embed_dim=256, num_heads=4))
    latent = model.attn_pool.latent
    assert latent.shape == (1, 1, 256) and 0.04 < latent.std().item() < 0.07  # trunc normal, std 256 ** -0.5
    assert latent.abs().max().item() <= 2 * 256**-0.5


def test_clip_pre_norm_and_quick_gelu_match_timm() -> None:
    model, ref = build(CLIP)
    assert "patch_embed.proj.bias" not in model.state_dict()  # timm: bias=not pre_norm
    assert_same_model(model, ref, images(64))
    x = torch.linspace(-4, 4, 101)
    assert torch.equal(model.blocks[0].mlp.act(x), x * torch.sigmoid(1.702 * x))


@pytest.mark.parametrize("family", [EVA02_T, EVA02_B], ids=["eva02_tiny_packed_swiglu", "eva02_base_scale_mlp"])
def test_eva02_swiglu_and_rope_match_timm(family: tuple) -> None:
    model, ref = build(family)
    assert_same_model(model, ref, images(224))
    # another resolution: timm moves the RoPE grid (ref_feat_shape 16 rescales the positions) and resamples the
    # pos_embed; so do we, in set_input_size and on the dynamic_img_size path
    model.set_input_size(280)
    ref.set_input_size(img_size=(280, 280))
    assert_same_model(model, ref, images(280))
    model, ref = build(family, dynamic_img_size=True)
    assert_same_model(model, ref, images(182, 252))


def test_rope_vit_axial_xy_matches_timm() -> None:
    model, ref = build(ROPE_VIT)
    assert_same_model(model, ref, images(64))
    model, ref = build(ROPE_VIT, dynamic_img_size=True)
    assert_same_model(model, ref, images(48, 96))  # non-square: the axes must not be swapped


@pytest.mark.parametrize("family", [DINOV3, DINOV3_QKVB, DINOV3_SPLUS], ids=["dinov3", "dinov3_qkvb", "dinov3_splus"])
@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_dinov3_matches_timm(family: tuple, global_pool: str) -> None:
    """timm's DINOv3 builds with dynamic_img_size=True: its RoPE follows each input's grid, as ours does. Token
    pooling runs our class-token-only last block, with RoPE on the keys."""
    model, ref = build(family, global_pool=global_pool)
    for size in ((64, 64), (48, 112)):
        assert_same_model(model, ref, images(*size))


def test_rope_tables_equal_timm_tables() -> None:
    RotaryEmbeddingCat, RotaryEmbeddingDinoV3 = timm.layers.RotaryEmbeddingCat, timm.layers.RotaryEmbeddingDinoV3
    for grid in ((16, 16), (5, 9)):
        eva = RotaryEmbeddingCat(32, temperature=10000, in_pixels=False, ref_feat_shape=(16, 16))
        assert torch.equal(rope_embed(grid, 32, "eva", 10000.0, ref_grid=16), eva.get_embed(shape=list(grid)))
        xy = RotaryEmbeddingCat(32, temperature=100, in_pixels=False, grid_indexing="xy")
        assert torch.equal(rope_embed(grid, 32, "eva", 100.0, "xy"), xy.get_embed(shape=list(grid)))
        d3 = RotaryEmbeddingDinoV3(64, temperature=100, rotate_half=True)
        assert torch.equal(rope_embed(grid, 64, "dinov3", 100.0), d3.get_embed(shape=list(grid)))


def test_rope_is_a_buffer_not_a_weight() -> None:
    model = VisionTransformer(DINOV3[2])
    assert "rope" not in model.state_dict() and model.rope.shape == (16, 2 * 32)
    model.set_input_size(96)
    assert model.rope.shape == (36, 64) and model.cfg.img_size == 96


@pytest.mark.parametrize("kw, match", [
    (dict(global_pool="max"), "global_pool must be"),
    (dict(act="relu"), "act must be"),
    (dict(mlp="geglu"), "mlp must be"),
    (dict(rope="2d"), "rope must be"),
    (dict(rope="eva", embed_dim=60, num_heads=6), "head dim divisible by 4"),
    (dict(rope="dinov3", rope_ref_grid=16), "rope_ref_grid"),
    (dict(reg_tokens=-1), "reg_tokens"),
    (dict(mlp="swiglu", embed_dim=10, num_heads=2, mlp_ratio=2.5), "even fc1 width"),
])
def test_invalid_options_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViTConfig(**kw)


# -- export: the model's forward is what `vitkit export` wraps ------------------------------------------------

ONNX_CASES = {  # one family per option: reg_tokens + no_embed_class, map, quick_gelu, swiglu + eva RoPE, dinov3 RoPE,
    # ROPE-ViT's xy grid without a position table
    "dinov2_reg4": DINOV2_REG4[2].replace(img_size=56, depth=1),
    "siglip_map": SIGLIP[2].replace(img_size=32, depth=1),
    "clip_quick_gelu": CLIP[2].replace(img_size=32, depth=1),
    "eva02_swiglu_rope": EVA02_B[2].replace(img_size=56, depth=1, rope_ref_grid=4),
    "dinov3_rope_token": DINOV3[2].replace(img_size=32, depth=1, global_pool="token"),
    "rope_vit_xy_no_pos_embed": ROPE_VIT[2].replace(img_size=32, depth=1),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_export_matches_eager(tmp_path, case: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    cfg = ONNX_CASES[case].replace(dynamic_img_size=True)  # the graph `vitkit export --dynamic_size` records
    torch.manual_seed(0)
    model = perturb(VisionTransformer(cfg))
    p, n = cfg.patch_size, cfg.grid_size
    Dim = torch.export.Dim
    shapes = {"x": {0: Dim("batch", min=1, max=64), 2: p * Dim("grid_h", min=1, max=64),
                    3: p * Dim("grid_w", min=1, max=64)}}
    out = tmp_path / f"{case}.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (images(p * (n + 1), p * (n + 2)),), dynamo=True, dynamic_shapes=shapes,
                          input_names=["x"], output_names=["logits"], verbose=False).save(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for x in (images(cfg.img_size, batch=3), images(p * (n - 1), p * (n + 3), batch=1)):
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4
