"""Same weights, same logits: vitkit against timm, torchvision, transformers, timm's .npz loader and MindCV.

Reference models are randomly initialised, then every parameter gets N(0, 0.02) noise so LayerNorm scales,
biases and zero-initialised heads are all non-trivial; the weights go through a file in the reference's own
format and vitkit loads that file through `create_model(name, pretrained=PATH)`. fp32, CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitkit import create_model

DATA = Path(__file__).parent / "data"


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _input(size: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# Default runs use the real layer shapes with 2 blocks (fast on 2 cores); the full-depth runs are marked slow.
DEPTHS = [2, pytest.param(None, marks=pytest.mark.slow, id="full")]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_vit_base_patch32_224(tmp_path, global_pool, depth):
    timm = pytest.importorskip("timm")
    kw = {"depth": depth} if depth else {}
    ref = _perturb(timm.create_model("vit_base_patch32_224", pretrained=False, global_pool=global_pool, **kw))
    path = tmp_path / "timm_b32.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = create_model("vit_b_32_224", pretrained=str(path), **kw).eval()
    assert ours.cfg.global_pool == global_pool  # read from the keys: fc_norm exists only for avg pooling
    x = _input(224)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert expected.abs().max() > 0.1  # a real signal, not near-zero logits
    assert _max_diff(got, expected) <= 1e-5


def test_timm_vit_base_patch16_384_from_224_weights(tmp_path):
    """224 px weights into a 384 px model: both sides resample pos_embed (timm through its own loader)."""
    timm = pytest.importorskip("timm")
    src = _perturb(timm.create_model("vit_base_patch16_224", pretrained=False, depth=2))
    path = tmp_path / "b16_224.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    ref = timm.create_model("vit_base_patch16_384", pretrained=True, depth=2,
                            pretrained_cfg_overlay={"file": str(path)}).eval()
    ours = create_model("vit_b_16_384", pretrained=str(path), depth=2).eval()
    assert ours.pos_embed.shape == ref.pos_embed.shape == (1, 1 + 24 * 24, 768)
    assert _max_diff(ours.pos_embed, ref.pos_embed) <= 1e-6
    x = _input(384)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("depth", DEPTHS)
def test_torchvision_vit_b_32(tmp_path, depth):
    from torchvision.models import vit_b_32
    from torchvision.models.vision_transformer import VisionTransformer

    if depth:  # vit_b_32's layer shapes, fewer layers
        ref = VisionTransformer(image_size=224, patch_size=32, num_layers=depth, num_heads=12, hidden_dim=768,
                                mlp_dim=3072)
    else:
        ref = vit_b_32(weights=None)
    ref = _perturb(ref)  # torchvision zero-initialises the head; the noise fixes that
    path = tmp_path / "vit_b_32-tv.pth"
    torch.save(ref.state_dict(), path)
    ours = create_model("vit_b_32_224", pretrained=str(path), **({"depth": depth} if depth else {})).eval()
    x = _input(224)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert expected.abs().max() > 0.1
    assert _max_diff(got, expected) <= 1e-5


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_transformers_vit_for_image_classification(tmp_path, hidden_act):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                                 image_size=224, patch_size=16, num_labels=7, hidden_act=hidden_act)
    ref = _perturb(transformers.ViTForImageClassification(cfg))
    ref.save_pretrained(tmp_path / "hf_vit")
    ours = create_model("vit_ti_16_224", pretrained=str(tmp_path / "hf_vit"), depth=2).eval()
    assert ours.cfg.norm_eps == 1e-12 and ours.cfg.num_classes == 7
    assert ours.cfg.act == ("gelu" if hidden_act == "gelu" else "gelu_tanh")
    x = _input(224, batch=2)
    with torch.no_grad():
        expected, got = ref(pixel_values=x).logits, ours(x)
    assert _max_diff(got, expected) <= 1e-5


def test_mindcv_fixture_matches_mindspore_logits():
    """The MindCV-made checkpoint and MindSpore's own outputs (tests/data/mindcv_vit_tiny.json)."""
    meta = json.loads((DATA / "mindcv_vit_tiny.json").read_text())
    kw = meta["constructor_kwargs"]
    io = np.load(DATA / "mindcv_vit_tiny_io.npz")
    ours = create_model("vit_n_4_32", pretrained=str(DATA / "mindcv_vit_tiny.ckpt"), embed_dim=kw["embed_dim"],
                        depth=kw["depth"], num_heads=kw["num_heads"]).eval()
    assert (ours.cfg.norm_eps, ours.cfg.act) == (1e-7, "gelu_tanh")  # MindSpore's defaults, from the format
    x = torch.from_numpy(io["input"])
    with torch.no_grad():
        logits, features = ours(x), ours.forward_features(x)
    assert _max_diff(logits, torch.from_numpy(io["logits"])) <= 1e-4
    assert _max_diff(features, torch.from_numpy(io["features"])) <= 1e-4
    # torch's defaults (eps 1e-6, exact GELU) would not pass: the overrides are what makes it exact.
    plain = create_model("vit_n_4_32", pretrained=str(DATA / "mindcv_vit_tiny.ckpt"), embed_dim=kw["embed_dim"],
                         depth=kw["depth"], num_heads=kw["num_heads"], act="gelu").eval()
    with torch.no_grad():
        assert _max_diff(plain(x), torch.from_numpy(io["logits"])) > 1e-4


