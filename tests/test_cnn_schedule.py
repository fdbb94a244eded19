"""benchmarks/cnn_schedule.py's choice of the 3D CNN's schedule: a schedule with R rounds is worth
what finetune.select: best_val would have chosen among rounds 1..R (recomputed from the stored
per-subject validation scores, checked here against the run's own selection rule), and among
schedules within EQUAL of the best, the cheapest wins."""
import json

import numpy as np
import pytest


def rows_for(seed: int, lr: float, epochs: int, aucs: list[float], sites=("A", "B")) -> list[dict]:
    """Stored rows whose every site's validation AUC in round r is aucs[r-1] (8 subjects a site:
    AUC k/16 for k discordant-free pairs among 4 x 4; aucs must be multiples of 1/16)."""
    out = []
    for round_, auc in enumerate(aucs, start=1):
        wins = round(auc * 16)
        for site in sites:
            # positives score 1..4 above negatives' 0; move negatives up until exactly `wins` pairs are ordered
            negatives = np.zeros(4)
            scores_pos = np.array([1.0, 2.0, 3.0, 4.0])
            lost = 16 - wins
            for i in range(4):
                take = min(lost, 4)
                negatives[i] = scores_pos[take - 1] + 0.5 if take else 0.0
                lost -= take
            for index, (label, score) in enumerate([(1, s) for s in scores_pos] + [(0, s) for s in negatives]):
                out.append({"seed": seed, "lr": lr, "epochs": epochs, "round": round_, "site": site,
                            "index": index, "label": label, "score": float(score)})
    return out


def test_stored_scores_give_back_each_rounds_mean_site_auc(load_benchmark):
    bench = load_benchmark("cnn_schedule")
    aucs = [0.5, 0.75, 1.0, 0.25, 0.625]
    found = bench.round_aucs(rows_for(0, 1e-3, 1, aucs))[(0, 1e-3, 1)]
    assert [found[r] for r in range(1, 6)] == pytest.approx(aucs)


def test_a_round_cap_takes_the_best_validation_round_before_it_the_latest_of_equals(load_benchmark):
    from cmvim.server.checkpoints import BestRound
    bench = load_benchmark("cnn_schedule")
    aucs = {1: 0.6, 2: 0.8, 3: 0.7, 4: 0.8, 5: 0.9}
    assert bench.selected(aucs, 3) == (2, 0.8)
    assert bench.selected(aucs, 4) == (4, 0.8)
    assert bench.selected(aucs, 5) == (5, 0.9)
    assert bench.selected(aucs, 6) is None            # the run never reached round 6
    for cap in (3, 4, 5):                             # the run's own rule agrees
        best = BestRound()
        for round_ in range(1, cap + 1):
            best.offer(round_, aucs[round_], round_)
        assert best.round == bench.selected(aucs, cap)[0]


def test_the_cheapest_schedule_within_equal_of_the_best_is_chosen(load_benchmark, tmp_path):
    bench = load_benchmark("cnn_schedule")
    rows = []
    for seed in (0, 1):
        rows += rows_for(seed, 1e-3, 1, [0.5] * 9 + [0.875] + [0.875] * 30)      # 0.875 from round 10
        rows += rows_for(seed, 3e-3, 3, [0.5] * 9 + [0.8125] + [0.875] * 30)     # as good, three times the epochs
        rows += rows_for(seed, 3e-4, 1, [0.5] * 39 + [1.0])                      # best, but only at round 40
    text, chosen = bench.choose(rows)
    assert chosen == {"lr": 3e-4, "local_epochs": 1, "rounds": 40}
    text, chosen = bench.choose([r for r in rows if r["lr"] != 3e-4])
    assert chosen == {"lr": 1e-3, "local_epochs": 1, "rounds": 10} and "chosen: lr 0.001" in text
    # a schedule one seed has not finished is left out of the choice
    partial = [r for r in rows if not (r["lr"] == 3e-4 and r["seed"] == 1 and r["round"] > 20)]
    assert bench.choose(partial)[1] == {"lr": 1e-3, "local_epochs": 1, "rounds": 10}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.choose(bench.read_rows(path)) == bench.choose(rows)
