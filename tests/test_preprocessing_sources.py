"""Eval preprocessing follows the weights' source: each format's publisher's own (mean, std, crop_pct,
interpolation) unless the file states its own, and an explicit setting still wins.

Each test writes a tiny model (real widths and patch sizes, one or two blocks) in the foreign format with the
publisher's own library where it is installed, loads it through vitkit, and compares the resolved eval
DataConfig with what that library says for the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vitkit
from vitkit import weights as weights_pkg
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.models import get_spec
from vitkit.tools.inference import load_inference_model
from vitkit.tools.validate import run_validate
from vitkit.weights import formats, load_weights, sources
from vitkit.weights.sources import WeightSource

DATA = Path(__file__).parent / "data"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def resolved(weights, name: str) -> tuple:
    """(mean, std, crop_pct, interpolation) of the eval DataConfig vitkit resolves for `weights` on `name`."""
    dc = weights.data_config(get_spec(name))
    return tuple(round(x, 6) for x in dc.mean), tuple(round(x, 6) for x in dc.std), round(dc.crop_pct, 6), \
        dc.interpolation


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# -- timm ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("timm_name, ours", [("vit_tiny_patch16_224", "vit_ti_16_224"),
                                             ("vit_tiny_patch16_384", "vit_ti_16_384")])
def test_bare_timm_state_dict_gets_timm_preprocessing(tmp_path, timm_name, ours):
    timm = pytest.importorskip("timm")
    ref = timm.create_model(timm_name, pretrained=False, depth=1)
    path = _save_safetensors(ref.state_dict(), tmp_path / "timm.safetensors")
    weights = load_weights(str(path), model_name=ours)
    assert weights.format == "timm"
    cfg = timm.data.resolve_data_config({}, model=ref)  # what timm itself evaluates these weights with
    expected = (tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"], cfg["interpolation"])
    assert resolved(weights, ours) == expected == (*HALF, 1.0 if "384" in ours else 0.9, "bicubic")
    model = vitkit.create_model(ours, pretrained=str(path), depth=1)  # the registry says ImageNet, 0.875
    assert model.pretrained_cfg["data"]["mean"] == (0.5, 0.5, 0.5)


def test_plain_state_dict_of_a_vitkit_small_model_keeps_its_own_preprocessing(tmp_path):
    """Same key names as timm, but no timm ViT has this shape: the model's registered stats stay."""
    src = vitkit.create_model("vit_n_4_32", depth=1)
    weights = load_weights(str(_save_safetensors(src.state_dict(), tmp_path / "own.safetensors")))
    spec = get_spec("vit_n_4_32")
    assert weights.format == "timm" and weights.data == {}
    assert resolved(weights, "vit_n_4_32") == (spec.mean, spec.std, spec.crop_pct, spec.interpolation)


def test_timm_hub_folder_states_part_and_timm_defaults_fill_the_rest(tmp_path):
    src = vitkit.create_model("vit_ti_16_224", depth=1)
    folder = tmp_path / "snap"
    folder.mkdir()
    _save_safetensors(src.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                                    "pretrained_cfg": {"crop_pct": 0.95}}))
    weights = load_weights(str(folder), model_name="vit_ti_16_224")
    assert resolved(weights, "vit_ti_16_224") == (*HALF, 0.95, "bicubic")


# -- torchvision -----------------------------------------------------------------------------------------------

def _tv_vit(patch: int, hidden: int, img: int = 224, heads: int = 12) -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=img, patch_size=patch, num_layers=1, num_heads=heads, hidden_dim=hidden,
                             mlp_dim=4 * hidden)


def _tv_expected(weights_enum) -> tuple:
    t = weights_enum.transforms()
    return (tuple(t.mean), tuple(t.std), round(t.crop_size[0] / t.resize_size[0], 6), t.interpolation.value)


