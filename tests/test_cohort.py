"""Synthetic cohorts: deterministic, loadable through the data layer, with measurable disease and site effects."""
import filecmp
import json

import numpy as np
import pytest

from cmvim.data import SiteData, load_volume
from cmvim.run_config import PreprocessConfig
from cmvim.simulations.cohort import CohortConfig, cached_cohort, generate_cohort
from cmvim.simulations.cohort_cli import main as cohort_main

pytest.importorskip("nilearn")

SMALL = CohortConfig(sites=2, subjects=16, shape=32, seed=0, effect_scale=1.5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return out, generate_cohort(out, SMALL)


def test_every_site_loads_through_the_data_layer(cohort, tmp_path):
    out, summary = cohort
    assert [s.name for s in summary.sites] == ["A", "B"]
    assert summary.sites[1].dicom and not summary.sites[0].dicom        # B exports DICOM, as a PACS would
    for site in summary.sites:
        data = SiteData.load(out / site.name, PreprocessConfig(spatial="none", shape=32, voxel_size=None), cache_dir=tmp_path / site.name)
        assert data.summary.skipped == [] and data.summary.warnings == []
        counts = data.counts()
        assert counts["visits"] == 16 and counts["with_pet"] == summary.counts[site.name]["with_pet"]
        labeled = sum(summary.counts[site.name][c] for c in ("CN", "MCI", "AD"))
        assert labeled + counts["labels"].get("unlabeled", 0) == 16
    first = next((out / "B" / "subjects").iterdir())
    volume, affine = load_volume(first / "t1_dicom")
    assert volume.shape == (32, 32, 32) and np.allclose(np.diag(affine)[:3], 6.25)


def test_disease_effects_are_measurable_on_the_written_files(cohort):
    _, summary = cohort
    hippocampus, pet = summary.effects["hippocampal_tissue_ml"], summary.effects["pcc_suvr"]
    assert hippocampus["AD_vs_CN_pct"] < -5 and hippocampus["AD_vs_CN_d"] < -0.8
    assert pet["AD_vs_CN_pct"] < -12 and pet["AD_vs_CN_d"] < -2
    assert pet["mean_AD"] < pet["mean_MCI"] < pet["mean_CN"]              # MCI in between


def test_sites_differ_in_scanner_and_population(cohort):
    _, summary = cohort
    a, b = summary.sites
    assert a.intensity_scale != b.intensity_scale and a.prevalence != b.prevalence
    wm = summary.effects["site_wm_intensity"]
    assert abs(wm["A"] / wm["B"] - a.intensity_scale / b.intensity_scale) < 0.15   # measured, not just declared


def test_reports_describe_findings_without_naming_the_diagnosis(cohort):
    out, _ = cohort
    texts = [p.read_text() for p in out.glob("*/subjects/*/report.txt")]
    assert len(texts) == 32 and len(set(texts)) > 25
    assert not any("Alzheimer" in t or "mild cognitive impairment" in t for t in texts)


def test_deterministic_from_the_seed(tmp_path):
    cfg = CohortConfig(sites=1, subjects=3, shape=32, seed=0)
    generate_cohort(tmp_path / "first", cfg, measure=False, workers=1)
    generate_cohort(tmp_path / "second", cfg, measure=False, workers=1)
    generate_cohort(tmp_path / "other", CohortConfig(sites=1, subjects=3, shape=32, seed=1), measure=False, workers=1)
    manifest = (tmp_path / "first" / "A" / "manifest.csv").read_text()
    assert (tmp_path / "second" / "A" / "manifest.csv").read_text() == manifest
    assert (tmp_path / "other" / "A" / "manifest.csv").read_text() != manifest
    for row in manifest.splitlines()[1:]:
        for path in row.split(",")[1:4]:
            if path.endswith(".nii.gz"):
                np.testing.assert_array_equal(load_volume(tmp_path / "first" / "A" / path)[0],
                                              load_volume(tmp_path / "second" / "A" / path)[0])
            elif path.endswith(".txt"):
                assert filecmp.cmp(tmp_path / "first" / "A" / path, tmp_path / "second" / "A" / path, shallow=False)


def test_cached_cohort_is_built_once(tmp_path):
    cfg = CohortConfig(sites=1, subjects=2, shape=32, seed=3)
    first = cached_cohort(cfg, root=tmp_path)
    stamp = (first / "cohort.json").stat().st_mtime_ns
    assert cached_cohort(cfg, root=tmp_path) == first
    assert (first / "cohort.json").stat().st_mtime_ns == stamp
    assert json.loads((first / "cohort.json").read_text())["config"]["seed"] == 3


def test_cli_writes_the_cohort_and_refuses_a_used_folder(tmp_path, capsys):
    out = tmp_path / "c"
    assert cohort_main(["--sites", "1", "--subjects", "3", "--shape", "32", "--out", str(out), "--seed", "4"]) == 0
    assert (out / "A" / "manifest.csv").exists()
    assert "hippocampal_tissue_ml" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cohort_main(["--sites", "1", "--subjects", "3", "--shape", "32", "--out", str(out)])


def test_cli_writes_scanner_space_with_its_known_answers_and_template_keys_stay(tmp_path, capsys):
    """--space scanner: the same manifest rows as template space, scans on scanner grids, and
    poses.json with every scan's template transform; a template cohort's cache key is the one it
    had before the option existed (cohorts cached then are still found)."""
    import hashlib
    from dataclasses import asdict
    out = tmp_path / "scanner"
    assert cohort_main(["--sites", "1", "--subjects", "2", "--shape", "32", "--out", str(out), "--seed", "4",
                        "--space", "scanner"]) == 0
    assert cohort_main(["--sites", "1", "--subjects", "2", "--shape", "32", "--out", str(tmp_path / "t"),
                        "--seed", "4"]) == 0
    rows = (out / "A" / "manifest.csv").read_text().splitlines()
    assert rows == (tmp_path / "t" / "A" / "manifest.csv").read_text().splitlines()     # same subjects, paths
    poses = json.loads((out / "poses.json").read_text())["A"]
    first = rows[1].split(",")[1]
    t1, affine = load_volume(out / "A" / first)
    assert t1.shape != (32, 32, 32) and not np.allclose(affine, load_volume(tmp_path / "t" / "A" / first)[1])
    assert np.array(poses[first]["template_to_mri"]).shape == (4, 4)
    spec = asdict(CohortConfig(sites=1, subjects=2, shape=32, seed=4))
    del spec["format"], spec["space"], spec["subtypes"], spec["visits"]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:12]
    assert cached_cohort(CohortConfig(sites=1, subjects=2, shape=32, seed=4), root=tmp_path / "c").name == f"cohort-{key}"


