"""Issue 16: a vitkit model in timm's and transformers' own layouts, its model card, and `vitkit push`.

A short real training run (the demo recipe, `--smoke`) gives the checkpoint; every export is loaded back by the
other library itself, as its users would, and compared with vitkit's logits on real images. The push tests replace
only huggingface_hub's HTTP client (its `set_client_factory`, an httpx MockTransport): every request it would send
is checked.
"""
from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import timm
import torch
import yaml
from PIL import Image

from vitkit.cli import main as cli_main
from vitkit.constants import INTERPOLATIONS
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import load_checkpoint, save_checkpoint
from vitkit.models import create_model, get_spec
from vitkit.tools.export import check_images, load_inputs
from vitkit.tools.hub import export_folder, hf_config
from vitkit.tools.inference import InferenceModel, load_inference_model
from vitkit.weights.formats import HF_KEYS, from_transformers, read_folder, to_transformers

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10_sample"
pytestmark = pytest.mark.xdist_group("hub")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished demo-recipe run (2 epochs of 4 steps, validated each epoch)."""
    d = tmp_path_factory.mktemp("hub") / "run"
    assert cli_main(["train", "--smoke", "--device", "cpu", "--val_interval", "1", "--ckpt_save_dir", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def real_images(run_dir: Path) -> tuple[InferenceModel, torch.Tensor, list[Path]]:
    im = load_inference_model(str(run_dir / "best.safetensors"))
    files = check_images(str(SAMPLE / "test"), 40)
    _, x, _ = load_inputs(im, files, im.data_config.input_size)
    return im, x, files


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_run_folder_has_a_model_card_beside_best(run_dir: Path) -> None:
    card = (run_dir / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "vitkit" and meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "vision-transformer", "vitkit"} <= set(meta["tags"])
    assert meta["datasets"] == ["uoft-cs/cifar10"] and meta["metrics"] == ["accuracy"]
    best = load_checkpoint(run_dir / "best.safetensors", weights=False)
    (result,) = meta["model-index"][0]["results"]
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values["top-1 accuracy"] == round(best.metrics["val_top1"], 2)
    assert values["top-5 accuracy"] == round(best.metrics["val_top5"], 2)
    assert result["dataset"]["split"] == "test"
    for image in ("curves.png", "confusion.png"):  # shown in the card, and there
        assert f"]({image})" in card
        with Image.open(run_dir / image) as img:
            assert img.format == "PNG" and min(img.size) > 100
    assert "vitkit train -c config.yaml" in card and "hardware:" in card and "time:" in card
    assert f"top-1 {best.metrics['val_top1']:.2f}%" in card


def test_export_timm_loads_in_timm_with_vitkits_logits(run_dir: Path, real_images, tmp_path: Path) -> None:
    im, x, _ = real_images
    out = tmp_path / "timm"
    assert cli_main(["export", str(run_dir / "best.safetensors"), "--format", "timm", "--out", str(out)]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert (model(x) - im.model(x)).abs().max() <= 1e-5
    cfg = model.pretrained_cfg
    dc = im.data_config
    assert cfg["label_names"] == im.class_names and model.num_classes == 10
    assert tuple(cfg["mean"]) == dc.mean and tuple(cfg["std"]) == dc.std and cfg["crop_pct"] == dc.crop_pct
    assert cfg["interpolation"] == dc.interpolation and tuple(cfg["input_size"]) == (3, 32, 32)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224" and config["model_args"]["embed_dim"] == 128
    assert front_matter((out / "README.md").read_text())["library_name"] == "timm"
    assert (out / "curves.png").is_file() and (out / "confusion.png").is_file()
    record = json.loads((out / "vitkit_export.json").read_text())
    assert record["check"]["passed"] and record["check"]["max_abs_diff"] <= 1e-5
    # and back: vitkit reads the folder as timm weights, bit for bit
    back = read_folder(out)
    sd = im.model.state_dict()
    assert back.format == "timm" and all(torch.equal(back.state_dict[k], sd[k]) for k in back.state_dict)


def test_export_hf_loads_in_transformers_and_the_pipeline_agrees_with_predict(run_dir: Path, real_images,
                                                                              tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForImageClassification, pipeline

    im, x, files = real_images
    out = tmp_path / "hf"
    assert cli_main(["export", str(run_dir / "best.safetensors"), "--format", "hf", "--out", str(out)]) == 0
    model = AutoModelForImageClassification.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (model(pixel_values=x).logits - im.model(x)).abs().max() <= 1e-5
    assert [model.config.id2label[i] for i in range(10)] == im.class_names
    classify = pipeline("image-classification", model=str(out), device="cpu")
    hf_top1 = [r[0]["label"] for r in classify([str(f) for f in files], top_k=1)]
    capsys.readouterr()
    assert cli_main(["predict", str(run_dir / "best.safetensors"), *map(str, files), "--format", "json",
                     "--topk", "1"]) == 0
    answers = json.loads(capsys.readouterr().out)
    ours = [a["predictions"][0]["label"] for a in answers]
    assert hf_top1 == ours
    assert front_matter((out / "README.md").read_text())["library_name"] == "transformers"
    # the reverse direction reads the same table: the folder converts back to the very same tensors
    back = read_folder(out)
    sd = im.model.state_dict()
    assert back.format == "transformers" and set(back.state_dict) == set(sd)
    assert all(torch.equal(back.state_dict[k], sd[k]) for k in sd)
    assert back.data["crop_pct"] == im.data_config.crop_pct and back.class_names == im.class_names


def test_one_key_table_both_directions() -> None:
    model = create_model("vit_ti_16_224", depth=2, num_classes=7)
    sd = model.state_dict()
    hf = to_transformers(sd)
    assert len(hf) == len(sd) + 2 * 2 * 2  # each block's qkv weight and bias become query, key and value
    assert all(any(k.startswith(t.split("{")[0]) for _, t in HF_KEYS) or "attention.attention" in k for k in hf)
    back = from_transformers(hf).state_dict
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def _random(name: str, **kw) -> InferenceModel:
    torch.manual_seed(0)
    spec = get_spec(name)
    model = create_model(name, **kw).eval()
    dc = DataConfig(model.cfg.img_size, spec.mean, spec.std, spec.interpolation, spec.crop_pct)
    return InferenceModel(model, name, dc, [f"c{i}" for i in range(model.cfg.num_classes)], name)


@pytest.mark.parametrize("name, kw", [("vit_s_14_reg4_dinov2", {"depth": 2, "img_size": 224}),
                                      ("vit_b_16_siglip_224", {"depth": 2}),
                                      ("eva02_ti_14_224", {})])  # timm's Eva fixes its depth by name
def test_backbone_families_export_to_timm(name: str, kw: dict, tmp_path: Path) -> None:
    im = _random(name, num_classes=5, **kw)
    x = torch.randn(2, 3, im.model.cfg.img_size, im.model.cfg.img_size)
    record = export_folder(im, "timm", tmp_path / "out", inputs=(x, "random"), tolerance=1e-4)
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    with torch.no_grad():
        assert (model(x) - im.model(x)).abs().max() <= 1e-5
    assert record["architecture"] == json.loads((tmp_path / "out" / "config.json").read_text())["architecture"]


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_every_resize_filter_reaches_timm_and_transformers_and_comes_back(interpolation: str,
                                                                           tmp_path: Path) -> None:
    """Each of vitkit's filters under the name the target reads ("area" is PIL's box filter: timm's "box",
    transformers' resample 4), taken from the tables convert reads with, so the folder reads back the same."""
    from PIL.Image import Resampling
    from timm.data import create_transform, resolve_data_config
    from transformers import AutoImageProcessor

    from vitkit.data.augment import PIL_INTERPOLATION

    im = _random("vit_ti_16_224", depth=1, img_size=32, patch_size=8, num_classes=3)
    im.data_config = dataclasses.replace(im.data_config, interpolation=interpolation, input_size=32)
    x = torch.randn(2, 3, 32, 32)
    want = PIL_INTERPOLATION[interpolation]
    export_folder(im, "timm", tmp_path / "timm", inputs=(x, "random"), tolerance=1e-4)
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    resize = create_transform(**resolve_data_config({}, model=model)).transforms[0]
    assert Resampling(timm.data.transforms.str_to_pil_interp(model.pretrained_cfg["interpolation"])) == want
    assert resize.interpolation.value == {"area": "box"}.get(interpolation, interpolation)  # what timm resizes with
    assert read_folder(tmp_path / "timm").data["interpolation"] == interpolation
    export_folder(im, "hf", tmp_path / "hf", inputs=(x, "random"), tolerance=1e-4)
    assert Resampling(AutoImageProcessor.from_pretrained(str(tmp_path / "hf")).resample) == want
    assert read_folder(tmp_path / "hf").data["interpolation"] == interpolation


