"""Published pretrained weights for each registered name; the first source of a name is its default.

Every fact here was read from the publisher's own code or documentation:
  - timm: `default_cfgs` in timm/models/vision_transformer.py (timm 1.0.31). timm's `_cfg` defaults: 1000 classes,
    crop_pct 0.9 (1.0 at 384 px), bicubic, mean = std = (0.5, 0.5, 0.5). timm publishes top-1 in its results
    CSVs, which were not checked here, so timm entries carry no top-1.
  - Google .npz: the `url` of the same timm cfgs (storage.googleapis.com/vit_models/augreg/...).
  - torchvision: `ViT_*_Weights` in torchvision/models/vision_transformer.py (0.29.1): URL, acc@1, eval
    transform (ImageClassification: resize 256 -> crop 224 bilinear unless stated; crop_pct = crop / resize).
  - MindCV: mindspore-lab/mindcv configs/vit/README.md (URLs, top-1), mindcv/models/vit.py history (URLs of the
    earlier layouts), configs/vit/vit_b32_224_ascend.yaml (bicubic) and MindCV's defaults (crop_pct 0.875,
    ImageNet mean/std); the 910v2 file from its MindSpore Hub card (top-1 77.53, "asset-sha256: a2165e72").
  - the backbone families (DINOv2, SigLIP, CLIP, EVA-02, ROPE-ViT, DINOv3, DeiT III): `default_cfgs` of timm
    1.0.31 (vision_transformer.py, eva.py, deit.py): hub id (`hf_hub_id`, which for timm's quick_gelu CLIP names
    is the repo of the GELU name: the same files), classes, input size, crop_pct, mean/std, license (in `note`).
    tests/test_backbone_families.py checks every entry against `timm.models.get_pretrained_cfg` offline. None of
    these files was downloaded here (no network): the layout of each is that of timm's own model of the same
    name, which the same tests load through vitkit (random weights, saved as timm saves them).
Entries with `verified=False` are published but their layout was mapped from source code only (no file of
that layout was loaded); see `note`.

How a source is chosen: `pretrained=True` takes a name's first source, or for a timm spelling of the name
(`vit_base_patch32_224`) its first timm source (timm's own default tag; checked against timm's registry by
tests/test_names.py), or for `vit_base_patch32_224.TAG` the source with that tag; `pretrained="TAG"` picks
one by tag, a hub id or URL of the table picks that entry, and a local file whose name is a published file
name (`vit_b_16_lc_swag-4e70ced5.pth`) is recognised by it (`find_source_by_file`), so it gets that
source's preprocessing rather than only its format's (`vitkit.weights.formats.format_data`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from vitkit.constants import IMAGENET_MEAN, IMAGENET_STD
from vitkit.models.registry import INCEPTION_MEAN, INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@dataclass(frozen=True)
class WeightSource:
    """One set of published weights for a registered name, with the eval preprocessing it was made for."""

    tag: str  # unique per name; `pretrained="<tag>"` selects it
    location: str  # hub id (owner/repo) or URL
    format: str  # timm | torchvision | jax | mindcv
    num_classes: int = 1000
    img_size: int = 224
    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    top1: float | None = None  # ImageNet-1k val top-1 (%) as published by the source
    sha256: str | None = None  # digest or prefix to check the download against (beside the file-name prefix)
    verified: bool = True
    note: str = ""

    def data_hints(self) -> dict[str, object]:
        return {"mean": self.mean, "std": self.std, "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "input_size": self.img_size}


_GCS = "https://storage.googleapis.com/vit_models/augreg/"
_TV = "https://download.pytorch.org/models/"
_MS = "https://download.mindspore.cn/toolkits/mindcv/vit/"


def _timm(model: str, tag: str, *, num_classes: int = 1000, img: int = 224, npz: str = "") -> list[WeightSource]:
    """A timm hub source, and Google's original .npz of the same weights when timm lists its URL."""
    crop = 1.0 if img >= 384 else 0.9
    out = [WeightSource(tag, f"timm/{model}.{tag}", "timm", num_classes, img, crop_pct=crop)]
    if npz:
        out.append(WeightSource(f"{tag}_npz", _GCS + npz, "jax", num_classes, img, crop_pct=crop))
    return out


