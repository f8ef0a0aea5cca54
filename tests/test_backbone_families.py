"""Issue 15 (names, weights, benchmark, recipes): the backbone families as registered names.

Every family name (DINOv2, SigLIP, CLIP, EVA-02, ROPE-ViT, DINOv3, DeiT III) against timm's own model of its timm
name, offline: timm builds the model (`pretrained=False`, random weights made non-trivial by `perturb`), its state
dict goes to a local file (or a hub-snapshot folder, as timm saves one) and comes back through vitkit's real loader
(`vitkit.create_model(name, pretrained=PATH, depth=2)`, `vitkit convert`, `vitkit validate`); features and logits
must equal timm's within 1e-5 (fp32, eval, CPU), a resolution change must equal timm's own resampling, and the
registered preprocessing, sources and shapes must equal timm's pretrained cfgs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit.cli import main as cli_main
from vitkit.engine.checkpoint import load_checkpoint
from vitkit.errors import UnknownModelError, WeightsError
from vitkit.models import get_spec, list_models, resolve_model
from vitkit.models.registry import FAMILIES, build_config, count_macs, timm_model_name, timm_name
from vitkit.models.vit import VisionTransformer, count_params
from vitkit.tools import benchmark
from vitkit.tools.convert import main as convert_main
from vitkit.tools.validate import run_validate
from vitkit.weights import load_weights, model_info
from vitkit.weights.formats import eva_to_vitkit, format_data, from_timm, is_eva, vitkit_to_eva, weights_img_size
from vitkit.weights.sources import default_source, sources_for

timm = pytest.importorskip("timm")
from timm.models import get_pretrained_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"
FAMILY_NAMES = [n for n in list_models() if get_spec(n).model_family != "vit"]
# One name per family, at its published input size, for the slower end-to-end checks.
ONE_PER_FAMILY = ["vit_s_14_reg4_dinov2", "vit_b_16_siglip_224", "vit_b_32_clip_224", "eva02_ti_14_224",
                  "vit_s_16_rope_224", "vit_s_16_dinov3", "deit3_s_16_224"]
# The names whose architecture differs in the input size only (SigLIP B/16 at 224/256/384/512, ...) are one
# computation at the 4x4 patch grid of the weights test: one name of each (their shapes at the published size are
# checked name by name on the meta device).
DISTINCT_NAMES = list({get_spec(n).arch.replace(img_size=get_spec(n).arch.patch_size * 4): n
                       for n in reversed(FAMILY_NAMES)}.values())[::-1]
# CLIP: vitkit's default weights are OpenAI's, timm's default tag of its quick_gelu names is another one.
NOT_TIMM_DEFAULT = {"vit_b_32_clip_224", "vit_b_16_clip_224", "vit_l_14_clip_224"}


# -- helpers --------------------------------------------------------------------------------------------------

def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter (tests/test_backbones.py's recipe): unit-variance linear outputs, tokens and
    position tables std 0.5, layer scales about 0.5, vectors std 0.02, so every part of the model matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            weight = p.ndim >= 2 and name.endswith("weight")
            std = p[0].numel() ** -0.5 if weight else 0.02 if p.ndim == 1 else 0.5
            p.add_(torch.randn(p.shape, generator=g) * std + (0.5 if "gamma" in name else 0.0))
    return model.eval()


def timm_model(name: str, **kw: object) -> torch.nn.Module:
    """timm's model of a registered family name (its timm name), pretrained=False, perturbed."""
    torch.manual_seed(0)
    return perturb(timm.create_model(timm_model_name(name), pretrained=False, **kw))


def save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def images(h: int, w: int | None = None, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, h, w or h, generator=torch.Generator().manual_seed(seed))


