"""benchmarks/finetune_rounds.py: the rules that choose the final fine-tuning round, on rounds
whose scores are worked out by hand; the embedding-readout diagnostic; SiteTask.predict against
the site's own evaluation; train_rounds' per-round hook."""
from pathlib import Path

import numpy as np
import pytest
import torch

from cmvim.data import SiteData
from cmvim.model import CMViMClassifier, model_config
from cmvim.results import mean_auc, site_entry
from cmvim.run_config import PreprocessConfig, run_config
from cmvim.simulations.baselines import train_rounds
from cmvim.simulations.toy import synthetic_batch
from cmvim.site_task import SiteTask
from cmvim.weights import initial_state

# two sites, 2 AD + 2 CN each: labels [1, 1, 0, 0]
PERFECT, ONE_SWAP, SWAPPED = [0.9, 0.8, 0.2, 0.1], [0.9, 0.3, 0.4, 0.1], [0.2, 0.1, 0.9, 0.8]
LABELS = [1, 1, 0, 0]


def _split(a, b):
    return {"A": [LABELS, a], "B": [LABELS, b]}


def test_each_rule_picks_the_round_its_score_says(load_benchmark):
    bench = load_benchmark("finetune_rounds")
    rounds = [
        # round 1: site A perfect, B reversed: per-site mean 0.5
        {"val": _split(PERFECT, SWAPPED), "test": _split(ONE_SWAP, ONE_SWAP)},
        # round 2: per-site AUC 1.0 and 0.75 (mean 0.875); pooled: B's low scores interleave A's
        {"val": _split(PERFECT, ONE_SWAP), "test": _split(PERFECT, PERFECT)},
        # round 3: the same per-site AUCs (a tie: the latest wins), scores nearer 0.5 (higher log-loss)
        {"val": _split([0.6, 0.55, 0.45, 0.4], [0.6, 0.45, 0.5, 0.4]), "test": _split(ONE_SWAP, PERFECT)},
        # round 4: per-site mean 0.75 but confident and right on most subjects
        {"val": _split([0.99, 0.98, 0.01, 0.02], [0.99, 0.2, 0.4, 0.01]), "test": _split(SWAPPED, SWAPPED)},
    ]
    assert bench.site_mean_auc(rounds[1]["val"]) == pytest.approx(0.875)
    assert bench.site_mean_auc(rounds[2]["val"]) == pytest.approx(0.875)
    assert bench.site_mean_auc(rounds[3]["val"]) == pytest.approx(0.875)
    # pooled, round 2: AD 0.9 0.8 0.9 0.3 against CN 0.2 0.1 0.4 0.1; 0.3 loses to 0.4 only: 15 of 16 pairs
    assert bench.pooled_auc(rounds[1]["val"]) == pytest.approx(15 / 16)
    # round 3: AD 0.6 0.55 0.6 0.45 against CN 0.45 0.4 0.5 0.4: 0.45 ties one, loses one: 14.5 of 16
    assert bench.pooled_auc(rounds[2]["val"]) == pytest.approx(14.5 / 16)
    # round 4: AD 0.99 0.98 0.99 0.2 against CN 0.01 0.02 0.4 0.01: 15 of 16 again
    ad = np.array([0.99, 0.98, 0.99, 0.2])
    cn = np.array([0.01, 0.02, 0.4, 0.01])
    expected = -np.mean(np.concatenate([np.log(ad), np.log(1 - cn)]))
    assert bench.pooled_log_loss(rounds[3]["val"]) == pytest.approx(expected)
    picked = bench.selections(rounds, probe_rounds=2)
    assert picked[bench.RULES[0]] == 3          # three rounds tie at 0.875: the latest
    assert picked[bench.RULES[3]] == 3 and picked[bench.RULES[4]] == 1
    assert picked[bench.RULES[6]] == 1          # the best test round
    among_probes = bench.selections(rounds, probe_rounds=3)
    assert among_probes[bench.RULES[5]] == 2    # probe rounds 2 and 3 tie on val: the latest
    assert among_probes[bench.RULES[7]] == 1    # the probe round with the best test AUC
    assert among_probes[bench.RULES[4]] == 2    # the last probe round
    losses = [bench.pooled_log_loss(r["val"]) for r in rounds]
    assert picked[bench.RULES[2]] == int(np.argmin(losses))
    assert bench.pooled_auc(rounds[3]["val"]) == pytest.approx(15 / 16)
    assert picked[bench.RULES[1]] == 3          # rounds 2 and 4 tie at 15/16: the latest
    # the report: per rule the chosen round's test AUC, its gap to the baseline and the round (1-based)
    table = bench.report([{"seed": 7, "linear": 0.9, "probe_rounds": 2, "rounds": rounds}])
    default_row = next(line for line in table.splitlines() if line.startswith(f"| {bench.RULES[0]}"))
    cells = [c.strip() for c in default_row.strip("|").split("|")]
    assert cells[1:] == ["0.000", "-0.900 ± 0.000", "0", "0.000", "4"]      # round 4's test: both sites reversed
    oracle_row = next(line for line in table.splitlines() if line.startswith(f"| {bench.RULES[6]}"))
    assert [c.strip() for c in oracle_row.strip("|").split("|")][1:] == ["1.000", "+0.100 ± 0.000", "1", "1.000", "2"]
    assert "mean change 0.417, largest 0.875" in table      # test AUC 0.75, 1, 0.875, 0


