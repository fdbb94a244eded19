"""DP-SGD at a site: per-sample gradients of the whole classifier, the epsilon the project
reports against Opacus' own accountant, the ledger across a restart, and budget exhaustion."""
from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from torch import nn

from cmvim.data import SiteData
from cmvim.run_config import run_config
from cmvim.model import CMViMClassifier
from cmvim.model_config import model_config
from cmvim.privacy import (PrivacyBudgetExceeded, PrivacyLedger, PrivacyRefused, SiteLimits, Spend, epsilon,
                           noise_for_target)
from cmvim.site_task import SiteTask
from cmvim.weights import initial_state
from cmvim.simulations.cohort import CohortConfig, cached_cohort


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = cached_cohort(CohortConfig(sites=1, subjects=16, shape=32, seed=5, effect_scale=3.0, pet_missing=0.2),
                         root=tmp_path_factory.mktemp("dp-cohort"))
    return root / "A"


def dp_config(**privacy):
    return run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
                       "split_fractions": [0.75, 0.0, 0.25], "modality_dropout": 0.0,
                       "pretrain": {"rounds": 2, "local_epochs": 1, "batch_size": 4},
                       "finetune": {"rounds": 2, "local_epochs": 1, "batch_size": 4},
                       "privacy": {"enabled": True, "max_grad_norm": 1.0, **privacy}})


def task_for(site_dir, cfg, ledger, run_key: str = "run-1", **kw) -> SiteTask:
    data = SiteData.load(site_dir, cfg.preprocess, seed=cfg.seed, use_reports=cfg.use_reports,
                         split_fractions=cfg.split_fractions)
    return SiteTask(cfg, [data], "A", ledger_path=ledger, run_key=run_key, **kw)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_per_sample_gradients_of_the_whole_classifier_equal_per_example_backward(backend):
    torch.manual_seed(0)
    mc = model_config({"preset": "tiny", "scan_backend": backend})
    model, reference = CMViMClassifier(mc), CMViMClassifier(mc)
    reference.load_state_dict(model.state_dict())
    b = 3
    batch = {"mri": torch.randn(b, 1, 32, 32, 32), "pet": torch.randn(b, 1, 32, 32, 32),
             "mri_present": torch.ones(b, dtype=torch.bool), "pet_present": torch.tensor([True, False, True]),
             "label": torch.tensor([0, 1, 1])}
    private = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    nn.functional.cross_entropy(private(batch), batch["label"], reduction="sum").backward()
    params = dict(reference.named_parameters())
    for i in range(b):
        reference.zero_grad()
        one = {k: v[i:i + 1] for k, v in batch.items()}
        nn.functional.cross_entropy(reference(one), one["label"], reduction="sum").backward()
        for name, param in model.named_parameters():
            if not param.requires_grad:             # the fixed sin-cos position embeddings
                continue
            expected = params[name].grad if params[name].grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(param.grad_sample[i], expected, rtol=1e-3, atol=1e-6,
                                       msg=lambda m: f"{name}, sample {i}: {m}")
    private._close()