def assert_same(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.01  # a real signal
    assert (got - expected).abs().max().item() <= tol


def assert_same_model(model: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert_same(model.forward_features(x), ref.forward_features(x))
        assert_same(model(x), ref(x))


def preprocessing(dc: dict) -> tuple:
    return (tuple(round(v, 6) for v in dc["mean"]), tuple(round(v, 6) for v in dc["std"]), round(dc["crop_pct"], 6),
            dc["interpolation"])


def timm_preprocessing(ref: torch.nn.Module, name: str) -> tuple:
    """timm's eval preprocessing of its model of `name` (for the CLIP names: of the OpenAI tag, vitkit's default)."""
    if name in NOT_TIMM_DEFAULT:
        return preprocessing(get_pretrained_cfg(f"{timm_model_name(name)}.openai").to_dict())
    return preprocessing(timm.data.resolve_data_config({}, model=ref))


# -- the registry: names, shapes, preprocessing, resolver -----------------------------------------------------

def test_every_family_is_registered_with_readable_names():
    families = {get_spec(n).model_family for n in FAMILY_NAMES}
    assert families == set(FAMILIES) - {"vit"}
    assert {"vit_s_14_reg4_dinov2", "vit_b_14_reg4_dinov2", "vit_l_14_reg4_dinov2", "vit_g_14_reg4_dinov2",
            "vit_b_16_siglip_224", "vit_b_16_siglip_256", "vit_so400m_14_siglip_224", "vit_so400m_14_siglip_378",
            "vit_b_32_clip_224", "vit_b_16_clip_224", "vit_l_14_clip_224", "eva02_ti_14_224", "eva02_b_14_448",
            "vit_s_16_rope_224", "vit_b_16_rope_224", "vit_s_16_dinov3", "vit_b_16_dinov3", "vit_l_16_dinov3",
            "vit_sp_16_dinov3", "vit_hp_16_dinov3", "deit3_b_16_224"} <= set(FAMILY_NAMES)
    visible = {"deit3": "deit3_", "dinov2": "_reg4_dinov2", "siglip": "_siglip_", "clip": "_clip_", "eva02": "eva02_",
               "rope_vit": "_rope_", "dinov3": "_dinov3"}
    for n in FAMILY_NAMES:
        assert visible[get_spec(n).model_family] in n, n  # the family is visible in the name
        assert timm_name(n) is None and timm_model_name(n) is not None  # timm_name stays the plain ViTs'


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_published_shapes_and_preprocessing_equal_timm(name):
    """The registered architecture has timm's tensors, key for key and shape for shape, at the published input
    size and full depth (meta device: no memory), and its eval preprocessing is timm's resolve_data_config for
    that model (= the default tag's pretrained cfg)."""
    spec = get_spec(name)
    with torch.device("meta"):
        ref = timm.create_model(timm_model_name(name), pretrained=False, num_classes=spec.arch.num_classes)
        ours = VisionTransformer(spec.arch)
    theirs = ref.state_dict()
    theirs = eva_to_vitkit(theirs) if is_eva(theirs) else theirs
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    # our fused qkv bias has a k third that Eva keeps as a zero buffer (eva_to_vitkit): count its weights
    assert count_params(spec.arch) == sum(v.numel() for v in theirs.values())
    cfg = timm.data.resolve_data_config({}, model=ref)
    ours_pre = dict(mean=spec.mean, std=spec.std, crop_pct=spec.crop_pct, interpolation=spec.interpolation)
    assert preprocessing(ours_pre) == timm_preprocessing(ref, name)
    assert spec.input_size == tuple(cfg["input_size"]) and spec.family == "timm"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_timm_spellings_resolve_to_the_family_name(name):
    theirs = timm_model_name(name)
    assert resolve_model(theirs) == vitkit.models.ModelName(name, "timm", None, theirs)
    tag = sources_for(name)[0].tag
    resolved = resolve_model(f"timm/{theirs}.{tag}")
    assert (resolved.name, resolved.family, resolved.tag) == (name, "timm", tag)
    assert get_spec(theirs) == get_spec(name)  # the registered preprocessing is timm's already
    assert model_info(theirs)["name"] == name and model_info(name)["timm_name"] == theirs
    assert model_info(name)["aliases"] == [theirs] and model_info(name)["family"] == get_spec(name).model_family


def test_list_models_and_suggestions_know_the_families():
    assert list_models("*dinov2*") == ["vit_s_14_reg4_dinov2", "vit_b_14_reg4_dinov2", "vit_l_14_reg4_dinov2",
                                       "vit_g_14_reg4_dinov2"]
    assert list_models(family="eva02") == [n for n in FAMILY_NAMES if n.startswith("eva02_")]
    assert list_models("vit_base_*") == ["vit_b_16_224", "vit_b_16_384", "vit_b_32_224", "vit_b_32_384"]
    assert list_models("*_224", family="siglip") == ["vit_b_16_siglip_224", "vit_so400m_14_siglip_224"]
    with pytest.raises(UnknownModelError, match="unknown model family 'dinov4'"):
        list_models(family="dinov4")
    for given, first in [("vit_s_14_reg4_dinov3", "vit_s_16_dinov3"), ("vit_b_16_siglip_225", "vit_b_16_siglip_224"),
                         ("eva02_tiny_patch14_225", "eva02_tiny_patch14_224"),
                         ("vit_base_patch32_clip_224", "vit_base_patch32_clip_quickgelu_224")]:
        with pytest.raises(UnknownModelError) as e:
            resolve_model(given)
        assert e.value.suggestions[0] == first, (given, e.value.suggestions)
        assert "\n" not in str(e.value)


def test_unknown_timm_tag_of_a_family_is_one_line_error():
    with pytest.raises(WeightsError, match=r"'nope' is not a timm tag vitkit knows for vit_small_patch14_reg4_dinov2 "
                                           r"\(known: vit_small_patch14_reg4_dinov2\.lvd142m\)"):
        vitkit.create_model("vit_small_patch14_reg4_dinov2.nope")
    with pytest.raises(UnknownModelError, match=r"vit_small_patch14_reg4_dinov2\.TAG"):
        resolve_model("vit_s_14_reg4_dinov2.lvd142m")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_sources_are_timm_s_published_cfgs(name):
    """Every source entry is a tag timm publishes for this model, with its hub id, head, input size and
    preprocessing; the first is timm's own default tag (CLIP: OpenAI's weights first, documented)."""
    theirs = timm_model_name(name)
    entries = sources_for(name)
    assert entries and all(s.format == "timm" for s in entries)
    for s in entries:
        cfg = get_pretrained_cfg(f"{theirs}.{s.tag}")
        assert s.location == cfg.hf_hub_id and s.num_classes == cfg.num_classes, s.tag
        assert (s.img_size, s.mean, s.std, s.crop_pct, s.interpolation) == \
            (cfg.input_size[-1], tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct, cfg.interpolation), s.tag
        assert "not downloaded here" in s.note
    default = default_source(name, family="timm")
    expected = "openai" if name in NOT_TIMM_DEFAULT else get_pretrained_cfg(theirs).tag
    assert default is entries[0] and default.tag == expected


@pytest.mark.parametrize("name", ["vit_b_16_siglip_224", "eva02_b_14_224", "vit_g_14_reg4_dinov2",
                                  "vit_sp_16_dinov3", "vit_b_32_clip_224"])
def test_count_macs_counts_swiglu_and_the_map_head(name):
    """count_macs equals torch's FlopCounterMode / 2 over the full forward (SwiGLU 1.5 n d h, the MAP head, RoPE
    and norms not counted by either)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = build_config(name, depth=2)
    with torch.device("meta"):
        model = VisionTransformer(cfg).eval()
        x = torch.empty(1, 3, cfg.img_size, cfg.img_size)
        with FlopCounterMode(display=False) as counter:
            model.forward_head(model.forward_features(x))
    assert count_macs(cfg) * 2 == counter.get_total_flops()


# -- weights: the real loader path ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", DISTINCT_NAMES)
def test_timm_weights_load_and_equal_timm(tmp_path, name):
    """timm's state dict of the family (depth 2, a 4x4 patch grid to keep it fast; the full input size is in the
    tests below; DISTINCT_NAMES) saved as timm saves it, loaded by name: features and logits equal timm's; the
    architecture fields the keys cannot tell come from the name; the preprocessing is timm's for that model."""
    spec = get_spec(name)
    img = spec.arch.patch_size * 4
    ref = timm_model(name, depth=2, img_size=img)
    suffix = ".safetensors" if DISTINCT_NAMES.index(name) % 2 == 0 else ".pth"
    path = save(ref.state_dict(), tmp_path / f"{name}{suffix}")
    model = vitkit.create_model(name, pretrained=str(path), depth=2, img_size=img).eval()
    assert model.model_name == name and model.pretrained_cfg["format"] == "timm"
    same = ("act", "no_embed_class", "rope", "rope_temperature", "rope_grid_indexing", "rope_ref_grid", "mlp",
            "mlp_ratio", "scale_mlp_norm", "reg_tokens", "global_pool", "class_token", "pre_norm", "norm_eps")
    assert {k: getattr(model.cfg, k) for k in same} == {k: getattr(spec.arch, k) for k in same}
    assert model.cfg.num_classes == ref.num_classes  # the weights' head: 0 (features) for the backbones
    assert_same_model(model, ref, images(img))
    weights = load_weights(str(path), model_name=name)
    assert preprocessing(weights.data_config(spec).to_dict()) == timm_preprocessing(ref, name)


@pytest.mark.parametrize("name, new_size", [("vit_s_14_reg4_dinov2", 224), ("eva02_ti_14_224", 336),
                                            ("deit3_s_16_224", 384), ("vit_b_16_siglip_224", 256),
                                            ("vit_b_32_clip_224", 384)])
def test_resolution_change_equals_timm_resampling(tmp_path, name, new_size):
    """Fine-tuning at another size (DINOv2 518 -> 224): the position embedding is resampled exactly as timm's own
    loader does it (timm.create_model(pretrained=True, img_size=...) from the same file: resample_abs_pos_embed,
    no prefix rows with no_embed_class, class-token row kept otherwise)."""
    ref = timm_model(name, depth=2)
    path = save(ref.state_dict(), tmp_path / "w.safetensors")
    theirs = timm.create_model(timm_model_name(name), pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               img_size=new_size, depth=2).eval()
    model = vitkit.create_model(name, pretrained=str(path), img_size=new_size, depth=2).eval()
    assert model.pos_embed.shape == theirs.pos_embed.shape
    assert (model.pos_embed - theirs.pos_embed).abs().max().item() <= 1e-6
    prefix = 0 if model.cfg.no_embed_class else model.num_prefix_tokens
    direct = timm.layers.resample_abs_pos_embed(ref.pos_embed, new_size=[new_size // model.cfg.patch_size] * 2,
                                                num_prefix_tokens=prefix)
    assert (model.pos_embed - direct).abs().max().item() <= 1e-6
    assert "pos_embed resampled" in model.pretrained_cfg["report"]
    assert_same_model(model, theirs, images(new_size, batch=1))


@pytest.mark.parametrize("name", ["vit_s_16_dinov3", "vit_b_16_siglip_224", "eva02_ti_14_224", "vit_s_14_reg4_dinov2"])
def test_timm_hub_snapshot_folder_loads(tmp_path, name):
    """A Hugging Face snapshot of a timm model (config.json written by timm's own save_config_for_hf, and
    model.safetensors): pooling ('map' included) from the config, preprocessing from its pretrained_cfg."""
    from timm.models._hub import save_config_for_hf

    ref = timm_model(name, depth=2)
    folder = tmp_path / "snapshot"
    folder.mkdir()
    save(ref.state_dict(), folder / "model.safetensors")
    save_config_for_hf(ref, str(folder / "config.json"))
    config = json.loads((folder / "config.json").read_text())
    model = vitkit.create_model(name, pretrained=str(folder), depth=2).eval()
    assert model.cfg.global_pool == config["global_pool"] == get_spec(name).arch.global_pool
    assert_same_model(model, ref, images(get_spec(name).arch.img_size, batch=1))
    weights = load_weights(str(folder), model_name=name)
    assert {"mean", "std", "crop_pct", "interpolation"} <= set(weights.data)  # stated by the file itself
    assert preprocessing(weights.data_config(get_spec(name)).to_dict()) == timm_preprocessing(ref, name)


@pytest.fixture(scope="module")
def cifar_20(tmp_path_factory) -> Path:
    """2 test images a class of the CIFAR-10 sample (20 images), as an image folder."""
    root = tmp_path_factory.mktemp("cifar_20")
    for cls in sorted(p.name for p in (SAMPLE / "test").iterdir()):
        (root / "test" / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / "test" / cls).iterdir())[:2]:
            (root / "test" / cls / f.name).symlink_to(f)
    return root


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_convert_round_trip_and_validate_offline(tmp_path, name, monkeypatch, cifar_20):
    """`vitkit convert SRC DST --model NAME --override depth=2 --num_classes 10` on timm's file at the published
    input size gives a self-describing checkpoint (the family's architecture and timm's preprocessing) whose
    features equal timm's, and `vitkit validate` runs it on the CIFAR-10 sample (a fresh 10-class head: chance-level
    top-1 on 20 of its images, which proves the file path, not the weights)."""
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    spec = get_spec(name)
    ref = timm_model(name, depth=2)
    src = save(ref.state_dict(), tmp_path / "timm.safetensors")
    dst = tmp_path / "converted.safetensors"
    assert convert_main([str(src), str(dst), "--model", name, "--override", "depth=2", "--num_classes", "10"]) == 0
    ckpt = load_checkpoint(dst)
    assert ckpt.model_name == name and ckpt.arch == spec.arch.replace(depth=2, num_classes=10)
    assert preprocessing(ckpt.data_config.to_dict()) == timm_preprocessing(ref, name)
    assert ckpt.data_config.input_size == spec.arch.img_size
    x = images(spec.arch.img_size, batch=1)
    with torch.no_grad():
        assert_same(ckpt.build_model().forward_features(x), ref.forward_features(x))
    result = run_validate(["--ckpt_path", str(dst), "--data_dir", str(cifar_20), "--dataset", "imagefolder",
                           "--val_split", "test", "--batch_size", "10", "--num_parallel_workers", "0",
                           "--device", "cpu"])
    assert result["num_images"] == 20 and 0.0 <= result["top1"] <= 100.0 and result["model"] == name


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_vitkit_export_self_check_passes_for_every_family(tmp_path, name):
    """`vitkit export --format onnx --dynamic_size` of each family (one block, a 2x2 grid): its own check (logits
    against eager at several batches and sizes, top-1 agreement on real images) passes."""
    from vitkit.data.preprocess import DataConfig
    from vitkit.engine.checkpoint import save_checkpoint
    from vitkit.tools.export import run_export
    from vitkit.tools.inference import load_inference_model

    spec = get_spec(name)
    img = spec.arch.patch_size * 2
    torch.manual_seed(0)
    model = perturb(vitkit.create_model(name, depth=1, img_size=img, num_classes=3))
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, model_name=name, class_names=["a", "b", "c"],
                           data_config=DataConfig(img, spec.mean, spec.std, spec.interpolation, spec.crop_pct))
    meta = run_export(load_inference_model(str(ckpt)), "onnx", tmp_path / "m.onnx", dynamic_size=True,
                      check_folder=str(SAMPLE / "test"), check_count=8)
    check = meta["check"]
    assert check["passed"] and max(check[s]["max_abs_diff"] for s in ("native_size", "other_size")) <= 1e-4
    assert check["native_size"]["inputs"].startswith("8 images from")  # real images, not random ones


