"""CMViM building blocks: shapes, Vim weight compatibility, masking, missing modalities, configs."""
import math

import pytest
import torch
import torch.nn.functional as F

from cmvim.config import ConfigError
from cmvim.data import tokenize_reports
from cmvim.model import (BiMamba, CMViM, CMViMClassifier, PatchEmbed3D, VimEncoder, model_config, patchify,
                         random_masking, unpatchify)
from cmvim.simulations.toy import synthetic_batch


def test_patchify_roundtrip_and_conv_token_order():
    x = torch.randn(2, 1, 16, 16, 16)
    patches = patchify(x, 4)
    assert patches.shape == (2, 64, 64)
    assert torch.equal(unpatchify(patches, 4, (4, 4, 4)), x)
    # a Conv3d that picks voxel (0,0,0) of each patch yields patches[..., 0] in the same token order
    embed = PatchEmbed3D(16, 4, dim=6)
    with torch.no_grad():
        embed.proj.weight.zero_()
        embed.proj.weight[0, 0, 0, 0, 0] = 1.0
        embed.proj.bias.zero_()
    tokens = embed.proj(x)
    torch.testing.assert_close(tokens[..., 0], patches[..., 0])


def test_patch_projection_matches_the_convolution_it_replaces():
    """The fast patch projection (patchify + matmul) against Conv3d, values and gradients, 2 channels."""
    from cmvim.model.patch import PatchProjection
    torch.manual_seed(0)
    proj = PatchProjection(2, 8, patch_size=4)
    x = torch.randn(3, 2, 16, 16, 16)
    fast, ref = proj(x), proj.forward_ref(x)
    assert fast.shape == (3, 64, 8)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(fast)
    g_fast = torch.autograd.grad(fast, [proj.weight, proj.bias], grad)
    g_ref = torch.autograd.grad(proj.forward_ref(x), [proj.weight, proj.bias], grad)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sincos_position_embedding_is_distinct_and_frozen():
    embed = PatchEmbed3D(32, 8, dim=48)
    pos = embed.pos_embed[0]
    assert not embed.pos_embed.requires_grad
    assert torch.cdist(pos, pos).add(torch.eye(64) * 10).min() > 0.1
    assert list(embed.buffers()) == []


VIM_V2_MIXER = {  # name: shape for d_model=32 (d_inner 64, dt_rank 2, d_state 16, d_conv 4)
    "in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
    "x_proj.weight": (34, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,), "A_log": (64, 16),
    "D": (64,), "A_b_log": (64, 16), "conv1d_b.weight": (64, 1, 4), "conv1d_b.bias": (64,),
    "x_proj_b.weight": (34, 64), "dt_proj_b.weight": (64, 2), "dt_proj_b.bias": (64,), "D_b": (64,),
    "out_proj.weight": (32, 64)}


def test_mixer_parameters_match_vim_names_shapes_and_init():
    mixer = BiMamba(32, d_state=16)
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == VIM_V2_MIXER
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, 17.0)).repeat(64, 1))
    assert torch.equal(mixer.D_b, torch.ones(64))
    for dt_proj in (mixer.dt_proj, mixer.dt_proj_b):
        dt = F.softplus(dt_proj.bias)
        assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6
    encoder = VimEncoder(32, depth=3)
    keys = set(encoder.state_dict())
    assert {"layers.0.norm.weight", "layers.2.mixer.A_b_log", "norm_f.weight"} <= keys
    assert list(encoder.buffers()) == []
    # dt_proj biases survive the encoder's weight init; other Linear biases are zero
    assert F.softplus(encoder.layers[0].mixer.dt_proj.bias).min() >= 1e-3 - 1e-6


def test_mixer_is_bidirectional_and_backends_agree():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
    mixer = BiMamba(16, d_state=4, scan_backend="ref").double()
    out = mixer(x)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert grad[:, -1].abs().sum() > 0, "the first token must see the last one (backward scan)"
    for backend in ("torch",):
        mixer.scan_backend = backend
        torch.testing.assert_close(mixer(x), out)


def test_random_masking_keeps_a_quarter_and_restores_order():
    tokens = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64, 1)
    visible, mask, restore, keep = random_masking(tokens, 0.75, torch.Generator().manual_seed(0))
    assert visible.shape == (2, 16, 1) and mask.sum(1).tolist() == [48, 48]
    assert torch.equal(mask.gather(1, keep), torch.zeros(2, 16))
    assert torch.equal(visible[..., 0], tokens[..., 0].gather(1, keep))
    assert torch.all(keep[:, 1:] > keep[:, :-1]), "a Vim encoder must see the visible tokens in raster order"
    # the decoder's unshuffle puts every visible token back at its own position
    restored = torch.cat([visible, torch.full((2, 48, 1), -1.0)], dim=1).gather(1, restore[..., None])
    assert torch.equal(restored[mask == 0], tokens[mask == 0])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = model_config("tiny")
    return cfg, CMViM(cfg, scan_backend="torch")