def test_reported_epsilon_is_opacus_accountant_and_survives_a_restart(site, tmp_path):
    cfg, ledger = dp_config(noise_multiplier=1.1), tmp_path / "ledger.json"
    task = task_for(site, cfg, ledger)
    shared = initial_state(cfg, "pretrain")
    first = task.train("pretrain", 1, shared)
    delta, plan = task.privacy_plan()
    q, steps = plan["pretrain"]
    n = len(task._private_dataset("pretrain"))
    assert q == pytest.approx(4 / n) and steps == math.ceil(n / 4) and delta == pytest.approx(1 / (10 * n))
    accountant = RDPAccountant()
    for _ in range(steps):                          # Opacus' own bookkeeping, one step at a time
        accountant.step(noise_multiplier=1.1, sample_rate=q)
    assert first.metrics["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert first.metrics["noise_multiplier"] == 1.1 and first.metrics["num-examples"] > 0
    assert all(torch.isfinite(v).all() for v in first.shared.values())
    # the projector and report encoder sat out (their terms compare subjects within a batch)
    for key in ("projector.weight", "report_encoder.embed.tokens.weight"):
        assert torch.equal(first.shared[key], shared[key]), key
    assert not torch.equal(first.shared["image.encoder.layers.0.mixer.in_proj.weight"],
                           shared["image.encoder.layers.0.mixer.in_proj.weight"])

    restarted = task_for(site, cfg, ledger)        # a new process: only the ledger file remains
    second = restarted.train("pretrain", 2, first.shared)
    for _ in range(steps):
        accountant.step(noise_multiplier=1.1, sample_rate=q)
    assert second.metrics["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert second.metrics["epsilon"] > first.metrics["epsilon"]


def test_target_epsilon_sets_the_noise_and_a_spent_budget_stops_training(site, tmp_path):
    cfg = dp_config(target_epsilon=20.0)
    task = task_for(site, cfg, tmp_path / "ledger.json")
    delta, plan = task.privacy_plan()
    sigma = task.noise_multiplier()
    planned = [(q, steps * 2) for q, steps in plan.values()]

    def spent(noise: float) -> float:
        return epsilon([(noise, q, s) for q, s in planned], delta)
    # noise_for_target bisects to 1e-3 above a floor (0.3) that spends far more than 20 here: the
    # sigma it returns keeps within the target, and 1e-3 less noise would not (sigma is ~0.517)
    assert spent(sigma) <= 20.0 < spent(sigma - 1e-3)
    assert noise_for_target(20.0, delta, planned) == sigma

    # the site policy caps epsilon below what one round costs: refused, nothing spent
    capped = task_for(site, cfg, tmp_path / "capped.json", limits=SiteLimits(max_epsilon=0.01))
    with pytest.raises(PrivacyBudgetExceeded, match=r"site's total over every run to epsilon .* > the site policy's "
                                                    r"max_epsilon 0.01"):
        capped.train("pretrain", 1, initial_state(cfg, "pretrain"))
    assert not (tmp_path / "capped.json").exists()
    # evaluation still works without spending
    finetune = initial_state(cfg, "finetune")
    assert capped.evaluate("finetune", finetune, None, "test").metrics["num-examples"] > 0

    # a budget that covers exactly one round: the second is refused
    result = task_for(site, dp_config(noise_multiplier=1.0), tmp_path / "one.json").train("finetune", 1, finetune)
    one_round = task_for(site, dp_config(noise_multiplier=1.0), tmp_path / "one.json",
                         limits=SiteLimits(max_epsilon=result.metrics["epsilon"] * 1.01))     # the same ledger
    with pytest.raises(PrivacyBudgetExceeded, match="the site stops DP training"):
        one_round.train("finetune", 2, result.shared)


def _grad_samples(model, loss_fn, batch, seed: int) -> dict[str, torch.Tensor]:
    """Opacus' per-sample gradients of `loss_fn` on `batch` (the loss a batch mean, as dp_train uses it)."""
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        torch.manual_seed(seed)                     # the same maskings and drop-paths in both batches
        loss, _, _ = loss_fn(private, batch)
        loss.backward()
        return {n: p.grad_sample[0].clone() for n, p in model.named_parameters()
                if p.requires_grad and getattr(p, "grad_sample", None) is not None}
    finally:
        private._close()
        for p in model.parameters():
            p.grad = None
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)


def _subject_with(mates_pet: list[bool], mates_label: list[int]) -> dict:
    """Subject 0 (fixed) followed by two batch mates that differ between calls."""
    g = torch.Generator().manual_seed(0)
    first = {"mri": torch.randn(1, 1, 32, 32, 32, generator=g), "pet": torch.randn(1, 1, 32, 32, 32, generator=g)}
    mates = torch.Generator().manual_seed(sum(mates_label) + 10 * sum(mates_pet))
    b = 1 + len(mates_pet)
    return {"mri": torch.cat([first["mri"], torch.randn(b - 1, 1, 32, 32, 32, generator=mates)]),
            "pet": torch.cat([first["pet"], torch.randn(b - 1, 1, 32, 32, 32, generator=mates)]),
            "mri_present": torch.ones(b, dtype=torch.bool), "pet_present": torch.tensor([True] + mates_pet),
            "label": torch.tensor([1] + mates_label)}


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_under_dp_a_subjects_gradient_does_not_depend_on_its_batch_mates(phase):
    """Clipping bounds a subject's influence only if its per-sample gradient is its own: the same
    subject with other batch mates (other scans, PET missing, other labels) gets the same one.
    The batch-pooled losses used without DP do not have this property (checked too)."""
    from cmvim import engine
    from cmvim.model import CMViM
    mc = model_config({"preset": "tiny", "scan_backend": "torch", "drop_path": 0.0})
    torch.manual_seed(1)
    model = CMViM(mc) if phase == "pretrain" else CMViMClassifier(mc)
    one, other = _subject_with([False, True], [0, 0]), _subject_with([True, True], [1, 0])
    if phase == "pretrain":
        model.contrastive = False
        pooled = engine.pretrain_loss
    else:
        pooled = engine.classification_loss(torch.tensor([0.3, 3.0]))      # class weights: a weighted mean
    model.per_sample = True
    private_loss = engine.pretrain_loss if phase == "pretrain" else engine.classification_loss(None)
    a, b = _grad_samples(model, private_loss, one, 7), _grad_samples(model, private_loss, other, 7)
    assert a.keys() == b.keys() and len(a) > 5
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    model.per_sample = False
    a, b = _grad_samples(model, pooled, one, 7), _grad_samples(model, pooled, other, 7)
    assert max(float((a[n] - b[n]).abs().max() / (a[n].abs().max() + 1e-12)) for n in a) > 0.1


def test_the_site_budget_covers_every_run_and_a_new_run_key_does_not_reset_it(site, tmp_path):
    """The server picks the run key; the site's max_epsilon caps the total over every run in its ledger."""
    ledger = tmp_path / "ledger.json"
    cfg = dp_config(noise_multiplier=1.0)
    first = task_for(site, cfg, ledger)
    result = first.train("finetune", 1, initial_state(cfg, "finetune"))
    one_round = result.metrics["epsilon"]
    assert result.metrics["epsilon_site_total"] == pytest.approx(one_round)
    cap = SiteLimits(max_epsilon=one_round * 1.5)                # room for one round, not two
    second_run = task_for(site, cfg, ledger, run_key="run-2", limits=cap)   # a fresh key: its own epsilon would be 0
    with pytest.raises(PrivacyBudgetExceeded, match="site's total over every run"):
        second_run.train("finetune", 1, initial_state(cfg, "finetune"))
    assert [s.run for s in PrivacyLedger(ledger).entries] == ["run-1"]
    assert oct(ledger.stat().st_mode & 0o777) == "0o600" and oct(ledger.parent.stat().st_mode & 0o777) != "0o777"


def _spend_many(path: str, run: str, count: int, budget: float) -> int:
    ledger, done = PrivacyLedger(path), 0
    for i in range(count):
        try:
            ledger.spend(Spend(run, "finetune", i, 1.0, 0.1, 10), 1e-5, run_budget=None, site_budget=budget)
            done += 1
        except PrivacyBudgetExceeded:
            pass
    return done


def test_two_processes_spending_at_once_lose_nothing_and_never_pass_the_cap(tmp_path):
    """Each spend is checked and appended under the ledger's lock: with two runs racing, every
    recorded spend is in the file and the total stays within the site's cap."""
    import multiprocessing
    one = epsilon([(1.0, 0.1, 10)], 1e-5)
    fits = 12
    cap = epsilon([(1.0, 0.1, 10)] * fits, 1e-5) + 1e-6          # exactly `fits` spends fit
    path = str(tmp_path / "ledger.json")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        done = pool.starmap(_spend_many, [(path, "run-a", 20, cap), (path, "run-b", 20, cap)])
    entries = PrivacyLedger(path).entries
    assert sum(done) == len(entries) == fits and one > 0
    assert PrivacyLedger(path).epsilon(1e-5) <= cap


def test_delta_above_the_sites_bound_and_noise_below_its_floor_are_refused(site, tmp_path):
    loose = task_for(site, dp_config(noise_multiplier=1.0, delta=0.5), tmp_path / "ledger.json")
    with pytest.raises(PrivacyRefused, match=r"delta 5.0e-01 is above what the site allows"):
        loose.train("finetune", 1, initial_state(loose.cfg, "finetune"))
    faint = task_for(site, dp_config(noise_multiplier=0.001), tmp_path / "ledger.json",
                     limits=SiteLimits(min_noise_multiplier=0.5))
    with pytest.raises(PrivacyRefused, match="noise multiplier 0.001 is below the site's floor 0.5"):
        faint.train("finetune", 1, initial_state(faint.cfg, "finetune"))
    assert not (tmp_path / "ledger.json").exists()               # nothing spent


def test_evaluations_are_counted_and_limited_over_every_run(tmp_path):
    """The site counts every evaluation release (durably, per run for the record); past the
    policy's max_evaluations it answers no more, whatever the server asks. The coordinator names
    the run key, so a new key per message (the attack of issue #30) gets nothing more."""
    import json
    from cmvim.privacy import ReleaseLimit, count_release
    path = tmp_path / "state" / "releases.json"
    assert [count_release(path, "run-1", 3) for _ in range(2)] == [1, 2]
    assert count_release(path, "run-2", 3) == 3
    for key in ("run-3", "run-1", "fresh-key-every-time"):
        with pytest.raises(ReleaseLimit, match="its 3 evaluation release"):
            count_release(path, key, 3)
    assert count_release(path, "run-1", None) == 4             # no limit: still counted
    assert json.loads(path.read_text()) == {"runs": {"run-1": 3, "run-2": 1}, "total": 4}
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"


def test_a_small_cell_releases_nothing(site, tmp_path):
    """An evaluation split with fewer subjects of a class than the site's min_cell_count sends
    back only that it was suppressed; with a smaller threshold the same split is scored."""
    cfg = dp_config(noise_multiplier=1.0)
    state = initial_state(cfg, "finetune")
    task = task_for(site, cfg, tmp_path / "ledger.json", limits=SiteLimits(min_cell_count=1000))
    result = task.evaluate("finetune", state, None, "test")
    assert result.metrics == {"num-examples": 0, "suppressed": 1} and result.histograms is None
    task = task_for(site, cfg, tmp_path / "ledger.json", limits=SiteLimits(min_cell_count=1))
    scored = task.evaluate("finetune", state, None, "test")
    assert scored.metrics["num-examples"] > 0 and "auc" in scored.metrics and scored.histograms is not None
