"""Model names: one resolver (vitkit, MindCV and timm spellings) behind every entry point, one-line errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit.cli import main as cli_main
from vitkit.errors import UnknownModelError, VitkitError, WeightsError
from vitkit.models import create_model, get_spec, list_models, registry, resolve_model, resolve_model_name
from vitkit.models.registry import build_config, timm_name
from vitkit.weights import load_weights, model_info, sources
from vitkit.weights.sources import SOURCES, WeightSource, default_source

# The 15 ImageNet-scale names and their timm spelling (timm/models/vision_transformer.py).
TIMM = {
    "vit_ti_16_224": "vit_tiny_patch16_224", "vit_ti_16_384": "vit_tiny_patch16_384",
    "vit_s_16_224": "vit_small_patch16_224", "vit_s_16_384": "vit_small_patch16_384",
    "vit_s_32_224": "vit_small_patch32_224", "vit_s_32_384": "vit_small_patch32_384",
    "vit_b_16_224": "vit_base_patch16_224", "vit_b_16_384": "vit_base_patch16_384",
    "vit_b_32_224": "vit_base_patch32_224", "vit_b_32_384": "vit_base_patch32_384",
    "vit_l_16_224": "vit_large_patch16_224", "vit_l_16_384": "vit_large_patch16_384",
    "vit_l_32_224": "vit_large_patch32_224", "vit_l_32_384": "vit_large_patch32_384",
    "vit_h_14_224": "vit_huge_patch14_224",
}


@pytest.mark.parametrize("given, ours", [
    ("vit_b_32_224", "vit_b_32_224"),  # ours = MindCV's registry name
    ("vit_b_32", "vit_b_32_224"),  # MindCV's short --model=vit_b_32: the 224 px model
    ("vit_l_16", "vit_l_16_224"),
    ("vit_h_14", "vit_h_14_224"),
    ("vit_ti_16", "vit_ti_16_224"),
    ("ViT-B/32", "vit_b_32_224"),  # the paper's spelling
    ("ViT-L/16", "vit_l_16_224"),
    ("vit-b-16-384", "vit_b_16_384"),
    ("VIT_B_32_384", "vit_b_32_384"),
    ("vit_b32_224", "vit_b_32_224"),
    ("vit_n_4_32", "vit_n_4_32"),
    ("vit_base_patch32_224", "vit_b_32_224"),  # timm
    ("vit_large_patch16_384", "vit_l_16_384"),
    ("vit_tiny_patch16_224", "vit_ti_16_224"),
    ("vit_small_patch32_384", "vit_s_32_384"),
    ("vit_huge_patch14_224", "vit_h_14_224"),
    ("vit_base_patch32_224.augreg_in21k_ft_in1k", "vit_b_32_224"),
    ("vit_base_patch32_224.augreg2_in21k_ft_in1k", "vit_b_32_224"),  # any tag parses; the weights layer checks it
    ("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_b_16_224"),
])
def test_every_spelling_resolves_to_our_name(given, ours):
    assert resolve_model_name(given) == ours


def test_the_family_and_tag_of_a_spelling():
    assert resolve_model("vit_b_32") == registry.ModelName("vit_b_32_224", "vitkit", None, "vit_b_32")
    timm = resolve_model("vit_base_patch32_224.augreg_in1k")
    assert (timm.name, timm.family, timm.tag) == ("vit_b_32_224", "timm", "augreg_in1k")
    assert resolve_model("vit_large_patch16_384").tag is None


def test_timm_spellings_are_timm_s_architectures():
    timm = pytest.importorskip("timm")
    assert {n: timm_name(n) for n in list_models() if timm_name(n)} == TIMM
    for ours, theirs in TIMM.items():
        with torch.device("meta"):
            ref = timm.create_model(theirs, pretrained=False, num_classes=1000)  # some default to in21k heads
            mine = create_model(theirs)
        assert mine.model_name == ours
        assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_timm_names_we_do_not_register_are_unknown_with_suggestions():
    timm = pytest.importorskip("timm")
    plain = [n for n in timm.list_models("vit_*") if re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch\d+_\d+", n)]
    missing = sorted(set(plain) - set(TIMM.values()))
    assert missing == ["vit_base_patch8_224", "vit_large_patch14_224", "vit_small_patch8_224"]
    with pytest.raises(UnknownModelError) as e:
        resolve_model("vit_base_patch8_224")
    assert e.value.suggestions[0] == "vit_base_patch16_224"  # timm's spelling for a timm-style name
    with pytest.raises(UnknownModelError):
        resolve_model("vit_tiny_patch4_32")  # timm has no 32 px ViTs: no timm spelling of vit_ti_4_32


def test_unknown_name_is_one_line_vitkit_error_and_key_error():
    with pytest.raises(UnknownModelError) as e:
        get_spec("vit_b_33")
    err = e.value
    assert isinstance(err, VitkitError) and isinstance(err, KeyError)
    assert str(err) == "unknown model 'vit_b_33'. Did you mean vit_b_32_224, vit_b_32_384, vit_b_16_224?"
    assert "\n" not in str(err) and not str(err).startswith(("'", '"'))  # not KeyError's quoted repr
    assert err.suggestions[:2] == ["vit_b_32_224", "vit_b_32_384"]
    with pytest.raises(KeyError, match="vit_b_16_224"):  # code that catches KeyError still does
        create_model("vit_b_16_244")


@pytest.mark.parametrize("given, first", [
    ("vit_b_33", ["vit_b_32_224", "vit_b_32_384"]),
    ("ViT-B/33", ["vit_b_32_224", "vit_b_32_384"]),
    ("vit_b_16_244", ["vit_b_16_224", "vit_b_16_384"]),
    ("vit_b_16_22", ["vit_b_16_224", "vit_b_16_384"]),
    ("vit_b_224", ["vit_b_16_224", "vit_b_32_224"]),
    ("vit_b_4", ["vit_b_4_32"]),  # a CIFAR model when it really is the closest
    ("vit_ti_4_31", ["vit_ti_4_32"]),
    ("vit_base_patch33_224", ["vit_base_patch32_224", "vit_base_patch32_384"]),
    ("vit_large_patch16_448", ["vit_large_patch16_384"]),
])
def test_suggestions_rank_size_then_family_then_patch_and_input(given, first):
    with pytest.raises(UnknownModelError) as e:
        resolve_model(given)
    assert e.value.suggestions[:len(first)] == first
    if not any(s.endswith("_4_32") for s in first):
        assert not any(s.endswith("_4_32") for s in e.value.suggestions), e.value.suggestions


def test_no_close_name_points_to_the_listing():
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet50'\. Run `vitkit models` to list them\."):
        resolve_model("resnet50")


def test_a_tag_on_our_spelling_says_where_tags_go():
    with pytest.raises(UnknownModelError, match=r"vit_base_patch32_224\.TAG.*pretrained=TAG"):
        resolve_model("vit_b_32_224.tv_in1k")


def test_every_entry_point_goes_through_the_resolver():
    assert get_spec("vit_b_32").name == "vit_b_32_224"
    assert build_config("vit_base_patch32_224", depth=1).depth == 1
    assert create_model("ViT-Ti/16", depth=1).model_name == "vit_ti_16_224"
    assert vitkit.create_model("vit_tiny_patch16_224", depth=1).model_name == "vit_ti_16_224"
    assert model_info("vit_b_32")["name"] == "vit_b_32_224"
    assert model_info("vit_b_32_224")["aliases"] == ["vit_b_32", "vit_base_patch32_224"]
    for bad in ("vit_b_33", "nope"):
        with pytest.raises(UnknownModelError):
            vitkit.create_model(bad)
        with pytest.raises(UnknownModelError):
            load_weights(True, model_name=bad)


def test_list_models_matches_any_spelling():
    assert list_models("vit_base_*") == ["vit_b_16_224", "vit_b_16_384", "vit_b_32_224", "vit_b_32_384"]
    assert list_models("vit_b_32") == ["vit_b_32_224"]
    assert list_models("ViT-L/*") == list_models("vit_l_*")
    assert list_models("*patch32_384") == ["vit_b_32_384", "vit_l_32_384", "vit_s_32_384"]
    assert list_models() == list(registry._REGISTRY)


def test_timm_spelling_stands_for_timm_preprocessing():
    ours, theirs = get_spec("vit_b_32_224"), get_spec("vit_base_patch32_224")
    assert ours.arch == theirs.arch and ours.name == theirs.name == "vit_b_32_224"
    assert (ours.mean, ours.crop_pct, ours.interpolation, ours.family) == \
        ((0.485, 0.456, 0.406), 0.875, "bicubic", "vitkit")
    assert (theirs.mean, theirs.std, theirs.crop_pct, theirs.interpolation, theirs.family) == \
        ((0.5,) * 3, (0.5,) * 3, 0.9, "bicubic", "timm")
    assert get_spec("vit_base_patch16_384").crop_pct == 1.0
    assert model_info("vit_base_patch32_224")["mean"] == (0.5, 0.5, 0.5)


def test_timm_preprocessing_and_default_tags_agree_with_timm():
    """Every timm tag in the table uses the preprocessing the timm spelling stands for, and a timm spelling's
    default source is timm's own default tag (timm's pretrained cfgs, read offline)."""
    pytest.importorskip("timm")
    from timm.models import get_pretrained_cfg

    for ours, theirs in TIMM.items():
        spec = get_spec(theirs)
        default = default_source(ours, family="timm")
        assert default is not None and default.tag == get_pretrained_cfg(theirs).tag, ours
        for s in SOURCES[ours]:
            if s.format != "timm":
                continue
            cfg = get_pretrained_cfg(f"{theirs}.{s.tag}")
            assert (tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct, cfg.interpolation) == \
                (spec.mean, spec.std, spec.crop_pct, spec.interpolation) == (s.mean, s.std, s.crop_pct,
                                                                              s.interpolation), f"{theirs}.{s.tag}"


def _tiny_ti16(path: Path) -> str:
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in create_model("vit_ti_16_224", depth=1).state_dict().items()}, str(path))
    return path.resolve().as_uri()


def test_timm_spelling_and_tag_choose_the_default_source(tmp_path, monkeypatch):
    tv = WeightSource("tv_fake", _tiny_ti16(tmp_path / "a.safetensors"), "torchvision")  # a non-timm entry first
    first = WeightSource("timm_first", _tiny_ti16(tmp_path / "b.safetensors"), "timm")
    second = WeightSource("timm_second", _tiny_ti16(tmp_path / "c.safetensors"), "timm", crop_pct=0.95)
    monkeypatch.setitem(sources.SOURCES, "vit_ti_16_224", [tv, first, second])
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path / "home"))
    assert default_source("vit_ti_16_224").tag == "tv_fake"
    model = vitkit.create_model("vit_tiny_patch16_224", pretrained=True, depth=1)
    assert model.pretrained_cfg["tag"] == "timm_first" and model.model_name == "vit_ti_16_224"
    tagged = vitkit.create_model("vit_tiny_patch16_224.timm_second", pretrained=True, depth=1)
    assert tagged.pretrained_cfg["tag"] == "timm_second" and tagged.pretrained_cfg["data"]["crop_pct"] == 0.95
    assert load_weights(True, model_name="vit_ti_16").source is tv  # our spelling: the name's first source
    with pytest.raises(WeightsError, match=r"'tv_fake' is not a timm tag .*vit_tiny_patch16_224\.timm_first"):
        vitkit.create_model("vit_tiny_patch16_224.tv_fake")


def test_unknown_timm_tag_is_an_error_listing_the_known_ones():
    with pytest.raises(WeightsError, match=r"'augreg2_in21k_ft_in1k' is not a timm tag vitkit knows for "
                                           r"vit_base_patch32_224 \(known: vit_base_patch32_224\.augreg_in21k_ft_in1k"):
        vitkit.create_model("vit_base_patch32_224.augreg2_in21k_ft_in1k")
    # a known tag builds the architecture without weights, as timm.create_model(name.tag) does
    assert vitkit.create_model("vit_base_patch32_224.augreg_in1k", depth=1).model_name == "vit_b_32_224"


@pytest.mark.parametrize("argv", [
    ["models", "vit_b_33"],
    ["models", "vit_base_patch32_224.nope"],
    ["convert", "in.safetensors", "out.safetensors", "--model", "vit_b_33"],
    ["benchmark", "--model", "vit_b_33"],
])
def test_cli_unknown_name_is_one_error_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "convert":
        _tiny_ti16(tmp_path / "in.safetensors")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and ("vit_b_3" in err[0] or "nope" in err[0]), err


def test_cli_models_accepts_every_spelling(capsys):
    import json

    assert cli_main(["models", "vit_base_patch32_224", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["vit_b_32_224"] and rows[0]["crop_pct"] == 0.9
    assert cli_main(["models", "ViT-B/*", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == list_models("vit_b_*")