# -- the families' own repositories' files --------------------------------------------------------------------------
# Each writer below puts timm's tensors into the layout the family's repository publishes; the test first has timm
# read the file back with its own reader (so the writer is checked against timm, not against vitkit), then vitkit.

def dinov2_original(sd: dict) -> dict:
    """facebookresearch/dinov2's torch.hub layout: the class token's position row beside the grid's, the
    registers as register_tokens, a mask_token (the inverse of timm's _convert_dinov2)."""
    out = {k: v for k, v in sd.items() if k != "reg_token"}
    cls_pos = torch.randn(1, 1, sd["pos_embed"].shape[-1], generator=torch.Generator().manual_seed(3)) * 0.5
    out["cls_token"], out["pos_embed"] = sd["cls_token"] - cls_pos, torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    out["register_tokens"], out["mask_token"] = sd["reg_token"], torch.zeros(1, sd["cls_token"].shape[-1])
    return out


def openclip_original(sd: dict) -> dict:
    """An OpenAI CLIP / OpenCLIP state dict (`visual.*` beside the text tower; the inverse of timm's
    _convert_openai_clip): the head is the bias-free image projection `visual.proj` (D, P)."""
    rules = [(r"patch_embed\.proj\.weight", "conv1.weight"), (r"norm_pre\.", "ln_pre."), (r"norm\.", "ln_post."),
             (r"blocks\.(\d+)\.norm([12])\.", r"transformer.resblocks.\1.ln_\2."),
             (r"blocks\.(\d+)\.attn\.qkv\.", r"transformer.resblocks.\1.attn.in_proj_"),
             (r"blocks\.(\d+)\.attn\.proj\.", r"transformer.resblocks.\1.attn.out_proj."),
             (r"blocks\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
             (r"blocks\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj.")]
    out = {"visual.class_embedding": sd["cls_token"][0, 0], "visual.positional_embedding": sd["pos_embed"][0],
           "visual.proj": sd["head.weight"].T, "logit_scale": torch.tensor(4.6),
           "transformer.resblocks.0.ln_1.weight": torch.ones(8)}  # a text-tower tensor, left out by the reader
    for key, value in sd.items():
        for pattern, repl in rules:
            if re.match(pattern, key):
                out["visual." + re.sub(pattern, repl, key)] = value
                break
    return out


def big_vision_npz(sd: dict, num_heads: int, path: Path) -> Path:
    """big_vision's SigLIP image tower (`params/img/`, per-block arrays, MAPHead_0): the inverse of timm's
    _load_weights."""
    import numpy as np

    d = sd["patch_embed.proj.weight"].shape[0]
    heads = lambda w: w.T.reshape(d, num_heads, -1)  # noqa: E731 - (out, in) -> (in, heads, head_dim)
    out_k = lambda w: w.reshape(d, num_heads, -1).permute(1, 2, 0)  # noqa: E731 - proj (D, D) -> (heads, hd, D)
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}

    def attention(base: str, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b) -> None:
        for n, (kw, kb) in {"query": (q_w, q_b), "key": (k_w, k_b), "value": (v_w, v_b)}.items():
            w[f"{base}{n}/kernel"], w[f"{base}{n}/bias"] = heads(kw), kb.reshape(num_heads, -1)
        w[f"{base}out/kernel"], w[f"{base}out/bias"] = out_k(proj_w), proj_b

    def mlp(base: str, prefix: str) -> None:
        for r in (0, 1):
            w[f"{base}Dense_{r}/kernel"], w[f"{base}Dense_{r}/bias"] = sd[f"{prefix}fc{r + 1}.weight"].T, \
                sd[f"{prefix}fc{r + 1}.bias"]

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, p = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"]
        q, k, v = sd[f"{p}attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[f"{p}attn.qkv.bias"].chunk(3)
        attention(f"{b}MultiHeadDotProductAttention_0/", q, qb, k, kb, v, vb, sd[f"{p}attn.proj.weight"],
                  sd[f"{p}attn.proj.bias"])
        mlp(f"{b}MlpBlock_0/", f"{p}mlp.")
    h = "MAPHead_0/"
    w[h + "probe"] = sd["attn_pool.latent"]
    k, v = sd["attn_pool.kv.weight"].chunk(2)
    kb, vb = sd["attn_pool.kv.bias"].chunk(2)
    attention(h + "MultiHeadDotProductAttention_0/", sd["attn_pool.q.weight"], sd["attn_pool.q.bias"], k, kb, v, vb,
              sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"])
    w[h + "LayerNorm_0/scale"], w[h + "LayerNorm_0/bias"] = sd["attn_pool.norm.weight"], sd["attn_pool.norm.bias"]
    mlp(h + "MlpBlock_0/", "attn_pool.mlp.")
    np.savez(path, **{f"params/img/{k}": v.detach().numpy() for k, v in w.items()})
    return path


@pytest.mark.parametrize("name", ["vit_s_14_reg4_dinov2", "vit_b_16_clip_224", "vit_b_16_siglip_224"])
def test_original_repository_files_load(tmp_path, name):
    """DINOv2's torch.hub .pth, an OpenCLIP state dict and big_vision's SigLIP .npz: timm reads the written file to
    its own model's features (the writer is right), then `vitkit convert` reads it to the same features, with the
    family's registered architecture and preprocessing."""
    from timm.models.vision_transformer import _load_weights, checkpoint_filter_fn

    spec = get_spec(name)
    img = spec.arch.patch_size * 4
    ref = timm_model(name, depth=2, img_size=img)
    if name.endswith("clip_224"):
        with torch.no_grad():
            ref.head.bias.zero_()  # the projection has no bias
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    fresh = timm.create_model(timm_model_name(name), pretrained=False, depth=2, img_size=img).eval()
    if "siglip" in name:
        src = big_vision_npz(sd, spec.arch.num_heads, tmp_path / "siglip.npz")
        _load_weights(fresh, str(src))
    else:
        original = dinov2_original(sd) if "dinov2" in name else openclip_original(sd)
        src = save(original, tmp_path / "original.pth")
        fresh.load_state_dict(checkpoint_filter_fn(dict(original), fresh))
    x = images(img)
    with torch.no_grad():
        assert_same(fresh.forward_features(x), ref.forward_features(x))  # timm agrees with the writer
    dst = tmp_path / "converted.safetensors"
    assert convert_main([str(src), str(dst), "--model", name, "--override", "depth=2", "--img_size", str(img)]) == 0
    ckpt = load_checkpoint(dst)
    assert ckpt.arch == spec.arch.replace(depth=2, img_size=img, num_classes=ref.num_classes)
    assert preprocessing(ckpt.data_config.to_dict())[:3] == preprocessing(
        {"mean": spec.mean, "std": spec.std, "crop_pct": spec.crop_pct, "interpolation": spec.interpolation})[:3]
    assert_same_model(ckpt.build_model().eval(), ref, x)


def test_dinov2_giant_original_names_its_swiglu_as_timm():
    """ViT-g/14's w12/w3 (SwiGLUFFNFused) become timm's fc1/fc2: the keys equal timm's model's (meta tensors)."""
    from vitkit.weights.formats import from_original

    with torch.device("meta"):
        ref = timm.create_model(timm_model_name("vit_g_14_reg4_dinov2"), pretrained=False, depth=1)
    sd = {k: torch.zeros(v.shape) if k in ("pos_embed", "cls_token", "reg_token") else v
          for k, v in ref.state_dict().items()}
    original = {re.sub(r"mlp\.fc1", "mlp.w12", re.sub(r"mlp\.fc2", "mlp.w3", k)): v
                for k, v in dinov2_original(sd).items()}
    conv = from_original(original, "dinov2")
    assert set(conv.state_dict) == set(ref.state_dict()) and conv.arch["mlp"] == "swiglu"


@pytest.mark.parametrize("name", ONE_PER_FAMILY + ["vit_g_14_reg4_dinov2", "eva02_b_14_224", "vit_sp_16_dinov3"])
def test_infer_arch_reads_the_family_structure(name):
    """What the keys say: registers, attention pooling, pre-norm (no patch-embedding bias), SwiGLU (fc1 twice the
    width fc2 reads), the MLP norm, qkv bias, layer scale; and the input size the position table was made for,
    counting register rows (none with no_embed_class). Family tensors get no plain-ViT timm preprocessing."""
    arch = get_spec(name).arch
    with torch.device("meta"):
        ref = timm.create_model(timm_model_name(name), pretrained=False, depth=1)
    conv = from_timm(ref.state_dict())
    got = conv.arch
    assert got["reg_tokens"] == arch.reg_tokens and got["class_token"] == arch.class_token
    assert got["pre_norm"] == arch.pre_norm and got["qkv_bias"] == arch.qkv_bias
    assert got["mlp"] == arch.mlp and got["scale_mlp_norm"] == arch.scale_mlp_norm
    assert ("init_values" in got) == bool(arch.init_values)
    assert got.get("global_pool", arch.global_pool) == arch.global_pool
    if arch.pos_embed == "learn":
        assert weights_img_size(conv.state_dict) == arch.img_size
    assert format_data("timm", conv.state_dict) == {}  # the registered (timm) preprocessing decides
    assert ("timm Eva layout" in " ".join(conv.notes)) == is_eva(ref.state_dict())


def test_partial_eva_layer_is_one_line_weights_error():
    with torch.device("meta"):
        sd = timm.create_model("eva02_base_patch14_224", pretrained=False, depth=1).state_dict()
    del sd["blocks.0.attn.v_proj.weight"]
    with pytest.raises(WeightsError, match=r"blocks\.0\.attn\.v_proj\.weight is missing"):
        eva_to_vitkit(sd)


# -- benchmark: timm's twin ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ONE_PER_FAMILY + ["eva02_b_14_224", "vit_sp_16_dinov3", "vit_g_14_reg4_dinov2"])
def test_benchmark_twin_is_timm_s_model_with_our_weights(name):
    """`vitkit benchmark --compare timm`'s reference for a family name: timm's own model of its timm name holding
    our weights (vitkit_to_eva for Eva, the inverse of eva_to_vitkit): the same outputs, so the same work."""
    spec = get_spec(name)
    cfg = build_config(name, depth=2, img_size=spec.arch.patch_size * 4)
    torch.manual_seed(0)
    ours = perturb(VisionTransformer(cfg))
    if cfg.rope != "none" and cfg.qkv_bias:  # Eva has no k bias (under RoPE it would matter): zero, as from Eva
        with torch.no_grad():
            for block in ours.blocks:
                block.attn.qkv.bias[cfg.embed_dim:2 * cfg.embed_dim] = 0
    ref = benchmark.same_weights(benchmark.timm_twin(cfg, timm_model_name(name)), ours).eval()
    assert type(ref).__name__ == ("Eva" if spec.arch.rope != "none" else "VisionTransformer")
    assert_same_model(ours, ref, images(cfg.img_size))
    sd = ref.state_dict()
    if is_eva(sd):  # the two mappings are inverses on timm's layout
        back = vitkit_to_eva(eva_to_vitkit(sd), sd)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("kw", [dict(reg_tokens=4, no_embed_class=True, act="quick_gelu", init_values=1e-5),
                                dict(class_token=False, global_pool="map", act="gelu_tanh"),
                                dict(mlp="swiglu", mlp_ratio=8.0, global_pool="avg", pre_norm=True)],
                         ids=["registers-quick_gelu", "map-gelu_tanh", "swiglu-avg-pre_norm"])
def test_benchmark_twin_of_a_plain_config_has_the_new_options(kw):
    cfg = build_config("vit_s_16_224", depth=2, img_size=64, **kw)
    torch.manual_seed(0)
    ours = perturb(VisionTransformer(cfg))
    ref = benchmark.same_weights(benchmark.timm_twin(cfg), ours).eval()
    assert_same_model(ours, ref, images(64))
    with pytest.raises(ValueError, match="RoPE"):
        benchmark.timm_twin(cfg.replace(rope="eva", pos_embed="none"))


def test_benchmark_compare_timm_runs_for_a_family(capsys):
    argv = ["benchmark", "--model", "eva02_ti_14_224", "--compare", "timm", "--batch_size", "1", "--steps", "1",
            "--warmup", "0", "--repeats", "1", "--mode", "both", "--device", "cpu"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("| timm |") == 2 and out.count("| vitkit |") == 2


# -- `vitkit models` ------------------------------------------------------------------------------------------

def test_vitkit_models_lists_the_families(capsys):
    for family in FAMILIES:
        assert cli_main(["models", "--family", family, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["name"] for r in rows] == list_models(family=family) and rows
        assert all(r["family"] == family and r["timm_name"] for r in rows if family != "vit")
    assert cli_main(["models", "vit_large_patch16_dinov3.lvd1689m", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "vit_l_16_dinov3" and row["pretrained"] == ["lvd1689m", "sat493m"]
    assert cli_main(["models", "--family", "dinov3"]) == 0
    table = capsys.readouterr().out
    assert all(n in table for n in list_models(family="dinov3")) and "vit_huge_plus_patch16_dinov3" in table
    assert cli_main(["models", "vit_b_32_224", "--family", "clip"]) == 2
    assert "is a vit model, not clip" in capsys.readouterr().err


def test_pretrained_true_takes_the_family_source_and_its_preprocessing(tmp_path, monkeypatch):
    """`pretrained=True` (and a timm spelling with a tag) resolves to the family's sources-table entry, whose
    preprocessing comes with the weights: here a stand-in for DINOv3's SAT-493M weights (satellite statistics),
    served from a file URL since nothing is downloaded in tests."""
    from vitkit.weights import sources
    from vitkit.weights.sources import WeightSource

    ref = timm_model("vit_l_16_dinov3", depth=2, img_size=64)
    url = save(ref.state_dict(), tmp_path / "sat.safetensors").resolve().as_uri()
    sat = sources_for("vit_l_16_dinov3")[1]
    fake = WeightSource(sat.tag, url, "timm", 0, 256, sat.mean, sat.std, crop_pct=1.0)
    monkeypatch.setitem(sources.SOURCES, "vit_l_16_dinov3", [sources_for("vit_l_16_dinov3")[0], fake])
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path / "home"))
    model = vitkit.create_model("vit_large_patch16_dinov3.sat493m", pretrained=True, depth=2, img_size=64).eval()
    assert model.model_name == "vit_l_16_dinov3" and model.pretrained_cfg["tag"] == "sat493m"
    assert model.pretrained_cfg["data"]["mean"] == (0.430, 0.411, 0.296)
    assert_same_model(model, ref, images(64))


def test_benchmark_paired_ratio_cancels_drift(monkeypatch):
    """vitkit's timings [1, 3, 3] s and timm's [1.1, 1.1, 3.3] s in the same three repeats: the medians say
    vitkit is 0.37x timm, but in every repeat but one timm took 1.1x vitkit's time: the paired ratio is 1.1."""
    from vitkit.tools import benchmark

    calls = iter([1.0, 1.1, 1.1, 3.0, 3.0, 3.3])  # repeat 0: vitkit, timm; 1: timm, vitkit; 2: vitkit, timm
    monkeypatch.setattr(benchmark, "time_steps", lambda fn, dev, steps: next(calls))
    res = benchmark.run("vit_n_4_32", 1, mode="infer", compare="timm", steps=1, warmup=0, repeats=3, device="cpu")
    ours, ref = (next(r for r in res if r.impl == impl) for impl in ("vitkit", "timm"))
    assert ours.images_per_s / ref.images_per_s == pytest.approx(1.1 / 3.0)
    assert ours.paired_ratio == pytest.approx(1.1) and ref.paired_ratio is None