def test_a_site_that_cannot_score_never_wins_the_selection(load_benchmark):
    bench = load_benchmark("finetune_rounds")
    assert bench._latest_best([0.7, float("nan"), 0.6]) == 0
    assert bench._latest_best([float("nan"), float("nan")]) == 1     # nothing scored: the last round


def test_the_embedding_readout_skips_the_encoder_blocks_and_is_undone_afterwards(load_benchmark):
    bench = load_benchmark("finetune_rounds")
    mc = model_config("tiny", readout="factorized", head_rank=2)
    batch = synthetic_batch(mc, 3, seed=1)
    with bench.embedding_readout():
        torch.manual_seed(0)
        clf = CMViMClassifier(mc)
        tokens = torch.cat([clf.image.tokens(batch, m) for m in mc.modalities], dim=1)
        rms = tokens / tokens.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
        torch.testing.assert_close(clf.features(batch), rms.flatten(1))
        before = clf(batch)
        with torch.no_grad():
            for p in clf.image.encoder.parameters():
                p.add_(1.0)
        torch.testing.assert_close(clf(batch), before)          # the blocks play no part
    plain = CMViMClassifier(mc)
    assert not hasattr(plain, "embedding_norm")
    tokens = torch.cat([plain.image.tokens(batch, m) for m in mc.modalities], dim=1)
    torch.testing.assert_close(plain.features(batch), plain.image.encoder(tokens).flatten(1))


def test_predict_scores_what_the_sites_evaluation_scores_and_every_round_is_seen(easy_cohort):
    preprocess = PreprocessConfig(spatial="none", shape=32, voxel_size=6.25, normalize={"mri": "zscore", "pet": "suvr"})
    cfg = run_config({"cohort": {"path": str(easy_cohort)}, "model": {"preset": "tiny", "readout": "tokens"},
                      "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25, "normalize": {"mri": "zscore", "pet": "suvr"}},
                      "split_fractions": [0.6, 0.0, 0.4], "evaluation": {"bootstrap": 10},
                      "finetune": {"rounds": 2, "probe_rounds": 1, "probe_epochs": 5, "batch_size": 8}})
    tasks = [SiteTask(cfg, [SiteData.load(Path(easy_cohort) / name, preprocess, seed=0, split_fractions=(0.6, 0.0, 0.4))],
                      name) for name in "AB"]
    seen = []
    final, local = train_rounds(cfg, tasks, "finetune", initial_state(cfg, "finetune"),
                                after_round=lambda r, shared, _local: seen.append((r, shared)))
    assert [r for r, _ in seen] == [1, 2] and seen[-1][1] is final
    from sklearn.metrics import roc_auc_score
    for task in tasks:
        labels, scores = task.predict(final, local[task.name], "test")
        assert set(labels.tolist()) == {0, 1} and scores.shape == labels.shape
        entry = site_entry(dict(task.evaluate("finetune", final, local[task.name], "test").metrics))
        assert entry["auc"] == pytest.approx(roc_auc_score(labels, scores))
        assert entry["n_test"] == len(labels)
    assert np.isfinite(mean_auc({t.name: site_entry(dict(t.evaluate("finetune", final, {}, "test").metrics))
                                 for t in tasks}))