def test_ad_subtypes_move_the_disease_between_regions_and_keep_the_same_subjects(tmp_path):
    """The same AD subject (same draws) as each subtype: limbic-predominant loses the most hippocampal
    tissue and keeps the most PCC uptake, hippocampal-sparing the reverse. A cohort with subtypes
    holds the same subjects, reports and control images as one without."""
    from cmvim.simulations.anatomy import load_anatomy
    from cmvim.simulations.cohort import Subject, site_profiles, synthesize
    from cmvim.simulations.measure import image_features
    anatomy = load_anatomy(32)
    site = site_profiles(CohortConfig(sites=1, shape=32), np.random.default_rng(0))[0]
    measured = {}
    for subtype in ("typical", "limbic", "hippocampal_sparing"):
        subject = Subject("X", "AD", 75.0, "F", severity=1.5, has_pet=True, labeled=True, subtype=subtype)
        images = synthesize(subject, site, anatomy, np.random.default_rng(7), effect_scale=1.0)
        measured[subtype] = image_features(images.t1, images.pet, anatomy)
    hippocampus = {k: v["hippocampal_tissue_ml"] for k, v in measured.items()}
    pcc = {k: v["pcc_suvr"] for k, v in measured.items()}
    assert hippocampus["limbic"] < hippocampus["typical"] < hippocampus["hippocampal_sparing"]
    assert pcc["hippocampal_sparing"] < pcc["typical"] < pcc["limbic"]

    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    generate_cohort(plain, CohortConfig(sites=1, subjects=6, shape=32, seed=2), measure=False, workers=1)
    generate_cohort(mixed, CohortConfig(sites=1, subjects=6, shape=32, seed=2, subtypes=True), measure=False, workers=1)
    manifest = (plain / "A" / "manifest.csv").read_text()
    assert (mixed / "A" / "manifest.csv").read_text() == manifest
    differ = {}
    for row in manifest.splitlines()[1:]:
        subject, mri, _, report, label = row.split(",")[:5]
        assert (plain / "A" / report).read_text() == (mixed / "A" / report).read_text()
        same = np.array_equal(load_volume(plain / "A" / mri)[0], load_volume(mixed / "A" / mri)[0])
        if label == "CN":
            assert same, f"a control's scan changed with subtypes on ({subject})"
        differ[subject] = not same
    assert any(differ.values())                       # some AD/MCI subject is not typical


def test_several_visits_a_year_apart_progress_and_load_as_one_subject(tmp_path):
    """visits=2: a visit column, each subject's second visit a year older with the disease progressed
    (every subject loses hippocampal tissue with age; AD subjects lose more), loaded as one subject
    whose visits share a split. BIDS sessions are not written: refused by name."""
    from cmvim.simulations.anatomy import load_anatomy
    from cmvim.simulations.measure import subject_features
    out = tmp_path / "visits"
    generate_cohort(out, CohortConfig(sites=1, subjects=8, shape=32, seed=1, visits=2), measure=False, workers=1)
    rows = [r.split(",") for r in (out / "A" / "manifest.csv").read_text().splitlines()]
    assert rows[0][:3] == ["subject_id", "visit", "mri"] and len(rows) == 1 + 16
    by_subject: dict = {}
    for row in rows[1:]:
        by_subject.setdefault(row[0], []).append(row)
    anatomy = load_anatomy(32)
    loss: dict = {"CN": [], "AD": [], "MCI": []}
    for first, second in by_subject.values():
        assert (first[1], second[1]) == ("1", "2") and "visit-1/" in first[2] and "visit-2/" in second[2]
        assert first[5] == second[5] and 0 <= int(second[6]) - int(first[6]) <= 2    # one diagnosis, a year older
        tissue = [subject_features(out / "A", {"mri": v[2], "pet": v[3]}, anatomy)["hippocampal_tissue_ml"]
                  for v in (first, second)]
        assert tissue[1] < tissue[0]
        if first[5]:
            loss[first[5]].append(tissue[0] - tissue[1])
    assert loss["AD"] and loss["CN"] and min(loss["AD"]) > max(loss["CN"])
    data = SiteData.load(out / "A", PreprocessConfig(spatial="none", shape=32, voxel_size=None),
                         cache_dir=tmp_path / "cache")
    counts = data.counts()
    assert counts["subjects"] == 8 and counts["visits"] == 16 and data.summary.skipped == []
    splits: dict = {}
    for record in data.records:
        splits.setdefault(record.entry.subject_id, set()).add(record.split)
    assert all(len(s) == 1 for s in splits.values())           # a subject's visits share its split
    with pytest.raises(ValueError, match="visit"):
        CohortConfig(visits=2, format="bids")