@pytest.mark.parametrize("ours, patch, hidden, img, enum, member", [
    ("vit_b_32_224", 32, 768, 224, "ViT_B_32_Weights", "IMAGENET1K_V1"),
    ("vit_l_16_224", 16, 1024, 224, "ViT_L_16_Weights", "IMAGENET1K_V1"),  # resize 242, not 256
    ("vit_b_16_384", 16, 768, 384, "ViT_B_16_Weights", "IMAGENET1K_SWAG_E2E_V1"),  # SWAG: bicubic, no crop
])
def test_bare_torchvision_state_dict_gets_torchvision_preprocessing(tmp_path, ours, patch, hidden, img, enum,
                                                                      member):
    tvm = pytest.importorskip("torchvision.models")
    path = tmp_path / "tv.pth"
    torch.save(_tv_vit(patch, hidden, img, heads=16 if hidden == 1024 else 12).state_dict(), path)
    weights = load_weights(str(path), model_name=ours)
    assert weights.format == "torchvision" and weights.source is None
    expected = _tv_expected(getattr(getattr(tvm, enum), member))
    assert resolved(weights, ours) == expected


def test_torchvision_file_under_its_published_name_gets_that_source(tmp_path):
    """SWAG linear-classifier weights look like V1 ones; torchvision's file name tells them apart."""
    tvm = pytest.importorskip("torchvision.models")
    sd = _tv_vit(16, 768).state_dict()
    torch.save(sd, tmp_path / "vit_b_16_lc_swag-4e70ced5.pth")
    torch.save(sd, tmp_path / "renamed.pth")
    swag = load_weights(str(tmp_path / "vit_b_16_lc_swag-4e70ced5.pth"), model_name="vit_b_16_224")
    assert swag.source is not None and swag.source.tag == "tv_swag_lc"
    assert resolved(swag, "vit_b_16_224") == _tv_expected(tvm.ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1)
    plain = load_weights(str(tmp_path / "renamed.pth"), model_name="vit_b_16_224")
    assert resolved(plain, "vit_b_16_224") == _tv_expected(tvm.ViT_B_16_Weights.IMAGENET1K_V1)


# -- Hugging Face transformers -----------------------------------------------------------------------------------

def _hf_folder(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=1, num_attention_heads=3, intermediate_size=768,
                                 image_size=224, patch_size=16, num_labels=5)
    folder = tmp_path / "hf_vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


