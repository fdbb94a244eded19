"""benchmarks/deploy_overhead.py's summary by kind of round, on hand-worked rounds (the deployment
itself is the benchmark's to run: minutes, and its numbers are the machine's)."""
from __future__ import annotations


def rows(*rounds):
    return [{"name": name, "wall": wall, "work": work} for name, wall, work in rounds]


def test_rounds_are_grouped_by_kind_with_the_probe_rounds_apart(load_benchmark):
    bench = load_benchmark("deploy_overhead")
    rounds = rows(("pretrain 1", 10.0, 9.0), ("pretrain 2", 20.0, 19.0), ("finetune 1", 2.0, 1.0),
                  ("finetune 2", 4.0, 3.0), ("finetune 3", 5.0, 4.5), ("finetune 4", None, None))
    groups = dict(bench.phase_groups(rounds, probe_rounds=1))
    assert [r["name"] for r in groups["pretraining"]] == ["pretrain 1", "pretrain 2"]
    assert [r["name"] for r in groups["fine-tuning, probe rounds (the head alone)"]] == ["finetune 1"]
    assert [r["name"] for r in groups["fine-tuning, the other rounds"]] == ["finetune 2", "finetune 3"]
    assert len(groups["all rounds"]) == 5                  # the round with no measurement is left out
    assert "fine-tuning, probe rounds (the head alone)" not in dict(bench.phase_groups(rounds, probe_rounds=0))


def test_the_table_gives_each_kinds_median_round_and_its_share_of_the_kinds_time(load_benchmark):
    bench = load_benchmark("deploy_overhead")
    rounds = rows(("pretrain 1", 10.0, 9.0), ("pretrain 2", 20.0, 19.0), ("pretrain 3", 10.0, 8.0),
                  ("finetune 1", 2.0, 1.0), ("finetune 2", 4.0, 3.0))
    lines = bench.phase_table(rounds, probe_rounds=0)
    # pretraining: 10 %, 5 %, 20 % a round -> median 10 %; 4 s of 40 s -> 10 %
    assert lines[2] == "| pretraining | 3 | 10 % (5-20 %) | 40.0 | 4.0 | 10% |"
    # fine-tuning: 50 % and 25 % -> median 37.5 (rounds to 38); 2 s of 6 s
    assert lines[3] == "| fine-tuning, the other rounds | 2 | 38 % (25-50 %) | 6.0 | 2.0 | 33% |"
    # all five: 10, 5, 20, 50, 25 -> median 20 %; 6 s of 46 s
    assert lines[4] == "| all rounds | 5 | 20 % (5-50 %) | 46.0 | 6.0 | 13% |"