def _tv(tag: str, file: str, top1: float, *, img: int = 224, resize: int = 256, swag: bool = False) -> WeightSource:
    return WeightSource(tag, _TV + file, "torchvision", 1000, img, IMAGENET_MEAN, IMAGENET_STD,
                        crop_pct=img / resize if not swag else 1.0,
                        interpolation="bicubic" if swag else "bilinear", top1=top1)


def _mindcv(tag: str, url: str, top1: float | None, *, verified: bool = True, note: str = "") -> WeightSource:
    return WeightSource(tag, url, "mindcv", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.875,
                        interpolation="bicubic", top1=top1, verified=verified, note=note)


_NOT_HERE = "not downloaded here; layout checked against timm's own model of this name"
_IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
_CLIP = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
_HALF = (INCEPTION_MEAN, INCEPTION_STD)
_SAT = ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))  # DINOv3's SAT-493M (satellite) weights


def _hub(model: str, tag: str, stats: tuple[tuple[float, ...], tuple[float, ...]], *, img: int, crop: float,
         num_classes: int = 0, repo: str | None = None, license: str = "") -> WeightSource:
    """A timm hub source of a backbone family: `timm/<repo or model>.<tag>` with timm's cfg for that tag."""
    note = f"{license} license; {_NOT_HERE}" if license else _NOT_HERE
    return WeightSource(tag, f"timm/{repo or model}.{tag}", "timm", num_classes, img, stats[0], stats[1],
                        crop_pct=crop, interpolation="bicubic", note=note)


_I21K_FT = "-i21k-300ep-lr_0.001-aug_{aug}-wd_{wd}-do_{do}-sd_{do}--imagenet2012-steps_20k-lr_{lr}-res_{img}.npz"
_I1K = "-i1k-300ep-lr_0.001-aug_{aug}-wd_0.1-do_{do}-sd_{do}--imagenet2012-steps_20k-lr_0.01-res_{img}.npz"
_I21K = "-i21k-300ep-lr_0.001-aug_{aug}-wd_{wd}-do_{do}-sd_{do}.npz"
_V1 = "first MindCV layout (backbone.transformer.layers...), mapped from mindcv/models/vit.py; not loaded here"
_V2 = "2023 MindCV layout (head.classifier), mapped from mindcv/models/vit.py; not loaded here"