# -- Google .npz: a file written in JAX's layout, read by timm's own loader and by ours --------------------------

def _to_npz_layout(sd: dict[str, torch.Tensor], num_heads: int, layout: str) -> dict[str, np.ndarray]:
    """timm weights -> the arrays of a Flax ViT checkpoint (original ViT or big_vision, optionally scanned)."""
    a = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    dim = sd["cls_token"].shape[-1]
    hd = dim // num_heads
    bv = layout != "vit"
    prefix = "params/" if bv else ""
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if bv else \
        ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    w = {
        "embedding/kernel": a(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)),  # (kh, kw, in, out)
        "embedding/bias": a(sd["patch_embed.proj.bias"]),
        "cls": a(sd["cls_token"]),
        ("pos_embedding" if bv else "Transformer/posembed_input/pos_embedding"): a(sd["pos_embed"]),
        "Transformer/encoder_norm/scale": a(sd["norm.weight"]),
        "Transformer/encoder_norm/bias": a(sd["norm.bias"]),
        "head/kernel": a(sd["head.weight"].T),
        "head/bias": a(sd["head.bias"]),
    }
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    blocks = []
    for i in range(depth):
        b = f"blocks.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[b + "attn.qkv.bias"].chunk(3)
        blk = {
            "LayerNorm_0/scale": a(sd[b + "norm1.weight"]), "LayerNorm_0/bias": a(sd[b + "norm1.bias"]),
            f"{ln2}/scale": a(sd[b + "norm2.weight"]), f"{ln2}/bias": a(sd[b + "norm2.bias"]),
            f"{mha}/out/kernel": a(sd[b + "attn.proj.weight"].T.reshape(num_heads, hd, dim)),
            f"{mha}/out/bias": a(sd[b + "attn.proj.bias"]),
            f"{mlp}/Dense_0/kernel": a(sd[b + "mlp.fc1.weight"].T), f"{mlp}/Dense_0/bias": a(sd[b + "mlp.fc1.bias"]),
            f"{mlp}/Dense_1/kernel": a(sd[b + "mlp.fc2.weight"].T), f"{mlp}/Dense_1/bias": a(sd[b + "mlp.fc2.bias"]),
        }
        for n, wt, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            blk[f"{mha}/{n}/kernel"] = a(wt.T.reshape(dim, num_heads, hd))
            blk[f"{mha}/{n}/bias"] = a(bias.reshape(num_heads, hd))
        blocks.append(blk)
    if layout == "big_vision_scan":
        for key in blocks[0]:
            w[f"Transformer/encoderblock/{key}"] = np.stack([blk[key] for blk in blocks])
    else:
        for i, blk in enumerate(blocks):
            w.update({f"Transformer/encoderblock_{i}/{key}": val for key, val in blk.items()})
    return {prefix + k: v for k, v in w.items()}


@pytest.mark.parametrize("layout", ["vit", "big_vision", "big_vision_scan"])
def test_jax_npz_matches_timm_npz_loader(tmp_path, layout):
    timm = pytest.importorskip("timm")
    src = _perturb(timm.create_model("vit_small_patch16_224", pretrained=False, depth=2))
    path = tmp_path / f"S_16-{layout}.npz"
    np.savez(path, **_to_npz_layout(src.state_dict(), num_heads=6, layout=layout))
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2).eval()
    ref.load_pretrained(str(path))  # timm's own `_load_weights`
    ours = create_model("vit_s_16_224", pretrained=str(path), depth=2).eval()
    assert ours.cfg.num_heads == 6  # read from the (D, heads, head_dim) query kernel
    x = _input(224)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert _max_diff(expected, src(x)) <= 1e-5  # the file really holds the source weights
    assert _max_diff(got, expected) <= 1e-5
