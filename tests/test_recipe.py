"""The fine-tuning recipe and the yardsticks: SUVR normalisation, the classifier's readouts,
layer-wise lr decay, linear probing (LP of LP-FT) through the site task, the linear baseline and
the linear probe, with real tensors and real site folders."""
import dataclasses

import numpy as np
import pytest
import torch

from cmvim import engine
from cmvim.run_config import PreprocessConfig
from cmvim.data.preprocess import normalize_suvr
from cmvim.run_config import run_config
from cmvim.linear import LinearConfig, collect, encoder_features, fit_logistic, positive_scores, regional_means
from cmvim.model import CMViM, CMViMClassifier, model_config
from cmvim.site_task import SiteTask, SiteTaskError
from cmvim.weights import initial_state
from cmvim.simulations.toy import synthetic_batch


# -- preprocessing ---------------------------------------------------------------------------------

def test_suvr_is_uptake_over_the_brain_mean_centred_and_scale_free():
    rng = np.random.default_rng(0)
    data = np.zeros((20, 20, 20), np.float32)
    data[5:15, 5:15, 5:15] = 1.0 + 0.2 * rng.standard_normal((10, 10, 10))
    data[8:11, 8:11, 8:11] *= 0.8                         # a hypometabolic region
    cfg = PreprocessConfig(spatial="none", shape=20)
    out = normalize_suvr(data, cfg)
    brain = data > cfg.foreground * np.percentile(data, 99)
    np.testing.assert_allclose(out[brain], data[brain] / data[brain].mean() - 1, rtol=1e-5, atol=1e-6)
    assert np.all(out[~brain] == 0)
    assert abs(out[brain].mean()) < 1e-5                  # the reference region averages to SUVR 1
    # a scanner's calibration (a global scale) does not change SUVR; percentile clipping of the
    # hottest voxels does not happen
    np.testing.assert_allclose(normalize_suvr(data * 731.0, cfg), out, rtol=1e-5, atol=1e-6)
    assert out.max() == pytest.approx(data.max() / data[brain].mean() - 1, rel=1e-5)


# -- model: readouts ---------------------------------------------------------------------------------

def test_tokens_readout_reads_every_token_in_place_and_loads_pretrained_encoders():
    mc = model_config("tiny", readout="tokens")
    batch = synthetic_batch(mc, 3, seed=1)
    torch.manual_seed(0)
    pretrain = CMViM(mc)
    clf = CMViMClassifier(mc)
    assert clf.feature_dim == mc.num_patches * 2 * mc.embed_dim
    clf.load_pretrained(pretrain)
    features = clf.features(batch)
    assert features.shape == (3, clf.feature_dim)
    tokens = torch.cat([clf.image.tokens(batch, m) for m in mc.modalities], dim=1)
    hidden = clf.image.encoder(tokens)
    torch.testing.assert_close(features, hidden.flatten(1))
    # the paper's mean readout is the mean of the same token features
    mean_clf = CMViMClassifier(dataclasses.replace(mc, readout="mean"))
    mean_clf.image.load_state_dict(clf.image.state_dict())
    torch.testing.assert_close(mean_clf.features(batch), hidden.mean(dim=1))
    assert clf(batch).shape == (3, 2)

def test_factorized_readout_is_a_full_token_head_of_low_rank():
    mc = model_config("tiny", readout="factorized", head_rank=3)
    clf = CMViMClassifier(mc)
    tokens, dim = mc.num_patches * 2, mc.embed_dim
    head = clf.head
    assert sum(p.numel() for p in head.parameters()) == dim * 3 + tokens * 3 * 2 + 2   # vs tokens * dim * 2 + 2
    torch.manual_seed(2)
    head.double()
    for p in head.parameters():
        torch.nn.init.normal_(p)
    # the same map as a full linear head whose (class, token, feature) weight is sum_k S[class, token, k] U[k, feature]
    spatial = head.spatial.weight.reshape(2, tokens, 3)
    full = torch.einsum("ctk,kd->ctd", spatial, head.reduce.weight).reshape(2, tokens * dim)
    x = torch.randn(5, tokens * dim, dtype=torch.float64)
    torch.testing.assert_close(head(x), x @ full.T + head.spatial.bias)
    head.float()
    batch = synthetic_batch(mc, 3, seed=1)
    assert clf(batch).shape == (3, 2) and clf.features(batch).shape == (3, tokens * dim)
    assert "rank 3" in mc.summary()
    with pytest.raises(ValueError, match="head_rank"):
        model_config("tiny", readout="factorized", head_rank=0)