SOURCES: dict[str, list[WeightSource]] = {
    "vit_b_16_224": [
        *_timm("vit_base_patch16_224", "augreg2_in21k_ft_in1k"),
        *_timm("vit_base_patch16_224", "augreg_in21k_ft_in1k",
               npz="B_16" + _I21K_FT.format(aug="medium1", wd="0.1", do="0.0", lr="0.01", img=224)),
        *_timm("vit_base_patch16_224", "augreg_in1k", npz="B_16" + _I1K.format(aug="strong2", do="0.1", img=224)),
        *_timm("vit_base_patch16_224", "orig_in21k_ft_in1k"),
        *_timm("vit_base_patch16_224", "augreg_in21k", num_classes=21843,
               npz="B_16" + _I21K.format(aug="medium1", wd="0.1", do="0.0")),
        *_timm("vit_base_patch16_224", "orig_in21k", num_classes=0),
        _tv("tv_in1k", "vit_b_16-c867db91.pth", 81.072),
        _tv("tv_swag_lc", "vit_b_16_lc_swag-4e70ced5.pth", 81.886, swag=True),
    ],
    "vit_b_16_384": [
        *_timm("vit_base_patch16_384", "augreg_in21k_ft_in1k", img=384,
               npz="B_16" + _I21K_FT.format(aug="medium1", wd="0.1", do="0.0", lr="0.01", img=384)),
        *_timm("vit_base_patch16_384", "augreg_in1k", img=384,
               npz="B_16" + _I1K.format(aug="strong2", do="0.1", img=384)),
        *_timm("vit_base_patch16_384", "orig_in21k_ft_in1k", img=384),
        _tv("tv_swag", "vit_b_16_swag-9ac1b537.pth", 85.304, img=384, swag=True),
    ],
    "vit_b_32_224": [
        *_timm("vit_base_patch32_224", "augreg_in21k_ft_in1k",
               npz="B_32" + _I21K_FT.format(aug="medium1", wd="0.03", do="0.0", lr="0.03", img=224)),
        *_timm("vit_base_patch32_224", "augreg_in1k", npz="B_32" + _I1K.format(aug="medium2", do="0.1", img=224)),
        *_timm("vit_base_patch32_224", "sam_in1k"),
        *_timm("vit_base_patch32_224", "augreg_in21k", num_classes=21843,
               npz="B_32" + _I21K.format(aug="medium1", wd="0.03", do="0.0")),
        *_timm("vit_base_patch32_224", "orig_in21k", num_classes=0),
        _tv("tv_in1k", "vit_b_32-d86f8d99.pth", 75.912),
        _mindcv("mindcv_in1k", _MS + "vit_b_32_224-4a1c9d8e.ckpt", 77.45),
        _mindcv("mindcv_910v2", "https://download-mindspore.osinfra.cn/toolkits/mindcv/vit/"
                                "vit_b_32_224-a2165e72-910v2.ckpt", 77.53),
        _mindcv("mindcv_v2", _MS + "vit_b_32_224-f50866e8.ckpt", None, verified=False, note=_V2),
        _mindcv("mindcv_v1", _MS + "vit_b_32_224-7553218f.ckpt", None, verified=False, note=_V1),
    ],
    "vit_b_32_384": [
        *_timm("vit_base_patch32_384", "augreg_in21k_ft_in1k", img=384,
               npz="B_32" + _I21K_FT.format(aug="light1", wd="0.1", do="0.0", lr="0.03", img=384)),
        *_timm("vit_base_patch32_384", "augreg_in1k", img=384,
               npz="B_32" + _I1K.format(aug="medium2", do="0.1", img=384)),
    ],
    "vit_l_16_224": [
        *_timm("vit_large_patch16_224", "augreg_in21k_ft_in1k",
               npz="L_16" + _I21K_FT.format(aug="medium1", wd="0.1", do="0.1", lr="0.01", img=224)),
        *_timm("vit_large_patch16_224", "augreg_in21k", num_classes=21843,
               npz="L_16" + _I21K.format(aug="medium1", wd="0.1", do="0.1")),
        *_timm("vit_large_patch16_224", "orig_in21k", num_classes=0),
        _tv("tv_in1k", "vit_l_16-852ce7e3.pth", 79.662, resize=242),
        _tv("tv_swag_lc", "vit_l_16_lc_swag-4d563306.pth", 85.146, swag=True),
        _mindcv("mindcv_in1k", _MS + "vit_l_16_224-d2635f8b.ckpt", 81.25),
        _mindcv("mindcv_v2", _MS + "vit_l_16_224-97d0fdbc.ckpt", None, verified=False, note=_V2),
        _mindcv("mindcv_v1", _MS + "vit_l_16_224-f02b2487.ckpt", None, verified=False, note=_V1),
    ],
    "vit_l_16_384": [
        *_timm("vit_large_patch16_384", "augreg_in21k_ft_in1k", img=384,
               npz="L_16" + _I21K_FT.format(aug="medium1", wd="0.1", do="0.1", lr="0.01", img=384)),
    ],
    "vit_l_32_224": [
        _tv("tv_in1k", "vit_l_32-c7638314.pth", 76.972),
        _mindcv("mindcv_in1k", _MS + "vit_l_32_224-8c8ea164.ckpt", 74.57),
        *_timm("vit_large_patch32_224", "orig_in21k", num_classes=0),
        _mindcv("mindcv_v2", _MS + "vit_l_32_224-b80441df.ckpt", None, verified=False, note=_V2),
        _mindcv("mindcv_v1", _MS + "vit_l_32_224-3a961018.ckpt", None, verified=False, note=_V1),
    ],
    "vit_l_32_384": [*_timm("vit_large_patch32_384", "orig_in21k_ft_in1k", img=384)],
    "vit_h_14_224": [
        _tv("tv_swag_lc", "vit_h_14_lc_swag-c1eb923e.pth", 85.708, swag=True),
        *_timm("vit_huge_patch14_224", "orig_in21k", num_classes=0),
    ],
    "vit_ti_16_224": [
        *_timm("vit_tiny_patch16_224", "augreg_in21k_ft_in1k",
               npz="Ti_16" + _I21K_FT.format(aug="none", wd="0.03", do="0.0", lr="0.03", img=224)),
        *_timm("vit_tiny_patch16_224", "augreg_in21k", num_classes=21843,
               npz="Ti_16" + _I21K.format(aug="none", wd="0.03", do="0.0")),
    ],
    "vit_ti_16_384": [
        *_timm("vit_tiny_patch16_384", "augreg_in21k_ft_in1k", img=384,
               npz="Ti_16" + _I21K_FT.format(aug="none", wd="0.03", do="0.0", lr="0.03", img=384)),
    ],
    "vit_s_16_224": [
        *_timm("vit_small_patch16_224", "augreg_in21k_ft_in1k",
               npz="S_16" + _I21K_FT.format(aug="light1", wd="0.03", do="0.0", lr="0.03", img=224)),
        *_timm("vit_small_patch16_224", "augreg_in1k", npz="S_16" + _I1K.format(aug="medium2", do="0.0", img=224)),
        *_timm("vit_small_patch16_224", "augreg_in21k", num_classes=21843,
               npz="S_16" + _I21K.format(aug="light1", wd="0.03", do="0.0")),
    ],
    "vit_s_16_384": [
        *_timm("vit_small_patch16_384", "augreg_in21k_ft_in1k", img=384,
               npz="S_16" + _I21K_FT.format(aug="light1", wd="0.03", do="0.0", lr="0.03", img=384)),
        *_timm("vit_small_patch16_384", "augreg_in1k", img=384,
               npz="S_16" + _I1K.format(aug="medium2", do="0.0", img=384)),
    ],
    "vit_s_32_224": [
        *_timm("vit_small_patch32_224", "augreg_in21k_ft_in1k",
               npz="S_32" + _I21K_FT.format(aug="light1", wd="0.03", do="0.0", lr="0.03", img=224)),
        *_timm("vit_small_patch32_224", "augreg_in21k", num_classes=21843,
               npz="S_32" + _I21K.format(aug="light1", wd="0.03", do="0.0")),
    ],
    "vit_s_32_384": [
        *_timm("vit_small_patch32_384", "augreg_in21k_ft_in1k", img=384,
               npz="S_32" + _I21K_FT.format(aug="light1", wd="0.03", do="0.0", lr="0.03", img=384)),
    ],
}

