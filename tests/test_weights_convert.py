"""`vitkit convert` writes checkpoints that load back to the very same network; the sources table is true."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitkit import create_model, list_models
from vitkit.cli import main as cli_main
from vitkit.engine.checkpoint import load_checkpoint
from vitkit.weights.sources import SOURCES, sources_for

DATA = Path(__file__).parent / "data"


def test_convert_mindcv_ckpt_roundtrips_exactly(tmp_path):
    dst = tmp_path / "tiny.safetensors"
    rc = cli_main(["convert", str(DATA / "mindcv_vit_tiny.ckpt"), str(dst), "--model", "vit_n_4_32",
                   "--override", "embed_dim=64", "--override", "depth=2", "--override", "num_heads=2"])
    assert rc == 0
    ckpt = load_checkpoint(dst)
    assert ckpt.model_name == "vit_n_4_32"
    assert (ckpt.arch.norm_eps, ckpt.arch.act, ckpt.arch.embed_dim) == (1e-7, "gelu_tanh", 64)
    assert ckpt.config["converted_from"]["format"] == "mindcv"
    io = np.load(DATA / "mindcv_vit_tiny_io.npz")
    with torch.no_grad():
        logits = ckpt.build_model()(torch.from_numpy(io["input"]))
    assert (logits - torch.from_numpy(io["logits"])).abs().max() <= 1e-4


def test_convert_infers_the_model_and_keeps_preprocessing(tmp_path, capsys):
    src = create_model("vit_n_4_32", global_pool="avg").eval()
    path = tmp_path / "timm_style.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(path), str(dst), "--num-classes", "4"]) == 0
    assert "vit_n_4_32" in capsys.readouterr().out
    ckpt = load_checkpoint(dst)
    assert ckpt.model_name == "vit_n_4_32" and ckpt.arch.global_pool == "avg" and ckpt.arch.num_classes == 4
    model = ckpt.build_model()
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_convert_without_a_matching_name_says_what_to_pass(tmp_path, capsys):
    rc = cli_main(["convert", str(DATA / "mindcv_vit_tiny.ckpt"), str(tmp_path / "x.safetensors")])
    assert rc == 2
    assert "pass --model NAME with --override" in capsys.readouterr().err


def test_sources_table_agrees_with_timm_and_torchvision():
    """Every hub id, npz URL, torchvision URL and top-1 in the table is what the publisher's own code says."""
    import torchvision.models as tvm
    from timm.models._registry import get_pretrained_cfg

    tv = {w.url: w for enum in (tvm.ViT_B_16_Weights, tvm.ViT_B_32_Weights, tvm.ViT_L_16_Weights,
                                 tvm.ViT_L_32_Weights, tvm.ViT_H_14_Weights) for w in enum}
    for name, sources in SOURCES.items():
        assert name in list_models()
        tags = [s.tag for s in sources]
        assert len(tags) == len(set(tags)), name
        timm_by_tag = {s.tag: s for s in sources if s.format == "timm"}
        for s in sources:
            if s.format == "timm":
                cfg = get_pretrained_cfg(s.location.split("/", 1)[1])
                assert cfg.hf_hub_id == s.location
                assert (cfg.num_classes, cfg.input_size[-1], cfg.crop_pct, cfg.interpolation) == \
                    (s.num_classes, s.img_size, s.crop_pct, s.interpolation)
                assert tuple(cfg.mean) == s.mean and tuple(cfg.std) == s.std
            elif s.format == "jax":
                assert get_pretrained_cfg(timm_by_tag[s.tag[:-4]].location.split("/", 1)[1]).url == s.location
            elif s.format == "torchvision":
                w = tv[s.location]
                t = w.transforms()
                assert w.meta["_metrics"]["ImageNet-1K"]["acc@1"] == s.top1
                assert s.crop_pct == pytest.approx(t.crop_size[0] / t.resize_size[0])
                assert s.interpolation == t.interpolation.value
                assert s.img_size == t.crop_size[0]
    assert sources_for("vit_b_32_224")[0].location == "timm/vit_base_patch32_224.augreg_in21k_ft_in1k"
    assert sources_for("vit_n_4_32") == []
