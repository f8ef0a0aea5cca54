"""Fitting weights to a model: head reset, pos-embed resampling, errors that name the key, safe unpickling."""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitkit import create_model
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.errors import WeightsError
from vitkit.models.vit import resample_pos_embed
from vitkit.weights import load_pretrained, load_weights, sources
from vitkit.weights.formats import from_mindcv
from vitkit.weights.sources import WeightSource

DATA = Path(__file__).parent / "data"


def _tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vit_n_4_32", depth=2, **kw).eval()


def _save(model: torch.nn.Module, path: Path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_same_arch_loads_exactly(tmp_path):
    src = _tiny()
    ours = create_model("vit_n_4_32", depth=2, pretrained=_save(src, tmp_path / "w.safetensors"))
    for k, v in src.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert ours.pretrained_cfg["format"] == "timm"


def test_other_num_classes_resets_head_and_reports(tmp_path, caplog):
    src = _tiny()  # 10 classes
    with caplog.at_level(logging.WARNING, logger="vitkit.weights"):
        ours = create_model("vit_n_4_32", depth=2, num_classes=3, pretrained=_save(src, tmp_path / "w.safetensors"))
    assert ours.head.weight.shape == (3, 128)
    assert "head reset" in caplog.text and "10 classes" in caplog.text
    assert torch.equal(ours.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_other_img_size_resamples_pos_embed(tmp_path, caplog):
    src = _tiny()
    with caplog.at_level(logging.INFO, logger="vitkit.weights"):
        ours = create_model("vit_n_4_32", depth=2, img_size=48, pretrained=_save(src, tmp_path / "w.safetensors"))
    assert torch.equal(ours.pos_embed, resample_pos_embed(src.pos_embed, (12, 12), 1))
    assert "resampled 64 -> 144" in caplog.text
    assert ours(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_shape_mismatch_names_the_key(tmp_path):
    path = _save(create_model("vit_n_4_32", depth=2, mlp_ratio=2.0), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"blocks\.0\.mlp\.fc1\.bias: weights have shape \(256,\), .*\(512,\)"):
        create_model("vit_n_4_32", depth=2, pretrained=path)
    path = _save(create_model("vit_n_4_32", depth=2, embed_dim=64, num_heads=2), tmp_path / "narrow.safetensors")
    with pytest.raises(WeightsError, match=r"pos_embed: weights have shape \(1, 65, 64\)"):
        create_model("vit_n_4_32", depth=2, pretrained=path)


def test_missing_tensors_are_an_error_never_random(tmp_path):
    path = _save(_tiny(), tmp_path / "w.safetensors")  # 2 blocks into a 3-block model
    with pytest.raises(WeightsError, match=r"lacks .*blocks\.2\."):
        create_model("vit_n_4_32", depth=3, pretrained=path)


def test_unexpected_tensors_are_reported(tmp_path, caplog):
    path = _save(_tiny(), tmp_path / "w.safetensors")  # 2 blocks into a 1-block model
    with caplog.at_level(logging.WARNING, logger="vitkit.weights"):
        create_model("vit_n_4_32", depth=1, pretrained=path)
    assert "unexpected (ignored): blocks.1." in caplog.text


def test_wrapped_training_checkpoint_with_ddp_prefix(tmp_path):
    src = _tiny()
    path = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    ours = create_model("vit_n_4_32", depth=2, pretrained=str(path))
    assert torch.equal(ours.pos_embed, src.pos_embed)


class _Evil:
    """Unpickling this would create a folder: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"patch_embed.proj.weight": torch.zeros(1), "x": _Evil(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(WeightsError, match="refused|could not be read"):
        create_model("vit_n_4_32", pretrained=str(path))
    assert not marker.exists()


def test_vitkit_checkpoint_keeps_arch_and_preprocessing(tmp_path):
    src = create_model("vit_n_4_32", depth=2, norm_eps=1e-7, act="gelu_tanh")
    dc = DataConfig(input_size=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=1.0)
    path = save_checkpoint(tmp_path / "ck.safetensors", src, model_name="vit_n_4_32", data_config=dc,
                           class_names=[str(i) for i in range(10)])
    weights = load_weights(str(path))
    assert weights.format == "vitkit" and weights.data["mean"] == (0.1, 0.2, 0.3)
    assert weights.class_names == [str(i) for i in range(10)]
    ours = create_model("vit_n_4_32", depth=2, pretrained=str(path)).eval()
    assert (ours.cfg.norm_eps, ours.cfg.act) == (1e-7, "gelu_tanh")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), src.eval()(x))


def test_load_pretrained_refuses_a_model_with_other_numerics():
    model = create_model("vit_n_4_32", embed_dim=64, depth=2, num_heads=2)  # eps 1e-6, exact GELU
    with pytest.raises(WeightsError, match="norm_eps=1e-07"):
        load_pretrained(model, None, str(DATA / "mindcv_vit_tiny.ckpt"))


def test_mindcv_older_layouts_map_to_our_names():
    """MindCV's 2023 (head.classifier) and first (backbone.transformer.layers...) layouts, as named by MindSpore."""
    ones, zeros = torch.ones(4), torch.zeros(4)
    mid = from_mindcv({"blocks.0.norm1.gamma": ones, "blocks.0.norm1.beta": zeros, "head.classifier.weight": ones,
                       "adam_m.blocks.0.norm1.gamma": ones, "global_step": torch.zeros(1)})
    assert set(mid.state_dict) == {"blocks.0.norm1.weight", "blocks.0.norm1.bias", "head.weight"}
    assert mid.notes == ["2 optimizer/training-state tensors ignored"]
    first = from_mindcv({
        "backbone.cls_token": ones, "backbone.pos_embedding": ones, "backbone.patch_embedding.conv.weight": ones,
        "backbone.transformer.layers.3.0.cell.0.gamma": ones, "backbone.transformer.layers.3.0.cell.1.qkv.bias": ones,
        "backbone.transformer.layers.3.0.cell.1.out.weight": ones, "backbone.transformer.layers.3.1.cell.0.beta": ones,
        "backbone.transformer.layers.3.1.cell.1.dense2.weight": ones, "backbone.norm.gamma": ones,
    })
    assert set(first.state_dict) == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.3.norm1.weight", "blocks.3.attn.qkv.bias",
        "blocks.3.attn.proj.weight", "blocks.3.norm2.bias", "blocks.3.mlp.fc2.weight", "norm.weight"}
    assert (first.arch["norm_eps"], first.arch["act"]) == (1e-7, "gelu_tanh")


def test_pretrained_true_uses_the_default_source_and_its_preprocessing(tmp_path, monkeypatch):
    ckpt = DATA / "mindcv_vit_tiny.ckpt"
    fake = WeightSource("mindcv_test", ckpt.resolve().as_uri(), "mindcv", 10, 32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2),
                        crop_pct=1.0)
    monkeypatch.setitem(sources.SOURCES, "vit_n_4_32", [fake])
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path))
    model = create_model("vit_n_4_32", pretrained=True, embed_dim=64, depth=2, num_heads=2)
    assert model.pretrained_cfg["tag"] == "mindcv_test" and model.pretrained_cfg["data"]["std"] == (0.2, 0.2, 0.2)
    assert (tmp_path / "weights" / ckpt.name).is_file()  # went through the download cache
    by_tag = load_weights("mindcv_test", model_name="vit_n_4_32")  # a source tag selects that source
    assert by_tag.source is fake
    io = np.load(DATA / "mindcv_vit_tiny_io.npz")
    with torch.no_grad():
        assert torch.allclose(model.eval()(torch.from_numpy(io["input"])), torch.from_numpy(io["logits"]), atol=1e-4)


@pytest.mark.parametrize("pretrained, message", [
    (True, "no published weights"),
    ("does/not/exist.pth", "no such file"),
    ("not a thing", "no such file"),
])
def test_unresolvable_pretrained_is_an_error(pretrained, message):
    with pytest.raises(WeightsError, match=message):
        create_model("vit_n_4_32", pretrained=pretrained)


def test_unrecognised_weights_are_an_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(WeightsError, match="unrecognised weights"):
        create_model("vit_n_4_32", pretrained=str(path))
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes((DATA / "mindcv_vit_tiny.ckpt").read_bytes()[:1000])
    with pytest.raises(WeightsError, match="MindSpore checkpoint"):
        create_model("vit_n_4_32", pretrained=str(bad))
