"""The model contract: every registered name builds, runs, trains and round-trips; timm's numbers exactly."""
from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import load_checkpoint, save_checkpoint
from vitkit.models import ViTConfig, VisionTransformer, create_model, get_spec, list_models, resample_pos_embed
from vitkit.models.registry import ModelSpec, count_macs, register
from vitkit.models.vit import count_params

SEED_NAMES = ["vit_b_16_224", "vit_b_16_384", "vit_b_32_224", "vit_b_32_384", "vit_l_16_224", "vit_l_16_384",
              "vit_l_32_224"]


def test_seed_and_extra_names_are_registered():
    names = set(list_models())
    assert set(SEED_NAMES) <= names
    assert {"vit_l_32_384", "vit_h_14_224", "vit_ti_16_224", "vit_s_16_224", "vit_s_32_224"} <= names
    assert any(get_spec(n).arch.img_size == 32 and get_spec(n).arch.patch_size == 4 for n in names)
    assert list_models("vit_l_*") == [n for n in list_models() if n.startswith("vit_l_")]


@pytest.mark.parametrize("name, params", [
    ("vit_b_16_224", 86_567_656), ("vit_b_32_224", 88_224_232),
    ("vit_l_16_224", 304_326_632), ("vit_l_32_224", 306_535_400),
])
def test_param_counts_equal_timm(name, params):
    assert count_params(get_spec(name).arch) == params


def test_gmacs_match_timm_published():
    # timm's model cards: vit_base_patch16_224 17.6 GMACs, vit_base_patch32_224 4.4, vit_large_patch16_224 61.6
    assert round(count_macs(get_spec("vit_b_16_224").arch) / 1e9, 1) == 17.6
    assert round(count_macs(get_spec("vit_b_32_224").arch) / 1e9, 1) == 4.4
    assert round(count_macs(get_spec("vit_l_16_224").arch) / 1e9, 1) == 61.6


def test_duplicate_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(ModelSpec(name="vit_b_16_224", arch=ViTConfig()))


def test_unknown_name_suggests():
    with pytest.raises(KeyError, match="vit_b_16_224"):
        create_model("vit_b_16_244")
    with pytest.raises(TypeError, match="did you mean depth"):
        create_model("vit_n_4_32", deptth=2)


@pytest.mark.parametrize("name", list_models())
def test_every_name_builds_on_meta_and_runs_small(name):
    spec = get_spec(name)
    with torch.device("meta"):
        big = VisionTransformer(spec.arch)
        out = big(torch.empty(1, 3, spec.arch.img_size, spec.arch.img_size))
    assert out.shape == (1, spec.arch.num_classes)
    # The same architecture family, shrunk, runs forward and backward for real.
    small = create_model(name, depth=1, img_size=spec.arch.patch_size * 2, embed_dim=spec.arch.num_heads * 4)
    x = torch.randn(2, 3, spec.arch.patch_size * 2, spec.arch.patch_size * 2)
    small(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters())


def _tiny(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return create_model("vit_n_4_32", depth=2, **kw)


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg"}, {"qk_norm": True, "init_values": 1e-5},
                                {"class_token": False, "global_pool": "avg"}])
def test_save_load_round_trip_is_exact(tmp_path, kw):
    model = _tiny(**kw).eval()
    dc = DataConfig(input_size=32)
    path = save_checkpoint(tmp_path / "m.safetensors", model, model_name="vit_n_4_32", data_config=dc,
                           class_names=[str(i) for i in range(10)])
    ckpt = load_checkpoint(path)
    again = ckpt.build_model()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert ckpt.arch == model.cfg and ckpt.data_config == dc and ckpt.class_names[3] == "3"


def test_forward_head_and_features_contract():
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + 64, 128)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-6)  # model(x): class token only


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "init_values": 1e-5, "drop_path_rate": 0.2}])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_class_token_only_last_block_equals_full_model(kw, grad_ckpt):
    """model(x) with token pooling updates only the class token in the last block: same logits and gradients
    as the full forward, in eval and in training (same drop-path draws)."""
    model = _tiny(**kw)
    model.set_grad_checkpointing(grad_ckpt)
    x = torch.randn(3, 3, 32, 32)
    cls = model.forward_features(x, class_token_only=True)
    assert cls.shape == (3, 1, 128)
    with torch.no_grad():
        model.eval()
        assert torch.allclose(model(x), model.forward_head(model.forward_features(x)), atol=1e-6)
    model.train()
    grads = []
    for full in (True, False):
        model.zero_grad()
        torch.manual_seed(1)
        out = model.forward_head(model.forward_features(x)) if full else model(x)
        out.logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    avg = _tiny(global_pool="avg").eval()  # avg pooling reads every token: model(x) runs the full model
    with torch.no_grad():
        assert torch.equal(avg(x), avg.forward_head(avg.forward_features(x)))


