"""benchmarks/heldout.py's tables from stored per-subject scores: the 3D CNN gets its columns once
every stored cohort seed has it, and each number is the AUC of the stored scores."""
import numpy as np
import pytest


def rows(bench, cohort_seed: int, models: dict[str, float]) -> list[dict]:
    """Scores where a model ranks a fraction `quality` of the AD subjects above every CN subject."""
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    out = []
    for model, quality in models.items():
        scores = np.where(labels == 1, 1.0, 0.5)
        scores[: int(round((1 - quality) * 4))] = 0.0          # these AD subjects rank below every CN
        out += bench.score_rows(cohort_seed, 0, model, {"A": (labels, scores), "B": (labels, scores)})
    return out


def test_the_cnn_is_a_column_once_every_cohort_seed_has_it(load_benchmark):
    bench = load_benchmark("heldout")
    stored = rows(bench, 51, {"cmvim": 1.0, "linear": 0.75, "cnn3d": 0.5}) + rows(bench, 52, {"cmvim": 1.0,
                                                                                               "linear": 0.75})
    per_site, per_cohort, last = bench.tables(stored)
    assert "3D CNN" not in per_cohort and "3D CNN" not in last and "| 52 " in per_cohort
    stored += rows(bench, 52, {"cnn3d": 0.75})
    per_site, per_cohort, last = bench.tables(stored)
    assert "3D CNN mean per-site AUC" in per_cohort and "pooled 3D CNN - linear (95% CI)" in per_cohort
    assert "3D CNN AUC" in per_site
    assert "3D CNN 0.625 ± 0.177 (SD)" in last and "CMViM mean per-site AUC 1.000" in last
    line = next(r for r in per_cohort.splitlines() if r.startswith("| 51 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:6] == ["1.000", "0.750", "0.500"] and cells[-1].startswith("-0.250")


def test_a_model_scoring_other_subjects_is_refused(load_benchmark):
    bench = load_benchmark("heldout")
    stored = rows(bench, 51, {"cmvim": 1.0, "linear": 0.75, "cnn3d": 0.5})
    for row in stored:
        if row["model"] == "cnn3d" and row["index"] == 0:
            row["label"] = 0
    with pytest.raises(AssertionError):
        bench.tables(stored)