# -- backbone families: timm's published tags, default (timm's own default tag) first, except CLIP: OpenAI's -----
_APACHE, _MIT, _NC = "apache-2.0", "mit", "cc-by-nc-4.0"
for _ours, _model, _img in [("deit3_s_16_224", "deit3_small_patch16_224", 224),
                            ("deit3_s_16_384", "deit3_small_patch16_384", 384),
                            ("deit3_m_16_224", "deit3_medium_patch16_224", 224),
                            ("deit3_b_16_224", "deit3_base_patch16_224", 224),
                            ("deit3_b_16_384", "deit3_base_patch16_384", 384),
                            ("deit3_l_16_224", "deit3_large_patch16_224", 224),
                            ("deit3_l_16_384", "deit3_large_patch16_384", 384),
                            ("deit3_h_14_224", "deit3_huge_patch14_224", 224)]:
    SOURCES[_ours] = [
        _hub(_model, "fb_in1k", _IMAGENET, img=_img, crop=1.0 if _img >= 384 else 0.9, num_classes=1000,
             license=_APACHE),
        _hub(_model, "fb_in22k_ft_in1k", _IMAGENET, img=_img, crop=1.0, num_classes=1000, license=_APACHE),
    ]
for _size, _timm_size in [("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")]:
    SOURCES[f"vit_{_size}_14_reg4_dinov2"] = [
        _hub(f"vit_{_timm_size}_patch14_reg4_dinov2", "lvd142m", _IMAGENET, img=518, crop=1.0, license=_APACHE)]