def test_options_the_target_cannot_express_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    spec = get_spec("vit_n_4_32")
    for fmt, kw, option in [("timm", {"norm_eps": 1e-7, "act": "gelu_tanh"}, "norm_eps"),  # MindSpore numerics
                            ("hf", {"reg_tokens": 4}, "reg_tokens"),
                            ("hf", {"global_pool": "avg"}, "global_pool"),
                            ("hf", {"init_values": 1e-5}, "init_values")]:
        ckpt = save_checkpoint(tmp_path / f"{option}.safetensors", create_model("vit_n_4_32", **kw),
                               model_name="vit_n_4_32", class_names=[str(i) for i in range(10)],
                               data_config=DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct))
        out = tmp_path / f"{option}-{fmt}"
        assert cli_main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and f"{option}=" in err, err
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))  # nothing written, no temporary left
    # HF ViT computes MindSpore's tanh GELU and LayerNorm eps exactly: that export is allowed and checked
    im = _random("vit_n_4_32", norm_eps=1e-7, act="gelu_tanh")
    assert hf_config(im)["hidden_act"] == "gelu_pytorch_tanh" and hf_config(im)["layer_norm_eps"] == 1e-7


def test_an_export_that_computes_other_logits_is_not_kept(monkeypatch, tmp_path: Path) -> None:
    import vitkit.tools.hub as hub

    im = _random("vit_n_4_32")
    loaded = hub.load_folder

    def off_by_a_bit(fmt: str, folder: Path) -> torch.nn.Module:
        model = loaded(fmt, folder)
        with torch.no_grad():
            model.head.bias.add_(1e-3)
        return model

    monkeypatch.setattr(hub, "load_folder", off_by_a_bit)
    with pytest.raises(hub.VitkitError, match="gives logits .* from vitkit's"):
        export_folder(im, "timm", tmp_path / "out", inputs=(torch.randn(2, 3, 32, 32), "random"), tolerance=1e-4)
    assert list(tmp_path.iterdir()) == []