def test_transformers_folder_gets_vit_image_processor_defaults(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _hf_folder(tmp_path)
    weights = load_weights(str(folder), model_name="vit_ti_16_224")
    assert weights.format == "transformers"
    p = transformers.ViTImageProcessor()  # what google/vit-* ship: resize to 224 (no crop), bilinear, 0.5
    assert p.resample == Image.Resampling.BILINEAR and p.size["height"] == 224
    assert resolved(weights, "vit_ti_16_224") == (tuple(p.image_mean), tuple(p.image_std), 1.0, "bilinear")
    bare = load_weights(str(folder / "model.safetensors"), model_name="vit_ti_16_224")  # no config.json beside
    assert bare.format == "transformers" and resolved(bare, "vit_ti_16_224") == (*HALF, 1.0, "bilinear")


def test_preprocessor_config_beside_transformers_weights_wins(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _hf_folder(tmp_path)
    transformers.ViTImageProcessor(image_mean=[0.4, 0.4, 0.4], image_std=[0.3, 0.3, 0.3],
                                   resample=Image.Resampling.BICUBIC).save_pretrained(folder)
    weights = load_weights(str(folder), model_name="vit_ti_16_224")
    assert resolved(weights, "vit_ti_16_224") == ((0.4,) * 3, (0.3,) * 3, 1.0, "bicubic")
    # the older int `size` and a center-cropping processor (crop_pct = crop / resize)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": 256, "do_center_crop": True, "crop_size": 224, "resample": 2, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3}))
    weights = load_weights(str(folder), model_name="vit_ti_16_224")
    assert resolved(weights, "vit_ti_16_224") == (*HALF, 0.875, "bilinear")


# -- Google .npz -----------------------------------------------------------------------------------------------

def _npz(path: Path, dim: int = 192, heads: int = 3, patch: int = 16, img: int = 224, depth: int = 1) -> Path:
    """A Flax ViT checkpoint in the original ViT / AugReg layout (what timm's `_load_weights` reads)."""
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.02  # noqa: E731
    hd, n = dim // heads, (img // patch) ** 2 + 1
    w = {"embedding/kernel": r(patch, patch, 3, dim), "embedding/bias": r(dim), "cls": r(1, 1, dim),
         "Transformer/posembed_input/pos_embedding": r(1, n, dim), "Transformer/encoder_norm/scale": r(dim),
         "Transformer/encoder_norm/bias": r(dim), "head/kernel": r(dim, 1000), "head/bias": r(1000)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        mha, mlp = b + "MultiHeadDotProductAttention_1/", b + "MlpBlock_3/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = r(dim), r(dim)
        for q in ("query", "key", "value"):
            w[f"{mha}{q}/kernel"], w[f"{mha}{q}/bias"] = r(dim, heads, hd), r(heads, hd)
        w[f"{mha}out/kernel"], w[f"{mha}out/bias"] = r(heads, hd, dim), r(dim)
        w[f"{mlp}Dense_0/kernel"], w[f"{mlp}Dense_0/bias"] = r(dim, 4 * dim), r(4 * dim)
        w[f"{mlp}Dense_1/kernel"], w[f"{mlp}Dense_1/bias"] = r(4 * dim, dim), r(dim)
    np.savez(path, **w)
    return path


@pytest.mark.parametrize("img, ours, timm_tag", [
    (224, "vit_ti_16_224", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    (384, "vit_ti_16_384", "vit_tiny_patch16_384.augreg_in21k_ft_in1k"),
])
def test_google_npz_gets_what_timm_uses_for_the_same_files(tmp_path, img, ours, timm_tag):
    pytest.importorskip("timm")
    from timm.models import get_pretrained_cfg

    weights = load_weights(str(_npz(tmp_path / "Ti_16.npz", img=img)), model_name=ours)
    cfg = get_pretrained_cfg(timm_tag)
    assert cfg.url.endswith(".npz")  # timm's cfg of this very Google file
    assert weights.format == "jax"
    assert resolved(weights, ours) == (tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct, cfg.interpolation)
    model = vitkit.create_model(ours, pretrained=str(tmp_path / "Ti_16.npz"), depth=1)
    assert model.pretrained_cfg["data"]["crop_pct"] == cfg.crop_pct


# -- MindCV and vitkit -----------------------------------------------------------------------------------------

def test_mindcv_ckpt_gets_mindcv_preprocessing():
    weights = load_weights(str(DATA / "mindcv_vit_tiny.ckpt"), model_name="vit_n_4_32")
    mindcv = sources.find_source("vit_b_32_224", "mindcv_in1k")
    assert weights.format == "mindcv"
    assert resolved(weights, "vit_n_4_32") == (*IMAGENET, 0.875, "bicubic") == \
        (mindcv.mean, mindcv.std, mindcv.crop_pct, mindcv.interpolation)


def test_vitkit_checkpoint_carries_its_own(tmp_path):
    src = vitkit.create_model("vit_ti_16_224", depth=1)
    dc = DataConfig(224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear", 0.8)
    path = save_checkpoint(tmp_path / "ck.safetensors", src, model_name="vit_ti_16_224", data_config=dc)
    weights = load_weights(str(path))
    assert weights.format == "vitkit"
    assert resolved(weights, "vit_ti_16_224") == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 0.8, "bilinear")


# -- which wins --------------------------------------------------------------------------------------------------

def test_file_statement_beats_source_entry_beats_format_defaults(tmp_path, monkeypatch):
    src = vitkit.create_model("vit_ti_16_224", depth=1)
    path = _save_safetensors(src.state_dict(), tmp_path / "published.safetensors")
    fake = WeightSource("odd", path.resolve().as_uri(), "timm", crop_pct=0.7, interpolation="bilinear")
    monkeypatch.setitem(sources.SOURCES, "vit_ti_16_224", [fake])
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path / "home"))
    odd = (*HALF, 0.7, "bilinear")
    assert resolved(load_weights(True, model_name="vit_ti_16_224"), "vit_ti_16_224") == odd
    assert resolved(load_weights(str(path)), "vit_ti_16_224") == odd  # a local file under the published name
    copy = _save_safetensors(src.state_dict(), tmp_path / "mine.safetensors")
    assert resolved(load_weights(str(copy)), "vit_ti_16_224") == (*HALF, 0.9, "bicubic")  # the format's
    conv = formats.from_timm(src.state_dict(), {"pretrained_cfg": {"crop_pct": 0.95}})  # a hub config.json
    assert conv.data_stated == {"crop_pct"}
    stated = weights_pkg._from_converted(conv, "hub", fake)
    assert resolved(stated, "vit_ti_16_224") == (*HALF, 0.95, "bilinear")


def test_the_weights_decide_not_the_spelling_of_the_name(tmp_path):
    pytest.importorskip("torchvision")
    path = tmp_path / "tv.pth"
    torch.save(_tv_vit(16, 192, heads=3).state_dict(), path)
    weights = load_weights(str(path), model_name="vit_tiny_patch16_224")  # a timm name, torchvision weights
    assert resolved(weights, "vit_tiny_patch16_224") == (*IMAGENET, 0.875, "bilinear")
    # without weights the spelling decides: a timm name stands for timm's preprocessing, ours for the registry's
    timm_spec, our_spec = get_spec("vit_tiny_patch16_224"), get_spec("vit_ti_16_224")
    assert (timm_spec.mean, timm_spec.crop_pct) == (HALF[0], 0.9) and (our_spec.mean, our_spec.crop_pct) == \
        (IMAGENET[0], 0.875)


def _imagefolder(root: Path) -> Path:
    for c in ("a", "b"):
        (root / "val" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (48, 40), (60 * i, 100, 30)).save(root / "val" / c / f"{i}.png")
    return root


def test_validate_and_predict_use_the_weights_preprocessing_and_explicit_settings_win(tmp_path):
    torch.manual_seed(0)
    src = vitkit.create_model("vit_ti_16_224", num_classes=2)  # ViT-Ti/16: 5.5M parameters
    path = _save_safetensors(src.state_dict(), tmp_path / "timm_style.safetensors")
    common = ["--model", "vit_ti_16_224", "--ckpt_path", str(path), "--data_dir", str(_imagefolder(tmp_path / "d")),
              "--dataset", "imagefolder", "--num_parallel_workers", "0", "--batch_size", "4"]
    got = run_validate(common)["data_config"]
    assert (got["mean"], got["std"], got["crop_pct"], got["interpolation"]) == ([0.5] * 3, [0.5] * 3, 0.9, "bicubic")
    over = run_validate([*common, "--crop_pct", "0.8", "--interpolation", "bilinear", "--mean", "0.4", "0.4",
                         "0.4"])["data_config"]
    assert (over["mean"], over["std"], over["crop_pct"], over["interpolation"]) == \
        ([0.4] * 3, [0.5] * 3, 0.8, "bilinear")
    im = load_inference_model(str(path), model_name="vit_tiny_patch16_224")
    assert (im.data_config.mean, im.data_config.crop_pct, im.data_config.interpolation) == \
        ((0.5, 0.5, 0.5), 0.9, "bicubic")


# -- training follows the weights too ----------------------------------------------------------------------------

def test_finetuning_from_timm_weights_trains_and_evaluates_with_timm_preprocessing(tmp_path):
    """`vitkit train --pretrained <timm file>`: the trainer's eval preprocessing (what validation during training
    and the saved checkpoint use) is timm's, not the registry's ImageNet/0.875; a setting in the config wins."""
    timm = pytest.importorskip("timm")
    from vitkit.engine.config import resolve
    from vitkit.engine.loop import Trainer

    path = _save_safetensors(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(),
                             tmp_path / "timm.safetensors")
    base = ["--model", "vit_ti_16_224", "--pretrained", str(path), "--dataset", "imagefolder", "--data_dir",
            str(Path(__file__).resolve().parents[1] / "data" / "cifar10_sample"), "--val_split", "test",
            "--num_samples", "20", "--batch_size", "4", "--device", "cpu"]
    trainer = Trainer(resolve([*base, "--ckpt_save_dir", str(tmp_path / "a")], notices=[]))
    dc = trainer.data_config
    assert (dc.mean, dc.std, dc.crop_pct, dc.interpolation) == (*HALF, 0.9, "bicubic")
    trainer = Trainer(resolve([*base, "--crop_pct", "0.95", "--ckpt_save_dir", str(tmp_path / "b")], notices=[]))
    assert trainer.data_config.crop_pct == 0.95 and trainer.data_config.mean == HALF[0]


def test_a_source_stating_unusable_preprocessing_is_one_line():
    weights = weights_pkg.PretrainedWeights(state_dict={}, format="timm", origin="odd/config.json",
                                            data={"crop_pct": 5.0, "interpolation": "bicubic"})
    with pytest.raises(vitkit.errors.WeightsError, match=r"odd/config.json: .*crop_pct = 5.0 .*--crop_pct") as e:
        weights.data_config(get_spec("vit_n_4_32"))
    assert "\n" not in str(e.value)
