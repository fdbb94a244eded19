"""The supervised 3D CNN baseline (cmvim.cnn3d): its shapes, how it treats a missing PET, that its
training is reproducible from the run's seed, and that FedAvg over the easy cohort's sites and the
pooled version both learn, scored on every site's test split as the other baselines are."""
from pathlib import Path

import pytest
import torch

from cmvim.cnn3d import CnnTask, ResNet3d, cnn_initial_state
from cmvim.protocol import NUM_EXAMPLES
from cmvim.run_config import run_config

pytest.importorskip("nilearn")


def batch(n: int = 4, size: int = 32, pet_present=(True, False, True, False), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"mri": torch.randn(n, 1, size, size, size, generator=generator),
            "pet": torch.randn(n, 1, size, size, size, generator=generator),
            "mri_present": torch.ones(n, dtype=torch.bool), "pet_present": torch.tensor(pet_present)}


def cnn_config(cohort: Path, select: str = "last", **schedule) -> dict:
    """tests/test_federated.py's tiny run, the CNN on a schedule of its own of 10 rounds of 3 epochs:
    from scratch, FedAvg over three sites of ~20 labelled training subjects needs them (5 rounds:
    0.60). CMViM's fine-tuning schedule is left as the tiny run's, which the CNN must not follow."""
    return {"seed": 0, "cohort": {"path": str(cohort)}, "model": {"preset": "tiny"},
            "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
            "split_fractions": [0.6, 0.0, 0.4], "modality_dropout": 0.0,
            "finetune": {"rounds": 2, "local_epochs": 1, "batch_size": 8, "lr": 3e-4, "select": select},
            "cnn3d": {"rounds": 10, "local_epochs": 3, "batch_size": 4, "lr": 0.002, **schedule},
            "evaluation": {"bootstrap": 200, "every_round": False}}