# -- vitkit push ----------------------------------------------------------------------------------------------------

class FakeHub:
    """huggingface_hub's HTTP client with the network replaced: answers like the Hub, records every request."""

    def __init__(self, fail: Exception | None = None, status: int | None = None):
        self.requests: list[httpx2.Request] = []
        self.fail, self.status = fail, status

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        path = request.url.path
        if self.status is not None:
            return httpx2.Response(self.status, json={"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/someone/vit", "name": "someone/vit"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/someone/vit/commit/abc123",
                                              "commitOid": "a" * 40, "success": True})
        if "/branch/" in path:
            return httpx2.Response(200, json={})
        return httpx2.Response(404, json={"error": f"not mocked: {path}"})

    def find(self, method: str, fragment: str) -> list[httpx2.Request]:
        return [r for r in self.requests if r.method == method and fragment in r.url.path]


@pytest.fixture
def hub(monkeypatch):
    def install(fake: FakeHub) -> FakeHub:
        huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
        return fake

    monkeypatch.setenv("HF_TOKEN", "hf_vitkit_test_token")
    yield install
    from huggingface_hub.utils._http import default_client_factory

    huggingface_hub.set_client_factory(default_client_factory)


def test_push_sends_the_repo_the_files_and_the_revision(run_dir: Path, hub, capsys) -> None:
    fake = hub(FakeHub())
    ckpt = run_dir / "best.safetensors"
    assert cli_main(["push", str(ckpt), "someone/vit", "--private", "--revision", "v1", "--format", "hf"]) == 0
    out = capsys.readouterr().out
    assert "https://huggingface.co/someone/vit/commit/abc123" in out
    (create,) = fake.find("POST", "/api/repos/create")
    assert json.loads(create.content) == {"name": "vit", "organization": "someone", "visibility": "private",
                                          "type": "model"}
    assert create.headers["authorization"] == "Bearer hf_vitkit_test_token"
    assert fake.find("POST", "/api/models/someone/vit/branch/v1")
    (commit,) = fake.find("POST", "/api/models/someone/vit/commit/v1")
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    files = {e["value"]["path"]: base64.b64decode(e["value"]["content"]) for e in lines if e["key"] == "file"}
    folder = run_dir / "best-hf"  # the export stays beside the checkpoint
    assert set(files) == {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert all(files[name] == (folder / name).read_bytes() for name in files)


@pytest.mark.parametrize("fake, expected", [
    (FakeHub(fail=httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")), "cannot reach"),
    (FakeHub(status=401), "unauthorised"),
])
def test_push_offline_or_unauthorised_is_one_line_and_keeps_the_folder(run_dir: Path, hub, fake, expected,
                                                                       tmp_path: Path, capsys) -> None:
    hub(fake)
    folder = tmp_path / "exported"
    assert cli_main(["export", str(run_dir / "best.safetensors"), "--format", "timm", "--out", str(folder)]) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert cli_main(["push", str(folder), "someone/vit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err and "is kept" in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_push_without_a_token_says_how_to_log_in(run_dir: Path, monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert cli_main(["push", str(folder), "someone/vit"]) == 2
    err = capsys.readouterr().err
    assert "HF_TOKEN" in err and "hf auth login" in err