def test_forward_intermediates():
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, -1])
        assert [t.shape for t in inter] == [(2, 128, 8, 8), (2, 128, 8, 8)]
        assert torch.allclose(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert only[0].shape == (2, 64, 128)
        assert torch.allclose(only[0].transpose(1, 2).reshape(2, 128, 8, 8), inter[1])


def test_reset_classifier_and_no_weight_decay():
    model = _tiny()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and model.cfg.num_classes == 3
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_grad_checkpointing_gives_same_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(ckpt)
        model(x).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_drop_path_rises_linearly():
    model = create_model("vit_n_4_32", drop_path_rate=0.1)
    rates = [getattr(b.drop_path1, "p", 0.0) for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == pytest.approx([0.1 * i / (len(rates) - 1) for i in range(len(rates))])


def test_resample_pos_embed_matches_timm():
    timm_pe = pytest.importorskip("timm.layers").resample_abs_pos_embed
    pe = torch.randn(1, 1 + 14 * 14, 32)
    ours = resample_pos_embed(pe, (24, 24), num_prefix_tokens=1)
    assert torch.equal(ours, timm_pe(pe, (24, 24), num_prefix_tokens=1))


def test_dynamic_img_size_runs_other_sizes():
    model = _tiny(dynamic_img_size=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 10)
        fixed = _tiny().eval()
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(model(x), fixed(x))  # at the native size nothing changes


def test_set_input_size_resamples():
    model = _tiny()
    model.set_input_size(64)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 128) and model.cfg.img_size == 64
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_gelu_tanh_and_eps_are_configuration():
    model = create_model("vit_n_4_32", depth=1, act="gelu_tanh", norm_eps=1e-7)
    assert model.blocks[0].mlp.act.approximate == "tanh"
    assert model.blocks[0].norm1.eps == 1e-7 and model.norm.eps == 1e-7


def test_matches_timm_bitwise_with_same_weights():
    timm = pytest.importorskip("timm")
    for pool in ("token", "avg"):
        torch.manual_seed(0)
        ref = timm.create_model("vit_base_patch32_224", global_pool=pool, depth=2).eval()
        ours = create_model("vit_b_32_224", global_pool=pool, depth=2).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            assert torch.equal(ours.forward_features(x), ref.forward_features(x))  # bit for bit
            assert (ours(x) - ref(x)).abs().max().item() <= 1e-5  # seen: about 1e-6


def _posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """big_vision's `posemb_sincos_2d` (big_vision/models/vit.py), transcribed to numpy in float64."""
    import numpy as np

    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.einsum("m,d->md", y.flatten(), omega), np.einsum("m,d->md", x.flatten(), omega)
    return torch.from_numpy(np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]).float()


def test_sincos2d_is_big_vision_posemb_and_a_buffer_recomputed_per_grid():
    model = create_model("vit_n_4_32", depth=1, pos_embed="sincos2d").eval()
    pe, dim = model.pos_embed, model.embed_dim
    assert not isinstance(pe, torch.nn.Parameter) and "pos_embed" not in model.state_dict()
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" not in dict(model.named_parameters())
    assert torch.equal(pe[:, :1], torch.zeros(1, 1, dim))  # the class token gets no position (MAE)
    assert torch.allclose(pe[:, 1:], _posemb_sincos_2d(8, 8, dim), atol=1e-5)
    dynamic = create_model("vit_n_4_32", depth=1, pos_embed="sincos2d", dynamic_img_size=True).eval()
    dynamic.load_state_dict(model.state_dict())
    model.set_input_size(48)  # recomputed for the 12 x 12 grid, not interpolated
    assert torch.allclose(model.pos_embed[:, 1:], _posemb_sincos_2d(12, 12, dim), atol=1e-5)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(dynamic(x), model(x), atol=1e-5)
        assert dynamic(torch.randn(1, 3, 40, 56)).shape == (1, 10)


def test_fixed_pos_embed_checkpoint_rebuilds_its_variant(tmp_path):
    src = create_model("vit_n_4_32", depth=1, pos_embed="sincos2d")
    dc = DataConfig(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)
    path = save_checkpoint(tmp_path / "s.safetensors", src, model_name="vit_n_4_32", data_config=dc)
    model = vitkit.create_model("vit_n_4_32", depth=1, pretrained=str(path))  # the checkpoint decides pos_embed
    assert model.cfg.pos_embed == "sincos2d" and torch.equal(model.pos_embed, src.pos_embed)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), src.eval()(x))


def test_pos_embed_none_has_no_position_embedding():
    learn = create_model("vit_n_4_32", depth=1)
    model = create_model("vit_n_4_32", depth=1, pos_embed="none", dynamic_img_size=True).eval()
    assert model.pos_embed is None and not any("pos_embed" in k for k in model.state_dict())
    assert count_params(learn) - count_params(model) == learn.pos_embed.numel()
    assert model(torch.randn(2, 3, 40, 24)).shape == (2, 10)
    with pytest.raises(ValueError, match="pos_embed must be"):
        ViTConfig(pos_embed="rope")