@pytest.fixture
def one_thread():
    """One intra-op thread, as each simulated site trains: on a busy 2-core machine two threads
    spin against the other processes (measured: 180 s for the end-to-end test, 40 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def easy_sites(easy_cohort):
    from cmvim.simulations.assembly import prepare_sites
    return prepare_sites(run_config(cnn_config(easy_cohort)))


def test_logits_have_one_column_a_class_at_any_grid_size():
    for classes, size in ((2, 32), (3, 48)):
        model = ResNet3d(classes)
        assert model(batch(size=size)).shape == (4, classes)
    assert sum(p.numel() for p in ResNet3d(2).parameters()) < 1_000_000
    assert not list(ResNet3d(2).buffers())          # GroupNorm: nothing but weights for FedAvg to average


def test_a_visit_without_pet_scores_the_same_whatever_its_pet_tensor_holds():
    model = ResNet3d(2, generator=torch.Generator().manual_seed(0)).eval()
    zeros, noise = batch(), batch()
    zeros["pet"][~zeros["pet_present"]] = 0.0
    noise["pet"][~noise["pet_present"]] = 5 * torch.randn_like(noise["pet"][~noise["pet_present"]])
    with torch.no_grad():
        assert torch.equal(model(zeros), model(noise))
        present = batch(pet_present=(True,) * 4)
        changed = dict(present, pet=present["pet"] + 1.0)
        assert not torch.allclose(model(present), model(changed))          # a present PET is read
        # and the head sees the flag: the same zero PET, present or not, scores differently
        assert not torch.allclose(model(dict(zeros, pet_present=torch.ones(4, dtype=torch.bool))), model(zeros))


def test_training_is_reproducible_from_the_runs_seed(easy_cohort, easy_sites, one_thread):
    cfg = run_config(cnn_config(easy_cohort, local_epochs=1))
    torch.manual_seed(123)                               # the global RNG plays no part
    first = cnn_initial_state(cfg)
    torch.manual_seed(456)
    assert all(torch.equal(v, cnn_initial_state(cfg)[k]) for k, v in first.items())
    other = cnn_initial_state(run_config(cnn_config(easy_cohort), seed=1))
    assert not torch.equal(first["stem.0.weight"], other["stem.0.weight"])
    runs = [CnnTask(cfg, [easy_sites["A"]], "A").train("finetune", 1, first) for _ in range(2)]
    assert runs[0].metrics == runs[1].metrics and runs[0].metrics[NUM_EXAMPLES] == len(easy_sites["A"].subset(
        "train", True)) > 10
    assert all(torch.equal(v, runs[1].shared[k]) for k, v in runs[0].shared.items())
    assert not torch.equal(runs[0].shared["stem.0.weight"], first["stem.0.weight"])


def test_federated_and_pooled_cnn_learn_the_easy_cohort(easy_cohort, easy_sites, one_thread):
    """Measured (seed 0, 10 rounds x 3 epochs, one thread): FedAvg 0.908 mean per-site AUC, pooled
    0.964 (seeds 0-2 in docs/science.md)."""
    from cmvim.results import site_table
    from cmvim.simulations.baselines import run_baselines
    cfg = run_config(cnn_config(easy_cohort))
    out = run_baselines(cfg, easy_sites, ["cnn3d", "cnn3d_centralized"], say=lambda *_: None)
    n_test = sum(len(site.subset("test", True)) for site in easy_sites.values())
    for name, bound in (("cnn3d", 0.8), ("cnn3d_centralized", 0.85)):
        baseline = out[name]
        assert set(baseline["sites"]) == {"A", "B", "C"}
        for entry in baseline["sites"].values():
            assert entry["n_test"] >= 10 and 0 <= entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1]
        assert baseline["mean_auc"] > bound, (name, baseline["sites"])
        assert baseline["pooled"]["n_test"] == n_test
        assert baseline["n_train"] == sum(len(site.subset("train", True)) for site in easy_sites.values())
        assert "3D ResNet" in baseline["model"]
    assert "AUC cnn3d " in site_table(out["cnn3d"]["sites"], out["cnn3d"]["pooled"], out)


def test_best_validation_selection_scores_each_site_of_the_pooled_model(easy_cohort, one_thread):
    """finetune.select best_val: the round is the one with the best mean per-site validation AUC,
    the pooled CNN scored site by site (train_rounds' validation_auc builds one CnnTask a site)."""
    from cmvim.simulations.baselines import train_cnn3d, validation_auc
    from cmvim.simulations.assembly import prepare_sites
    cfg = run_config(cnn_config(easy_cohort, select="best_val", rounds=2, local_epochs=1),
                     split_fractions=[0.5, 0.2, 0.3], evaluation={"bootstrap": 50, "every_round": True})
    sites = prepare_sites(cfg)
    pooled = [CnnTask(cfg, list(sites.values()), "pooled")]
    scores = []
    final = train_cnn3d(cfg, pooled, after_round=lambda r, shared, local: scores.append(
        (validation_auc(pooled, shared, local), shared)))
    best = max(range(len(scores)), key=lambda i: (scores[i][0], i))
    assert all(torch.equal(v, scores[best][1][k]) for k, v in final.items())


def test_the_cnn_trains_on_its_own_schedule_not_fine_tunings(easy_cohort, easy_sites, one_thread, monkeypatch):
    """`cnn3d` replaces fine-tuning's schedule for the CNN alone (rounds, epochs, lr, batch, weight
    decay), keeps the selection rule, and null gives fine-tuning's back; the rounds the CNN trains
    are its own, each over its own epochs at its own lr."""
    from cmvim import engine
    from cmvim.cnn3d import cnn_run_config, describe
    from cmvim.simulations.baselines import train_cnn3d
    cfg = run_config(cnn_config(easy_cohort, rounds=3, local_epochs=2, weight_decay=0.01))
    own = cnn_run_config(cfg)
    assert (own.finetune.rounds, own.finetune.local_epochs, own.finetune.lr, own.finetune.batch_size,
            own.finetune.weight_decay, own.finetune.probe_rounds) == (3, 2, 0.002, 4, 0.01, 0)
    assert own.finetune.select == cfg.finetune.select and cnn_run_config(own) == own
    assert cfg.finetune.rounds == 2                       # CMViM's own schedule is untouched
    assert "its own schedule: 3 rounds x 2 epochs, lr 0.002" in describe(cfg)
    unset = run_config(cnn_config(easy_cohort), cnn3d=None)
    assert cnn_run_config(unset) == unset and "the fine-tuning schedule: 2 rounds x 1 epochs" in describe(unset)

    calls, rounds, real = [], [], engine.finetune

    def recording(model, loader, optimizer, epochs, max_steps, **kwargs):
        calls.append((epochs, optimizer.param_groups[0]["lr"], max(g["weight_decay"] for g in optimizer.param_groups),
                      loader.batch_size))
        return real(model, loader, optimizer, epochs, max_steps, **kwargs)

    monkeypatch.setattr(engine, "finetune", recording)
    train_cnn3d(cfg, [CnnTask(cfg, [easy_sites["A"]], "A")], after_round=lambda r, shared, local: rounds.append(r))
    assert rounds == [1, 2, 3] and calls == [(2, 0.002, 0.01, 4)] * 3


def test_the_run_config_names_the_cnn_baselines():
    assert run_config(baselines=["cnn3d", "cnn3d_centralized"]).baselines == ["cnn3d", "cnn3d_centralized"]
    with pytest.raises(ValueError, match="'cnn3d_centralized'"):
        run_config(baselines=["cnn"])


def test_predict_scores_the_subjects_evaluate_scores(easy_cohort, easy_sites, one_thread):
    """CnnTask.predict (benchmarks keep its per-subject scores) and evaluate read the same test split."""
    from cmvim.metrics import auc_or_nan
    cfg = run_config(cnn_config(easy_cohort))
    task = CnnTask(cfg, [easy_sites["C"]], "C")
    state = cnn_initial_state(cfg)
    labels, scores = task.predict(state, {}, "test")
    assert len(labels) == len(easy_sites["C"].subset("test", True)) == len(scores) and 0 < labels.sum() < len(labels)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert abs(task.evaluate("finetune", state).metrics["auc"] - auc_or_nan(labels, scores)) < 1e-9