for _ours, _model, _img, _tags in [
    ("vit_b_16_siglip_224", "vit_base_patch16_siglip_224", 224, ("v2_webli", "webli")),
    ("vit_b_16_siglip_256", "vit_base_patch16_siglip_256", 256, ("v2_webli", "webli", "webli_i18n")),
    ("vit_b_16_siglip_384", "vit_base_patch16_siglip_384", 384, ("v2_webli", "webli")),
    ("vit_b_16_siglip_512", "vit_base_patch16_siglip_512", 512, ("v2_webli", "webli")),
    ("vit_so400m_14_siglip_224", "vit_so400m_patch14_siglip_224", 224, ("v2_webli", "webli")),
    ("vit_so400m_14_siglip_378", "vit_so400m_patch14_siglip_378", 378, ("v2_webli", "webli")),
]:
    SOURCES[_ours] = [_hub(_model, t, _HALF, img=_img, crop=0.9, license=_APACHE) for t in _tags]
SOURCES["vit_so400m_14_siglip_378"].append(
    _hub("vit_so400m_patch14_siglip_378", "webli_ft_in1k", _HALF, img=378, crop=1.0, num_classes=1000,
         license=_APACHE))
# CLIP: timm's quick_gelu names load the files of its GELU names' repos. OpenAI's weights first (timm's default
# tag of these names is another: laion400m_e32 / metaclip_2pt5b / dfn2b, below).
for _ours, _model, _repo, _proj, _tags in [
    ("vit_b_32_clip_224", "vit_base_patch32_clip_quickgelu_224", "vit_base_patch32_clip_224", 512,
     [("openai", 0.9, _APACHE), ("laion400m_e32", 0.9, _MIT), ("metaclip_2pt5b", 1.0, _NC),
      ("metaclip_400m", 1.0, _NC)]),
    ("vit_b_16_clip_224", "vit_base_patch16_clip_quickgelu_224", "vit_base_patch16_clip_224", 512,
     [("openai", 0.9, _APACHE), ("metaclip_2pt5b", 1.0, _NC), ("metaclip_400m", 1.0, _NC)]),
    ("vit_l_14_clip_224", "vit_large_patch14_clip_quickgelu_224", "vit_large_patch14_clip_224", 768,
     [("openai", 1.0, _APACHE), ("dfn2b", 1.0, "apple-ascl"), ("metaclip_2pt5b", 1.0, _NC),
      ("metaclip_400m", 1.0, _NC)]),
    ("vit_l_14_clip_336", "vit_large_patch14_clip_quickgelu_336", "vit_large_patch14_clip_336", 768,
     [("openai", 1.0, _APACHE)]),
]:
    _img = 336 if _ours.endswith("336") else 224
    SOURCES[_ours] = [_hub(_model, t, _CLIP, img=_img, crop=c, num_classes=_proj, repo=_repo, license=lic)
                      for t, c, lic in _tags]
