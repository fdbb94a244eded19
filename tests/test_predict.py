"""A run's portable model and its decision rule: the threshold and calibration fitted on validation
histograms, model/ written as safetensors + config.json, and `cmvim-client predict` reproducing the
run's test metrics at a site from the exported model alone."""
import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score, roc_curve

from cmvim.calibration import Calibration, fit_calibration, logit, logit_edges, logit_histograms
from cmvim.client.cli import main as client_main
from cmvim.data import read_manifest
from cmvim.data.site import assign_splits
from cmvim.portable import ModelFileError, export_model, load_model
from cmvim.run_config import run_config
from cmvim.weights import build_model


def _validation(n: int, slope: float, intercept: float, seed: int = 0):
    """Model logits z and labels drawn so that P(AD | z) = sigmoid(slope * z + intercept)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(slope * z + intercept)))).astype(int)
    return labels, 1 / (1 + np.exp(-z))


def test_platt_scaling_recovers_the_validation_odds():
    labels, probabilities = _validation(20_000, slope=0.5, intercept=-1.0)
    calibration = fit_calibration(*logit_histograms(labels, probabilities), rule="youden")
    assert calibration.calibrated and calibration.n_val == 20_000
    assert calibration.a == pytest.approx(0.5, abs=0.05) and calibration.b == pytest.approx(-1.0, abs=0.08)
    # calibrated: among subjects scored ~0.3, ~30 % have AD
    scores = calibration.apply(probabilities)
    band = (scores > 0.25) & (scores < 0.35)
    assert labels[band].mean() == pytest.approx(0.30, abs=0.04)
    # a monotone map: the AUC does not move
    assert roc_auc_score(labels, scores) == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-9)


def test_youden_threshold_is_the_best_j_within_a_bin():
    labels, probabilities = _validation(3_000, slope=1.5, intercept=0.5, seed=1)
    calibration = fit_calibration(*logit_histograms(labels, probabilities), rule="youden")
    fpr, tpr, _ = roc_curve(labels, probabilities)
    best_j = float(np.max(tpr - fpr))
    predicted = calibration.predict(probabilities).astype(bool)
    sens, spec = predicted[labels == 1].mean(), (~predicted[labels == 0]).mean()
    assert sens + spec - 1 == pytest.approx(best_j, abs=0.02)          # binning costs at most a bin's worth
    assert (sens, spec) == pytest.approx((calibration.val_sensitivity, calibration.val_specificity), abs=1e-9)


def test_target_sensitivity_is_the_highest_threshold_that_reaches_it():
    labels, probabilities = _validation(3_000, slope=1.0, intercept=0.0, seed=2)
    pos, neg = logit_histograms(labels, probabilities)
    calibration = fit_calibration(pos, neg, rule="sensitivity", target_sensitivity=0.9)
    predicted = calibration.predict(probabilities).astype(bool)
    assert predicted[labels == 1].mean() >= 0.9
    # the threshold sits on a bin edge; one edge higher and the sensitivity falls below the target
    edges = logit_edges()
    i = int(np.argmin(np.abs(calibration.apply(1 / (1 + np.exp(-edges))) - calibration.threshold)))
    assert (logit(probabilities)[labels == 1] >= edges[i + 1]).mean() < 0.9


def test_no_fit_without_both_classes_or_when_asked_for_none():
    for pos, neg in (([0] * 96, [3] * 96), ([5] * 96, [0] * 96)):
        calibration = fit_calibration(pos, neg)
        assert not calibration.calibrated and calibration.threshold == 0.5 and "nothing to fit" in calibration.note
    labels, probabilities = _validation(500, slope=1.0, intercept=0.0)
    fixed = fit_calibration(*logit_histograms(labels, probabilities), rule="fixed", platt=False)
    assert fixed.threshold == 0.5 and not fixed.calibrated and "calibration: none" in fixed.note
    uncalibrated = fit_calibration(*logit_histograms(labels, probabilities), platt=False)
    assert not uncalibrated.calibrated and np.array_equal(uncalibrated.apply(probabilities), probabilities)


def test_a_fixed_threshold_still_gets_calibrated_scores():
    """threshold_rule fixed with calibration platt: 0.5 on Platt-calibrated scores, i.e. even odds."""
    labels, probabilities = _validation(4_000, slope=0.5, intercept=-1.0)
    fixed = fit_calibration(*logit_histograms(labels, probabilities), rule="fixed")
    assert fixed.calibrated and fixed.threshold == 0.5 and fixed.rule == "fixed"
    assert abs(fixed.a - 0.5) < 0.05 and abs(fixed.b + 1.0) < 0.08
    # the validation sensitivity/specificity reported are the rule's at the first bin edge whose
    # calibrated score reaches 0.5; the exact rule's lie between that edge and the one below
    edges = logit_edges()
    i = int(np.flatnonzero(fixed.apply(1 / (1 + np.exp(-edges))) >= 0.5).min())
    z, ad = logit(probabilities), labels == 1
    assert fixed.val_sensitivity == pytest.approx((z[ad] >= edges[i]).mean())
    assert fixed.val_specificity == pytest.approx((z[~ad] < edges[i]).mean())
    exact = fixed.apply(probabilities) >= 0.5
    assert (z[ad] >= edges[i]).mean() <= exact[ad].mean() <= (z[ad] >= edges[i - 1]).mean()


def test_brier_and_ece_from_the_sites_histograms_match_the_scores_themselves():
    """The run computes calibration from the score histograms the sites send (no scores leave a
    site): against Brier and a 10-bin ECE computed from every subject's score, raw and Platt-
    calibrated, the binned values agree within what a 1/50 bin allows."""
    from cmvim.metrics import calibration_from_histograms, score_histograms
    labels, probabilities = _validation(5_000, slope=2.0, intercept=-0.5, seed=3)
    calibration = fit_calibration(*logit_histograms(labels, probabilities))
    for transform in (None, calibration.apply):
        reported = probabilities if transform is None else transform(probabilities)
        found = calibration_from_histograms(*score_histograms(labels, probabilities, 50), transform)
        groups = np.minimum((reported * 10).astype(int), 9)
        ece = sum((groups == g).mean() * abs(reported[groups == g].mean() - labels[groups == g].mean())
                  for g in range(10) if (groups == g).any())
        assert found["brier"] == pytest.approx(np.mean((labels - reported) ** 2), abs=0.005)
        assert found["ece"] == pytest.approx(ece, abs=0.02)
        assert sum(n for _, _, n in found["reliability"]) == len(labels)
    raw = calibration_from_histograms(*score_histograms(labels, probabilities, 50))
    platt = calibration_from_histograms(*score_histograms(labels, probabilities, 50), calibration.apply)
    assert platt["ece"] < raw["ece"]                         # what Platt scaling is for


def test_the_stratified_bootstrap_keeps_class_sizes_and_pairs_the_two_models():
    """The CI benchmarks put beside every AUC (cmvim.metrics.stratified_auc_ci): it holds the AUC,
    narrows with more subjects, and a paired difference of a model with itself is exactly 0."""
    from cmvim.metrics import auc_or_nan, stratified_auc_ci
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 400):
        labels = np.r_[np.ones(n // 4, dtype=int), np.zeros(n - n // 4, dtype=int)]
        scores = labels + rng.normal(0, 1.0, n)
        low, high = stratified_auc_ci(labels, scores, resamples=500)
        assert low <= auc_or_nan(labels, scores) <= high
        widths.append(high - low)
        assert stratified_auc_ci(labels, scores, scores, resamples=200) == [0.0, 0.0]
        noise = rng.normal(0, 1.0, n)
        d_low, d_high = stratified_auc_ci(labels, scores, noise, resamples=500)
        assert d_low < auc_or_nan(labels, scores) - auc_or_nan(labels, noise) < d_high
        assert d_low > 0 or n == 20                 # 400 subjects: the signal beats noise beyond doubt
    assert widths[1] < widths[0] / 2
    # 1 positive among 10: every redraw keeps it (a plain bootstrap loses it in ~35 % of redraws)
    assert np.isfinite(stratified_auc_ci(np.r_[1, np.zeros(9, dtype=int)], np.arange(10.0), resamples=200)).all()
    assert np.isnan(stratified_auc_ci(np.zeros(5, dtype=int), np.arange(5.0))).all()


def test_the_fast_stratified_bootstrap_gives_the_references_interval():
    """stratified_auc_ci reads each redraw's AUC from a pairwise table; the reference calls
    roc_auc_score on every redraw: the same redraws, so the same interval, ties and pairs included."""
    from cmvim.metrics import stratified_auc_ci, stratified_auc_ci_reference
    rng = np.random.default_rng(3)
    for n, rounding in ((12, 1), (60, 2), (150, 8)):
        labels = (rng.random(n) < 0.3).astype(int)
        labels[:2] = (1, 0)
        a = np.round(labels + rng.normal(0, 1, n), rounding)          # coarse rounding: many ties
        b = np.round(rng.normal(0, 1, n), rounding)
        for scores in ((a,), (a, b)):
            fast = stratified_auc_ci(labels, *scores, resamples=300, seed=n)
            slow = stratified_auc_ci_reference(labels, *scores, resamples=300, seed=n)
            assert np.allclose(fast, slow, atol=1e-12), (n, len(scores), fast, slow)


def test_benchmark_tables_label_their_spread_and_skip_what_is_undefined():
    """cmvim.tables.mean_sd / ci_text: the sample SD, labelled; NaN values left out; n/a when nothing is left."""
    import statistics
    from cmvim.tables import ci_text, mean_sd
    values = [0.91, 0.97, 0.88]
    assert mean_sd(values) == f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (SD)"
    assert mean_sd([0.02, float("nan"), -0.01], "+") == f"+0.005 ± {statistics.stdev([0.02, -0.01]):.3f} (SD)"
    assert mean_sd([0.5]) == "0.500" and mean_sd([float("nan")]) == "n/a" and mean_sd([]) == "n/a"
    assert ci_text([0.012, 0.2]) == "[0.01, 0.20]" and ci_text([-0.04, 0.1], "+") == "[-0.04, +0.10]"
    assert ci_text([float("nan"), 1.0]) == "n/a"


def test_a_fit_that_would_reverse_the_ranking_is_refused():
    labels, probabilities = _validation(2_000, slope=-1.0, intercept=0.0)     # the model is anti-correlated
    calibration = fit_calibration(*logit_histograms(labels, probabilities))
    assert not calibration.calibrated and "reverse" in calibration.note
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration


TRAINED = {"pretrain_rounds": 1, "pretrain_rounds_aggregated": 1, "finetune_rounds": 2, "finetune_rounds_aggregated": 2,
           "finetune_sites": ["A", "B"], "finetune_examples": {"A": 20, "B": 18}}


def _tiny(tmp_path, program: bool = False, training: dict | None = TRAINED):
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32}})
    torch.manual_seed(0)
    model = build_model(cfg, "finetune")
    calibration = Calibration(a=1.3, b=-0.2, threshold=0.41, rule="youden", calibrated=True, n_val=30)
    evaluation = {"sites": {"A": {"auc": 0.91, "auc_ci": [0.8, 0.97], "acc": 0.85, "sensitivity": 0.8,
                                  "specificity": 0.9, "n_test": 24},
                            "B": {"suppressed": 1, "n_test": 0}},
                  "pooled": {"auc": 0.9, "auc_ci": [0.81, 0.96], "n_test": 24}}
    return cfg, model, export_model(tmp_path / "model", cfg, model.state_dict(), calibration, "run-1",
                                    training=training, evaluation=evaluation, program=program)


def _batch(n: int = 3):
    return {"mri": torch.randn(n, 1, 32, 32, 32), "pet": torch.randn(n, 1, 32, 32, 32),
            "mri_present": torch.ones(n, dtype=torch.bool), "pet_present": torch.tensor([True, False, True][:n])}


def test_exported_model_loads_without_the_run(tmp_path):
    """The folder: weights, a torch.export program that scores like cmvim's model without cmvim's
    code (any batch size, a visit without PET), config.json with the input specification, a model
    card, and checksums `sha256sum -c` verifies."""
    cfg, model, folder = _tiny(tmp_path, program=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "SHA256SUMS", "config.json", "model.pt2",
                                                        "model.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["schema_version"] == 3 and meta["labels"] == ["CN", "AD"] and meta["decision"]["threshold"] == 0.41
    assert meta["run"]["model"]["img_size"] == 32 and meta["run"]["preprocess"]["shape"] == 32
    assert "not for clinical diagnosis" in meta["intended_use"]
    assert set(meta["inputs"]["batch"]) == {"mri", "pet", "mri_present", "pet_present"}
    assert meta["program"]["max_abs_logit_difference"] <= 1e-5
    assert (folder / "model.safetensors").read_bytes()[8:9] == b"{"             # a safetensors header, not a pickle
    loaded = load_model(folder)
    assert loaded.calibration.a == 1.3 and loaded.calibration.threshold == 0.41
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    batch = _batch()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(batch), model(batch))
        program = torch.export.load(str(folder / "model.pt2")).module()
        for n in (1, 3):
            small = {k: v[:n] for k, v in batch.items()}
            assert (program(small) - model(small)).abs().max() <= 1e-5
    checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.count(": OK") == 4, checked.stdout + checked.stderr
    card = (folder / "README.md").read_text()
    for needed in ("**Not for clinical diagnosis.**", "fine-tuning 2 of 2", "A (20 visits), B (18 visits)",
                   "| A ", "0.910", "0.800-0.970", "suppressed by the site's min_cell_count", "| pooled ",
                   "threshold 0.410 on the Platt-calibrated P(AD)", "torch.export.load('model.pt2')",
                   "sha256sum -c SHA256SUMS", "## Known limits"):
        assert needed in card, needed
    (folder / "model.pt2").write_bytes(b"swapped")
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True).returncode != 0


def test_a_cn_vs_mci_model_says_so(tmp_path):
    cfg = run_config({"model": {"preset": "tiny", "positive": "MCI"}, "preprocess": {"spatial": "none", "shape": 32}})
    folder = export_model(tmp_path / "model", cfg, build_model(cfg, "finetune").state_dict(),
                          Calibration(a=1.0, b=0.0, threshold=0.5, rule="youden", calibrated=True, n_val=30), "run-1",
                          training=TRAINED, evaluation={"sites": {}, "pooled": {}}, program=False)
    meta = json.loads((folder / "config.json").read_text())
    assert (meta["task"], meta["labels"], meta["positive_label"]) == ("MCI vs CN", ["CN", "MCI"], "MCI")
    assert meta["intended_use"].startswith("research: MCI vs CN classification")
    assert "P(MCI) = softmax(logits)[:, -1]" in meta["inputs"]["output"]
    assert "Platt-calibrated P(MCI)" in (folder / "README.md").read_text()
    loaded = load_model(folder)
    assert loaded.labels == ["CN", "MCI"] and loaded.cfg.model.task == "MCI vs CN"


def test_an_untrained_model_is_never_used(tmp_path, capsys):
    """A model whose config.json does not say fine-tuning aggregated an update is refused by
    load_model and predict, with why; predict writes nothing."""
    site = tmp_path / "A"
    site.mkdir()
    for training in (None, {**TRAINED, "finetune_rounds_aggregated": 0}):
        _, _, folder = _tiny(tmp_path, training=training)
        with pytest.raises(ModelFileError, match="does not say fine-tuning trained it"):
            load_model(folder)
        code = client_main(["predict", "--model", str(folder), "--data", str(site), "--out", str(tmp_path / "s.csv")])
        printed = capsys.readouterr().out
        assert code == 1 and "FATAL" in printed and "untrained" in printed and not (tmp_path / "s.csv").exists()


def test_fixed_threshold_with_platt_calibrates_and_keeps_one_half():
    labels, probabilities = _validation(2_000, slope=1.5, intercept=-1.0)
    calibration = fit_calibration(*logit_histograms(labels, probabilities), "fixed", platt=True)
    assert calibration.calibrated and calibration.threshold == 0.5 and calibration.rule == "fixed"
    assert calibration.a == pytest.approx(1.5, rel=0.15) and calibration.b == pytest.approx(-1.0, abs=0.2)
    uncalibrated = fit_calibration(*logit_histograms(labels, probabilities), "fixed", platt=False)
    assert not uncalibrated.calibrated and uncalibrated.threshold == 0.5


def test_a_damaged_or_foreign_model_folder_is_named(tmp_path):
    _, _, folder = _tiny(tmp_path)
    with pytest.raises(ModelFileError, match="config.json: not found"):
        load_model(tmp_path / "nowhere")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF                                                      # one flipped byte in a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256 is not the one in config.json"):
        load_model(folder)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "files": {}}))      # no file digest: the tensors' own
    with pytest.raises(ModelFileError, match="do not match the fingerprint"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(ModelFileError, match="schema_version 99"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not readable JSON"):
        load_model(folder)


def test_predict_refuses_a_missing_model(tmp_path, capsys):
    site = tmp_path / "A"
    site.mkdir()
    code = client_main(["predict", "--model", str(tmp_path / "none"), "--data", str(site), "--out",
                        str(tmp_path / "s.csv")])
    assert code == 1 and "FATAL" in capsys.readouterr().out and not (tmp_path / "s.csv").exists()


def _read(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_predict_reproduces_the_runs_test_metrics_from_the_exported_model(easy_cohort, tmp_path, capsys):
    """A real 3-site simulation with validation splits: the threshold and calibration come from the
    sites' validation histograms; predict, from model/ alone, gives every site's test AUC,
    accuracy, sensitivity and specificity that the run reported, and the site's own scores."""
    from test_federated import run_sim, tiny_config
    cohort = tmp_path / "cohort"
    shutil.copytree(easy_cohort, cohort)
    cfg = tiny_config(cohort, split_fractions=[0.5, 0.25, 0.25], pretrain={"rounds": 1},
                      finetune={"rounds": 4}, evaluation={"every_round": False, "bootstrap": 50})
    out = tmp_path / "run"
    proc = run_sim(tmp_path, cfg, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== calibrate:" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    decision = metrics["model"]["decision"]
    assert decision["rule"] == "youden" and decision["n_val"] >= 20 and decision["calibrated"]
    assert metrics["model"]["path"] == "model"
    # the model says how it was trained and what it scored; its card and checksums are beside it
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["training"]["finetune_rounds_aggregated"] == 4 and meta["training"]["finetune_sites"] == ["A", "B", "C"]
    assert meta["training"] == metrics["model"]["training"]
    assert meta["evaluation"]["sites"] == metrics["sites"] and meta["evaluation"]["pooled"]["auc_ci"][0] is not None
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out / "model", capture_output=True).returncode == 0
    assert "fine-tuning 4 of 4" in (out / "model" / "README.md").read_text()
    assert f"threshold {decision['threshold']:.3f}" in (out / "summary.md").read_text()
    # a training subject's scan damaged after the run: predict names its row and scores the rest
    entries = read_manifest(cohort / "A").entries
    splits = assign_splits(entries, cfg["seed"], tuple(cfg["split_fractions"]))
    damaged = next(e for e in entries if splits[e.subject_id] == "train")
    damaged.mri.write_bytes(b"not a nifti")
    capsys.readouterr()
    for site in "ABC":
        scores_csv = tmp_path / f"scores_{site}.csv"
        code = client_main(["predict", "--model", str(out / "model"), "--data", str(cohort / site),
                            "--out", str(scores_csv)])
        printed = capsys.readouterr().out
        assert code == 0, printed
        rows = _read(scores_csv)
        manifest_rows = len((cohort / site / "manifest.csv").read_text().splitlines()) - 1
        if site == "A":
            assert "Problems (1;" in printed and damaged.subject_id in printed
            assert len(rows) == manifest_rows - 1 and damaged.subject_id not in {r["subject_id"] for r in rows}
        else:
            assert len(rows) == manifest_rows
        test = [r for r in rows if r["split"] == "test" and r["label"] in ("CN", "AD")]
        labels = np.array([r["label"] == "AD" for r in test], dtype=int)
        scores = np.array([float(r["score"]) for r in test])
        reported = metrics["sites"][site]
        assert len(test) == reported["n_test"]
        assert roc_auc_score(labels, scores) == pytest.approx(reported["auc"], abs=1e-4)
        predicted = np.array([r["predicted"] == "AD" for r in test])
        assert np.array_equal(predicted, scores >= decision["threshold"])
        assert (predicted == labels.astype(bool)).mean() == pytest.approx(reported["acc"], abs=1e-9)
        assert predicted[labels == 1].mean() == pytest.approx(reported["sensitivity"], abs=1e-9)
        assert (~predicted[labels == 0]).mean() == pytest.approx(reported["specificity"], abs=1e-9)
        assert {r["predicted"] for r in rows} <= {"CN", "AD"}
        assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
        with_pet = {e.subject_id for e in read_manifest(cohort / site).entries if e.pet is not None}
        assert all(r["inputs"] == ("mri+pet" if r["subject_id"] in with_pet else "mri") for r in rows)
        provenance = json.loads(scores_csv.with_suffix(".json").read_text())
        assert provenance["model"]["files"]["model.safetensors"] == meta["files"]["model.safetensors"]
        assert provenance["decision"]["threshold"] == decision["threshold"] and provenance["rows"] == len(rows)
        assert sum(provenance["inputs"].values()) == len(rows)
        assert not any(r["subject_id"] in json.dumps(provenance) for r in rows)         # no subject ids
    # the scores themselves: the site's own evaluation path (SiteTask, the run's final weights from
    # its checkpoint) gives each test subject the probability predict wrote
    from cmvim import engine
    from cmvim.data import SiteData
    from cmvim.server.checkpoints import Checkpoint
    from cmvim.site_task import SiteTask
    run_cfg = run_config(yaml.safe_load((out / "config.yaml").read_text()))
    arrays = Checkpoint.load(out / "checkpoints" / "evaluate_round000.pt").arrays
    site = SiteData.load(cohort / "B", run_cfg.preprocess, seed=run_cfg.seed, use_reports=run_cfg.use_reports,
                         split_fractions=run_cfg.split_fractions)
    task = SiteTask(run_cfg, [site], "B")
    dataset = task.views.dataset(["test"], True, augment=False)
    _, probabilities = engine.predict(task._model("finetune", arrays, {}), task.views.loader(dataset, 4, False, 0))
    written = {r["subject_id"]: float(r["model_probability"]) for r in _read(tmp_path / "scores_B.csv")}
    assert len(dataset.records) == metrics["sites"]["B"]["n_test"]
    for record, probability in zip(dataset.records, probabilities[:, -1]):
        assert written[record.entry.subject_id] == pytest.approx(probability, abs=2e-6)