# -- optimiser: layer-wise lr decay --------------------------------------------------------------------

def test_layer_decay_scales_each_blocks_lr_by_the_blocks_above_it():
    mc = model_config("tiny", depth=3)
    model = CMViMClassifier(mc)
    optimizer = engine.make_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lr_of = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            lr_of[id(param)] = group["lr"]
    named = dict(model.named_parameters())
    expected = {
        "image.tokenizers.mri.proj.weight": 1e-3 * 0.5 ** 4,     # below every block
        "image.encoder.layers.0.mixer.in_proj.weight": 1e-3 * 0.5 ** 3,
        "image.encoder.layers.1.mixer.A_log": 1e-3 * 0.5 ** 2,
        "image.encoder.layers.2.mixer.out_proj.weight": 1e-3 * 0.5,
        "image.encoder.norm_f.weight": 1e-3,
        "head.weight": 1e-3,
    }
    for name, lr in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(lr), name
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(named["head.weight"])] == 0.05 and decay_of[id(named["head.bias"])] == 0.0
    # without decay every parameter trains at the base lr, as before
    plain = engine.make_optimizer(model, lr=1e-3)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


# -- linear probing ------------------------------------------------------------------------------------

def test_probe_trains_the_head_alone_and_fits_what_the_frozen_features_hold():
    mc = model_config("tiny")
    torch.manual_seed(0)
    model = CMViMClassifier(mc)
    batches = []
    for seed in range(4):
        batch = synthetic_batch(mc, 8, seed=seed)
        # a label the frozen features can tell: the brightness of the whole MRI
        batch["label"] = (batch["mri"].mean(dim=(1, 2, 3, 4)) > batch["mri"].mean()).long()
        batch["mri"] = batch["mri"] + batch["label"][:, None, None, None, None] * 0.5
        batches.append(batch)
    loader = engine_loader(batches)
    encoder_before = {k: v.clone() for k, v in model.image.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    first = engine.probe(model, loader, epochs=1, lr=1e-3)
    model.head.load_state_dict({"weight": head_before, "bias": torch.zeros(2)})
    metrics = engine.probe(model, loader, epochs=200, lr=1e-2)
    assert metrics["num-examples"] == 32
    assert metrics["loss"] < 0.5 * first["loss"] and metrics["acc"] >= 0.9, (first, metrics)
    for key, value in model.image.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    assert not torch.equal(model.head.weight, head_before)


class engine_loader(list):
    """A list of ready batches that looks enough like a DataLoader for the engine."""
    dataset = None

    @property
    def batch_size(self):
        return len(self[0]["label"])


def easy_run_config(easy_cohort, **overrides):
    spec = {"cohort": {"path": str(easy_cohort)}, "model": {"preset": "tiny", "readout": "tokens"},
            "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25, "normalize": {"mri": "zscore", "pet": "suvr"}},
            "split_fractions": [0.6, 0.0, 0.4], "evaluation": {"bootstrap": 100},
            "finetune": {"rounds": 3, "probe_rounds": 1, "probe_epochs": 30, "local_epochs": 1, "lr": 1e-4,
                         "layer_decay": 0.75}}
    spec.update(overrides)
    return run_config(spec)


def test_site_task_probe_round_moves_only_the_head_then_fine_tuning_moves_everything(easy_cohort, easy_sites):
    cfg = easy_run_config(easy_cohort)
    task = SiteTask(cfg, [easy_sites["A"]], "A")
    state = initial_state(cfg, "finetune")
    probed = task.train("finetune", 1, state)
    assert cfg.finetune.probing(1) and not cfg.finetune.probing(2)
    for key, value in probed.shared.items():
        if key.startswith("image."):
            assert torch.equal(value, state[key]), key
    assert not torch.equal(probed.shared["head.weight"], state["head.weight"])
    tuned = task.train("finetune", 2, probed.shared)
    moved = [k for k in tuned.shared if k.startswith("image.encoder.layers.0.")
             and not torch.equal(tuned.shared[k], probed.shared[k])]
    assert moved, "a fine-tuning round after the probe must move the encoder"


@pytest.mark.parametrize("inputs", ["real", "finetuning"])
def test_the_probe_can_see_the_inputs_fine_tuning_trains_on(easy_cohort, easy_sites, monkeypatch, inputs):
    """finetune.probe_inputs: finetuning: the probe's features hold PROBE_DRAWS modality-dropout
    draws of every training subject (some PET hidden, not all), and the site still reports its
    subjects, not the draws, as its examples; "real" reads each subject once as it is."""
    from cmvim import site_task
    seen = []
    real_probe = engine.probe

    def spy(model, loader, *args, **kwargs):
        features = model.features
        model.features = lambda batch: (seen.append(batch["pet_present"].clone()), features(batch))[1]
        return real_probe(model, loader, *args, **kwargs)
    monkeypatch.setattr(engine, "probe", spy)
    cfg = easy_run_config(easy_cohort, modality_dropout=0.5)
    cfg.finetune.probe_inputs = inputs
    result = SiteTask(cfg, [easy_sites["A"]], "A").train("finetune", 1, initial_state(cfg, "finetune"))
    train = easy_sites["A"].subset("train", True)
    n, with_pet = len(train), sum(r.has_pet for r in train)
    present = torch.cat(seen)
    draws = site_task.PROBE_DRAWS if inputs == "finetuning" else 1
    assert len(present) == draws * n and result.metrics["num-examples"] == n and with_pet > 0
    hidden = int(present.sum()) - draws * with_pet          # PET present in the scans, hidden in the features
    assert hidden == 0 if inputs == "real" else 0 < -hidden < draws * with_pet


def test_an_unseen_site_refits_the_head_on_its_own_labels_and_reads_the_frozen_features(easy_cohort, easy_sites):
    """benchmarks/unseen_site.py's adaptations: refit_head moves the head alone (the LP rounds'
    recipe) on exactly the records given, and features are what the head reads, in split order."""
    cfg = easy_run_config(easy_cohort)
    task = SiteTask(cfg, [easy_sites["B"]], "B")
    state = initial_state(cfg, "finetune")
    pool = easy_sites["B"].subset("train", True)
    few = [r for r in pool if r.entry.label == "AD"][:2] + [r for r in pool if r.entry.label == "CN"][:2]
    shared, _ = task.refit_head(state, {}, few)
    assert all(torch.equal(v, state[k]) for k, v in shared.items() if k.startswith("image."))
    assert not torch.equal(shared["head.weight"], state["head.weight"])
    again, _ = task.refit_head(state, {}, few)
    assert torch.equal(again["head.weight"], shared["head.weight"])         # reproducible from the run's seed
    other, _ = task.refit_head(state, {}, few[:1] + few[2:] + pool[-2:])
    assert not torch.equal(other["head.weight"], shared["head.weight"])    # it reads the records it is given
    with pytest.raises(SiteTaskError, match="both classes"):
        task.refit_head(state, {}, few[:2])
    labels, x = task.features(shared, {}, task.sites[0].subset("test", True))
    binary, scores = task.predict(shared, {}, "test")
    model = CMViMClassifier(cfg.model)
    model.load_state_dict(shared)
    assert np.array_equal(labels, binary) and x.shape == (len(binary), model.feature_dim)
    model.eval()
    with torch.no_grad():
        head = torch.softmax(model.head(torch.as_tensor(x, dtype=torch.float32)), dim=-1)[:, -1].numpy()
    np.testing.assert_allclose(head, scores, rtol=1e-4, atol=1e-5)       # the head on these features = predict


# -- the linear baseline and the linear probe ---------------------------------------------------------

def test_regional_means_are_block_means_with_missing_pet_left_to_the_imputer():
    volume = torch.zeros(2, 1, 8, 8, 8)
    volume[:, :, :4, :4, :4] = 3.0                      # one of the 8 blocks of a 2^3 grid
    batch = {"mri": volume, "pet": volume * 2, "mri_present": torch.tensor([True, True]),
             "pet_present": torch.tensor([True, False])}
    features = regional_means(batch, grid=2)
    assert features.shape == (2, 8 + 8 + 1)
    np.testing.assert_allclose(features[0, :8], [3, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(features[0, 8:16], [6, 0, 0, 0, 0, 0, 0, 0])
    assert np.isnan(features[1, 8:16]).all() and features[1, 16] == 0 and features[0, 16] == 1


def test_fit_logistic_finds_a_planted_signal_and_not_one_that_is_not_there():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((160, 50))
    y = (x[:, 3] - 0.5 * x[:, 7] + 0.3 * rng.standard_normal(160) > 0).astype(int)
    x[rng.random(x.shape) < 0.05] = np.nan               # scattered missing values are imputed
    from sklearn.metrics import roc_auc_score
    model = fit_logistic(x[:100], y[:100], LinearConfig(folds=4), seed=0)
    assert roc_auc_score(y[100:], positive_scores(model, x[100:])) > 0.9
    shuffled = rng.permutation(y)
    noise = fit_logistic(x[:100], shuffled[:100], LinearConfig(folds=4), seed=0)
    assert abs(roc_auc_score(shuffled[100:], positive_scores(noise, x[100:])) - 0.5) < 0.2
    with pytest.raises(ValueError, match="two classes"):
        fit_logistic(x[:10], np.zeros(10, int))


def test_linear_baseline_in_the_runner_scores_every_site(easy_cohort, easy_sites):
    from cmvim.simulations.baselines import run_baselines
    cfg = easy_run_config(easy_cohort, baselines=["linear"], linear={"grid": 4})
    out = run_baselines(cfg, easy_sites, ["linear"], say=lambda *_: None)["linear"]
    assert set(out["sites"]) == {"A", "B", "C"}
    for name, entry in out["sites"].items():
        assert entry["n_test"] >= 10 and 0 <= entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1]
    # effect_scale 5: regional means separate CN from AD almost perfectly
    assert out["mean_auc"] > 0.9, out
    assert out["pooled"]["n_test"] == sum(e["n_test"] for e in out["sites"].values())
    train = sum(len(site.subset(s, True)) for site in easy_sites.values() for s in ("train", "val"))
    assert out["n_train"] == train


def test_linear_probe_of_an_encoder_on_site_data(easy_cohort, easy_sites):
    """The probe reads what the frozen encoder holds: on the easy cohort even a random Vim encoder's
    token features carry the regional uptake differences."""
    from cmvim.data import make_loader
    from sklearn.metrics import roc_auc_score
    cfg = easy_run_config(easy_cohort)
    torch.manual_seed(0)
    model = CMViMClassifier(cfg.model)
    features = encoder_features(model)

    def split(name):
        return collect((b for site in easy_sites.values()
                        for b in make_loader(site.dataset(name, labeled=True), 16, False)), features)
    x_train, y_train = split("train")
    x_test, y_test = split("test")
    assert x_train.shape[1] == model.feature_dim and len(y_test) >= 30
    probe = fit_logistic(x_train, y_train, seed=0)
    assert roc_auc_score(y_test, positive_scores(probe, x_test)) > 0.8


def test_fine_tuning_can_start_from_weights_pretrained_elsewhere(tmp_path):
    """finetune_init: a file (a state dict, or a cmvim checkpoint's arrays): public pretraining."""
    from cmvim.config import ConfigError
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32}})
    torch.manual_seed(123)
    elsewhere = CMViM(cfg.model).state_dict()
    for name, payload in (("state.pt", elsewhere), ("checkpoint.pt", {"phase": "pretrain", "round": 12,
                                                                       "arrays": elsewhere, "history": [{"a": 1.0}]})):
        torch.save(payload, tmp_path / name)
        started = initial_state(run_config({**json_of(cfg), "finetune_init": str(tmp_path / name)}), "finetune")
        for key, value in started.items():
            if key.startswith("image."):
                assert torch.equal(value, elsewhere[key]), key
    fresh = initial_state(cfg, "finetune")
    assert not torch.equal(fresh["image.encoder.layers.0.mixer.in_proj.weight"],
                           elsewhere["image.encoder.layers.0.mixer.in_proj.weight"])
    with pytest.raises(ConfigError, match="no such file"):
        initial_state(run_config({**json_of(cfg), "finetune_init": str(tmp_path / "missing.pt")}), "finetune")
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="finetune_init"):
        initial_state(run_config({**json_of(cfg), "finetune_init": str(tmp_path / "bad.pt")}), "finetune")


def json_of(cfg):
    import json
    return json.loads(cfg.to_json())
