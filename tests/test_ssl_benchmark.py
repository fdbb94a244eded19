"""benchmarks/ssl.py's bookkeeping: which weights a variant pretrains with, and which rows a
resumed run or a table may take as measured under the same recipe."""
from pathlib import Path

from cmvim.config import load_yaml
from cmvim.run_config import run_config
from cmvim.simulations.cohort import CohortConfig

ROOT = Path(__file__).parents[1]


def _with(data: dict, section: str, **values) -> dict:
    return {**data, section: {**data.get(section, {}), **values}}


def test_variants_pretrain_with_the_papers_weights_whatever_the_run_config_says(load_benchmark):
    ssl = load_benchmark("ssl")
    data = load_yaml(ROOT / "simulations" / "configs" / "quick.yaml")
    loss = {"intra": 0.0, "inter": 0.0, "report": 0.0}
    mae_only_run = run_config({**data, "model": {**data["model"], "loss": loss}, "use_reports": False})
    full = ssl.variant_config(mae_only_run, "cmvim")
    assert (full.model.loss.intra, full.model.loss.inter, full.model.loss.report, full.use_reports) == \
        (0.05, 0.05, 0.05, True)
    intra = ssl.variant_config(mae_only_run, "mae+intra")
    assert (intra.model.loss.intra, intra.model.loss.inter, intra.model.loss.report, intra.use_reports) == \
        (0.05, 0.0, 0.0, False)
    assert ssl.variant_config(mae_only_run, "fresh") is mae_only_run


def test_the_recipe_key_ignores_what_every_row_sets_itself_and_nothing_else(load_benchmark):
    ssl = load_benchmark("ssl")
    data = load_yaml(ROOT / "simulations" / "configs" / "quick.yaml")
    cohort = CohortConfig(sites=3, subjects=20, shape=64, seed=1)
    key = ssl.recipe_key(run_config(data), cohort)
    loss = {**data["model"].get("loss", {}), "inter": 0.0, "report": 0.0}
    same = [{**data, "model": {**data["model"], "loss": loss}, "use_reports": False},
            _with(data, "evaluation", carry_validation=False), {**data, "seed": 7},
            {**data, "cnn3d": {"rounds": 40, "lr": 3e-3}}, {**data, "cnn3d": None}]   # the CNN's: never read
    for variant in same:
        assert ssl.recipe_key(run_config(variant), cohort) == key
    other = [_with(data, "finetune", lr=5e-4), _with(data, "pretrain", rounds=3)]
    for variant in other:
        assert ssl.recipe_key(run_config(variant), cohort) != key
    assert ssl.recipe_key(run_config(data), CohortConfig(sites=3, subjects=20, shape=64, seed=2)) != key


def test_the_label_fraction_leaves_every_model_the_same_labels(load_benchmark, easy_sites):
    """Issue #32: at a fraction, fine-tuning (train, and validation to choose its round) and the
    probe and baseline (fitted on train + validation) spend the same labels: the fraction applies
    to both splits, by class; the test split keeps every label."""
    import dataclasses

    from cmvim.data import SiteData
    ssl = load_benchmark("ssl")
    site = easy_sites["A"]
    records = [dataclasses.replace(r, split="val") if r.split == "train" and i % 3 == 0 else r
               for i, r in enumerate(site.records)]
    site = SiteData(site.site_dir, site.cfg, records, site.summary, site.cache)
    kept = ssl.with_label_fraction(site, 0.5, seed=3)
    for split in ("train", "val"):
        for label in ("CN", "AD"):
            before = [r for r in site.subset(split, True) if r.entry.label == label]
            after = [r for r in kept.subset(split, True) if r.entry.label == label]
            assert len(before) > 1 and len(after) == max(1, round(0.5 * len(before))), (split, label)
    assert len(kept.subset("test", True)) == len(site.subset("test", True))
    assert len(kept.records) == len(site.records)                     # the others stay, unlabelled
    assert ssl.with_label_fraction(site, 0.5, seed=4).subset("train", True) != kept.subset("train", True)