def test_pretraining_forward_shapes_and_terms(tiny):
    cfg, model = tiny
    batch = synthetic_batch(cfg, 4, seed=0)
    out = model(batch, torch.Generator().manual_seed(0))
    assert set(out.terms) == {"recon_mri", "recon_pet", "intra", "inter", "report"}
    assert out.predictions["mri"].shape == (4, cfg.num_patches, cfg.patch_voxels)
    assert all(math.isfinite(v) and v > 0 for v in out.terms.values())
    expected = (out.terms["recon_mri"] + out.terms["recon_pet"]
                + 0.05 * (out.terms["intra"] + out.terms["inter"] + out.terms["report"]))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_missing_modality_contributes_no_loss(tiny):
    cfg, model = tiny
    batch = synthetic_batch(cfg, 4, seed=0, pet_missing=1.0)
    batch["report_present"][:] = False
    assert not batch["pet_present"].any()
    model.zero_grad()
    out = model(batch, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.terms["recon_pet"] == 0 and out.terms["inter"] == 0 and out.terms["report"] == 0
    assert out.terms["recon_mri"] > 0 and out.terms["intra"] > 0
    pet_decoder_grad = sum(p.grad.abs().sum() for p in model.decoders["pet"].parameters() if p.grad is not None)
    assert pet_decoder_grad == 0
    assert model.image.standins["pet"].tokens.grad.abs().sum() > 0   # the stand-in is what the encoder saw
    # the PET volume of an absent subject does not matter at all
    batch2 = dict(batch, pet=torch.randn_like(batch["pet"]))
    out2 = model(batch2, torch.Generator().manual_seed(0))
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_momentum_update_moves_towards_online(tiny):
    cfg, model = tiny
    online = model.image.encoder.norm_f.weight
    target = model.momentum["image"].encoder.norm_f.weight
    with torch.no_grad():
        online.add_(1.0)
    before = (online - target).abs().sum()
    model.update_momentum(0.5)
    assert (online - target).abs().sum().item() == pytest.approx(before.item() / 2, rel=1e-5)
    assert not any(p.requires_grad for p in model.momentum.parameters())


def test_classifier_loads_pretrained_encoder(tiny):
    cfg, model = tiny
    clf = CMViMClassifier(model_config("tiny", num_classes=3), scan_backend="torch")
    copied = clf.load_pretrained(model.state_dict())
    assert "image.encoder.layers.0.mixer.A_log" in copied
    assert torch.equal(clf.image.encoder.norm_f.weight, model.image.encoder.norm_f.weight)
    batch = synthetic_batch(cfg, 3, seed=1, pet_missing=0.5)
    assert clf(batch).shape == (3, 3)
    with pytest.raises(ValueError, match="image"):
        clf.load_pretrained({"head.weight": torch.zeros(1)})


def test_report_tokenizer_is_byte_level():
    ids, present = tokenize_reports(["Größe ok", "", None], max_bytes=5)
    assert ids.shape == (3, 5) and present.tolist() == [True, False, False]
    assert ids[0].tolist() == [b + 1 for b in "Größe ok".encode()[:5]]
    assert ids[1].sum() == 0


def test_config_presets_yaml_and_typos(tmp_path):
    assert model_config("base").embed_dim == 768 and model_config("base").depth == 12
    assert model_config({"preset": "tiny", "depth": 3, "loss": {"inter": 0.1}}).loss.inter == 0.1
    path = tmp_path / "model.yaml"
    path.write_text("preset: small\nembed_dim: 80\nreport:\n  depth: 1\n")
    cfg = model_config(path)
    assert (cfg.embed_dim, cfg.report.depth, cfg.img_size) == (80, 1, 48)
    with pytest.raises(ConfigError, match=r"unknown key 'embed_dmi'.*did you mean 'embed_dim'"):
        model_config({"embed_dmi": 3})
    with pytest.raises(ConfigError, match=r"model.loss: unknown key 'intre'"):
        model_config({"loss": {"intre": 1.0}})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        model_config("huge")
    with pytest.raises(ConfigError, match="model.depth: expected int"):
        model_config({"depth": "four"})
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        model_config({"img_size": 30})


def test_scan_backend_comes_from_the_config():
    model = CMViM(model_config({"preset": "tiny", "scan_backend": "torch"}))
    mixers = [m for m in model.modules() if isinstance(m, BiMamba)]
    assert mixers and all(m.scan_backend == "torch" for m in mixers)
    with pytest.raises(ConfigError, match="'gpu' is not one of"):
        model_config({"scan_backend": "gpu"})