SOURCES.update({
    "eva02_ti_14_224": [_hub("eva02_tiny_patch14_224", "mim_in22k", _CLIP, img=224, crop=0.9, license=_MIT)],
    "eva02_s_14_224": [_hub("eva02_small_patch14_224", "mim_in22k", _CLIP, img=224, crop=0.9, license=_MIT)],
    "eva02_b_14_224": [_hub("eva02_base_patch14_224", "mim_in22k", _CLIP, img=224, crop=0.9, license=_MIT)],
    "eva02_ti_14_336": [_hub("eva02_tiny_patch14_336", "mim_in22k_ft_in1k", _CLIP, img=336, crop=1.0,
                             num_classes=1000, license=_MIT)],
    "eva02_s_14_336": [_hub("eva02_small_patch14_336", "mim_in22k_ft_in1k", _CLIP, img=336, crop=1.0,
                            num_classes=1000, license=_MIT)],
    "eva02_b_14_448": [_hub("eva02_base_patch14_448", t, _CLIP, img=448, crop=1.0, num_classes=n, license=_MIT)
                       for t, n in (("mim_in22k_ft_in22k_in1k", 1000), ("mim_in22k_ft_in1k", 1000),
                                    ("mim_in22k_ft_in22k", 21841))],
})
for _size, _timm_size in [("s", "small"), ("b", "base"), ("l", "large")]:
    SOURCES[f"vit_{_size}_16_rope_224"] = [_hub(f"vit_{_timm_size}_patch16_rope_224", "naver_in1k", _IMAGENET,
                                                img=224, crop=0.9, num_classes=1000, license=_APACHE)]
for _size, _timm_size in [("s", "small"), ("sp", "small_plus"), ("b", "base"), ("l", "large"), ("hp", "huge_plus")]:
    for _suffix in ("", "_qkvb"):
        _model = f"vit_{_timm_size}_patch16_dinov3{_suffix}"
        SOURCES[f"vit_{_size}_16_dinov3{_suffix}"] = [
            _hub(_model, "lvd1689m", _IMAGENET, img=256, crop=1.0, license="dinov3"),
            *([_hub(_model, "sat493m", _SAT, img=256, crop=1.0, license="dinov3")] if _size == "l" else []),
            *([_hub(_model, "eupe_lvd1689m", _IMAGENET, img=256, crop=1.0, license="fair-noncommercial-research")]
              if _suffix and _size in ("s", "b") else []),
        ]


def sources_for(name: str) -> list[WeightSource]:
    """Published weights for a registered name (default first); empty for names nobody has published."""
    return list(SOURCES.get(name, []))


def find_source(name: str, tag: str | None = None) -> WeightSource | None:
    """The default source of `name` (tag None) or the one with that tag; None if there is none."""
    sources = sources_for(name)
    if tag is None:
        return sources[0] if sources else None
    return next((s for s in sources if s.tag == tag), None)


def default_source(name: str, *, family: str = "vitkit", tag: str | None = None) -> WeightSource | None:
    """The source `pretrained=True` means for a resolved name (`vitkit.models.registry.ModelName`): the tag's,
    else the first timm source for a timm spelling, else the name's first source; None if there is none."""
    if tag is not None:
        return find_source(name, tag)
    sources = sources_for(name)
    if family == "timm":
        timm = [s for s in sources if s.format == "timm"]
        sources = timm or sources
    return sources[0] if sources else None


def find_source_by_location(location: str, name: str | None = None) -> WeightSource | None:
    """The entry whose hub id or URL is `location` (among `name`'s sources when given)."""
    names = [name] if name else list(SOURCES)
    return next((s for n in names for s in sources_for(n) if s.location == location), None)


def _file_name(location: str) -> str:
    return PurePosixPath(unquote(urlparse(location).path)).name if "://" in location else ""


def find_source_by_file(filename: str) -> WeightSource | None:
    """The URL entry whose published file name is `filename` (`vit_b_32-d86f8d99.pth`), or None."""
    if not filename:
        return None
    return next((s for sources in SOURCES.values() for s in sources if _file_name(s.location) == filename), None)
