"""Scans as scanners write them, registered at the site (`preprocess.spatial: template`), each step
against a known answer: the generator's true transforms (poses.json), transforms applied by hand,
the same subjects written in template space; failed registrations as bad rows naming the scan;
the transforms' cache; predict applying the model's recorded preprocessing."""
import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cmvim.data import DataError, SiteData, Volume, load_volume
from cmvim.data import registration as reg
from cmvim.data.cache import content_digest, default_cache_dir, transform_key
from cmvim.run_config import PreprocessConfig, RegistrationConfig, run_config
from cmvim.simulations.cohort import POSES_FILE, CohortConfig, generate_cohort

CFG = PreprocessConfig(shape=48, voxel_size=4.0, normalize={"mri": "zscore", "pet": "suvr"})
SCANNER = CohortConfig(sites=2, subjects=3, shape=64, seed=5, pet_missing=0.0, space="scanner")


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """The same subjects twice: in scanner space (site A NIfTI, site B DICOM) and in template space."""
    root = tmp_path_factory.mktemp("cohorts")
    generate_cohort(root / "scanner", SCANNER, measure=False)
    generate_cohort(root / "template", CohortConfig(**{**SCANNER.__dict__, "space": "template"}), measure=False)
    return root


@pytest.fixture(scope="module")
def loaded(cohorts, tmp_path_factory):
    """Both scanner-space sites preprocessed with the default pipeline (registration)."""
    cache = tmp_path_factory.mktemp("cache")
    return {site: SiteData.load(cohorts / "scanner" / site, CFG, cache_dir=cache / site) for site in "AB"}


def brain_points(step: int = 3) -> np.ndarray:
    template = reg.load_template()
    return nib.affines.apply_affine(template.affine, np.argwhere(template.brain > 0.5)[::step])


def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    points = brain_points()
    return float(np.linalg.norm(nib.affines.apply_affine(a, points) - nib.affines.apply_affine(b, points), axis=1).mean())


def rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle of the rotation between two affines' rotational parts."""
    def rot(m):
        u, _, vt = np.linalg.svd(m[:3, :3])
        return u @ vt
    relative = rot(a) @ rot(b).T
    return float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))


def transforms_of(site: SiteData, record) -> dict:
    key = transform_key([record.entry.mri, record.entry.pet], reg.transform_fingerprint(site.cfg.registration))
    return site.cache.load_transforms(key)


# -- the generator's scanner space ------------------------------------------------------------------

def test_scanner_space_is_what_scanners_write_and_its_known_answers_hold(cohorts):
    """Skull and neck around the brain, heads posed and far from the world origin, scanner voxel
    orders and anisotropic voxels, the PET on its own grid; the true transform of poses.json brings
    every scan back onto the same subject written in template space."""
    poses = json.loads((cohorts / "scanner" / POSES_FILE).read_text())
    warps = json.loads((cohorts / "template" / POSES_FILE).read_text())      # template space: each subject's own warp
    profiles = {s["name"]: s["scanner"] for s in json.loads((cohorts / "scanner" / "cohort.json").read_text())["sites"]}
    template = reg.load_template()
    inside = template.brain > 0.5
    outside_mm = ndimage.distance_transform_edt(~inside, sampling=2.0)
    shell = (outside_mm > 4) & (outside_mm < 14)                           # where skull and scalp lie
    for site in "AB":
        template_rows = (cohorts / "template" / site / "manifest.csv").read_text().splitlines()[1:]
        scanner_rows = (cohorts / "scanner" / site / "manifest.csv").read_text().splitlines()[1:]
        for t_row, s_row in zip(template_rows, scanner_rows):             # the same subjects, labels, ages, sexes
            t_fields, s_fields = t_row.split(","), s_row.split(",")
            assert t_fields[0] == s_fields[0] and t_fields[4:] == s_fields[4:]
        references = [reg.onto_grid(Volume(*load_volume(cohorts / "template" / site / row.split(",")[1])),
                                    np.array(warps[site][row.split(",")[1]]["template_to_mri"]), template.affine,
                                    template.t1.shape).data for row in template_rows]
        for index, s_row in enumerate(scanner_rows):
            s_mri = s_row.split(",")[1]
            t1, affine = load_volume(cohorts / "scanner" / site / s_mri)
            truth = poses[site][s_mri]
            to_mri = np.array(truth["template_to_mri"])
            assert "".join(nib.aff2axcodes(affine)) == profiles[site]["mri_axes"]
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
            assert spacing[2] > 1.05 * spacing[0]                                # anisotropic: thicker slices
            assert np.linalg.norm(nib.affines.apply_affine(to_mri, reg.TEMPLATE_CENTRE)) > 25   # origin far from the brain
            # the skull: bright tissue just outside the brain, none of it in template space
            back = reg.onto_grid(Volume(t1, affine), to_mri, template.affine, template.t1.shape).data
            ref = references[index]
            assert np.corrcoef(back[inside], ref[inside])[0, 1] > 0.75
            brightest = np.percentile(back[inside], 99)
            assert np.percentile(back[shell], 90) > 0.6 * brightest              # skull and scalp are in the scan
            assert np.percentile(ref[shell], 90) < 0.3 * np.percentile(ref[inside], 99)   # and not in template space
            pet, pet_affine = load_volume(cohorts / "scanner" / site / truth["pet"])
            assert not np.allclose(pet_affine, affine)                             # its own grid
            assert rotation_deg(np.array(truth["template_to_pet"]), to_mri) > 0.5   # posed apart from its T1


# -- registration, step by step --------------------------------------------------------------------

def test_a_scan_moved_by_a_known_transform_comes_back_within_2_mm_and_2_degrees():
    """The template's own T1, posed by a known rigid + scaling transform onto a scanner grid (LPS,
    anisotropic voxels, origin 80 mm away), is registered back to it."""
    from cmvim.simulations.scanner import grid_affine, rigid, rotation
    template = reg.load_template()
    pose = rigid(rotation(np.deg2rad([12.0, -9.0, 14.0])), reg.TEMPLATE_CENTRE, np.array([60.0, -40.0, 35.0]))
    pose[:3, :3] *= 1.06                                               # a head 6 % larger than the template's
    affine, shape = grid_affine((2.2, 2.2, 2.8), (240.0, 240.0, 230.0), "LPS", np.array([70.0, -30.0, 25.0]))
    scan = reg.onto_grid(Volume(template.t1 * 1000, template.affine), np.linalg.inv(pose), affine, shape)
    found = reg.register_t1(reg.bias_corrected(scan))
    assert mean_distance(found, pose) < 2.0
    assert rotation_deg(found, pose) < 2.0


def test_a_head_turned_30_degrees_is_found_from_a_tilted_start(monkeypatch):
    """Beyond the usual starts' reach (the template posed 30 degrees about left-right): the first
    pass ends far off and fails the similarity bar; the tilted starts bring it back within 2 mm."""
    from cmvim.simulations.scanner import grid_affine, rigid, rotation
    template = reg.load_template()
    pose = rigid(rotation(np.deg2rad([30.0, 0.0, 0.0])), reg.TEMPLATE_CENTRE, np.array([30.0, -20.0, 40.0]))
    affine, shape = grid_affine((2.5, 2.5, 3.0), (240.0, 240.0, 240.0), "LPS", np.array([30.0, -20.0, 40.0]))
    scan = reg.onto_grid(Volume(template.t1 * 1000, template.affine), np.linalg.inv(pose), affine, shape)
    found = reg.register_t1(scan)
    assert mean_distance(found, pose) < 2.0 and reg.t1_similarity(scan, found) > 0.9
    bar = reg.RETRY_BELOW
    monkeypatch.setattr(reg, "RETRY_BELOW", -1.0)                         # the first pass alone
    first = reg.register_t1(scan)
    assert mean_distance(first, pose) > 10.0 and reg.t1_similarity(scan, first) < bar   # so the retry runs


def test_registered_t1s_and_pets_land_on_the_known_transforms(cohorts, loaded):
    """Every scanner-space visit (NIfTI site A, DICOM series site B: LPS, the reader's own path)
    against the generator's truth: T1 and PET within 2 mm on average over the brain."""
    poses = json.loads((cohorts / "scanner" / POSES_FILE).read_text())
    for name, site in loaded.items():
        assert site.summary.skipped == [] and len(site.records) == 3
        for record in site.records:
            truth = poses[name][str(Path(record.entry.mri).relative_to(site.site_dir))]
            found = transforms_of(site, record)
            assert mean_distance(found["mri"], np.array(truth["template_to_mri"])) < 2.0
            assert rotation_deg(found["mri"], np.array(truth["template_to_mri"])) < 2.0
            assert mean_distance(found["pet"], np.array(truth["template_to_pet"])) < 2.5
            assert record.qc["t1_similarity"] > 0.8 and record.qc["pet_similarity"] > 0.6
    assert Path(loaded["B"].records[0].entry.mri).is_dir()                  # site B's scans are DICOM series


def test_pet_coregistration_recovers_a_known_pose(cohorts, loaded):
    """The PET's pose relative to its T1 (up to 10 degrees, 20 mm apart, another grid and world
    origin): register_pet finds it within 2 mm, from the T1's registration alone."""
    poses = json.loads((cohorts / "scanner" / POSES_FILE).read_text())
    site = loaded["A"]
    for record in site.records:
        truth = poses["A"][str(Path(record.entry.mri).relative_to(site.site_dir))]
        to_mri, to_pet = np.array(truth["template_to_mri"]), np.array(truth["template_to_pet"])
        t1 = reg.bias_corrected(Volume(*load_volume(record.entry.mri)))
        pet = Volume(*load_volume(record.entry.pet))
        found = reg.register_pet(pet, t1, to_mri)                            # T1 world -> PET world
        assert mean_distance(found @ to_mri, to_pet) < 2.0


def test_the_registered_scans_are_the_template_space_subjects(cohorts, loaded, tmp_path):
    """After registration and brain extraction, a scanner-space visit's model input matches the
    same subject written in template space, preprocessed by the same pipeline (template space needs
    no pose: its registration is a near-identity)."""
    template_site = SiteData.load(cohorts / "template" / "A", CFG, cache_dir=tmp_path / "A")
    mask = reg.brain_mask(CFG) > 0.5
    for scanner_record, template_record in zip(loaded["A"].records, template_site.records):
        scanned = loaded["A"].cache.load(scanner_record.key)
        reference = template_site.cache.load(template_record.key)
        for modality in ("mri", "pet"):
            r = np.corrcoef(scanned[modality][mask], reference[modality][mask])[0, 1]
            assert r > 0.75, (modality, r)         # noise, bias and resolution differ; the anatomy does not


def test_one_interpolation_through_the_composed_transform(monkeypatch):
    """onto_grid resamples a native scan once: through (template -> scan) composed, the values at
    the grid's voxels are the trilinear samples of the scan at the mapped points."""
    rng = np.random.default_rng(0)
    data = rng.random((20, 22, 18)).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-30.0, -33.0, -27.0]
    shift = np.eye(4)
    shift[:3, 3] = [3.0, 0.0, -3.0]                                     # one voxel along x and z
    calls = []
    real = reg.resample
    monkeypatch.setattr(reg, "resample", lambda *a, **k: calls.append(1) or real(*a, **k))
    grid = np.diag([3.0, 3.0, 3.0, 1.0])
    grid[:3, 3] = affine[:3, 3]
    out = reg.onto_grid(Volume(data, affine), shift, grid, (10, 10, 10)).data
    assert len(calls) == 1
    np.testing.assert_allclose(out[:, :, 1:9], data[1:11, :10, 0:8], atol=1e-5)


# -- quality control: failures are bad rows that say why -------------------------------------------

def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return str(path.relative_to(path.parent.parent))


def test_failed_registrations_are_bad_rows_naming_the_scan_and_check_shows_them(cohorts, tmp_path, capsys):
    """A T2 labelled T1, a knee, a PET whose header has it upside down, a T1 whose header's voxel
    sizes are wrong: each its visit's bad row with the measure and its bound; the good visit loads;
    check prints the registration table, and --qc writes the picture and the per-visit table."""
    source = cohorts / "scanner" / "A"
    rows = (source / "manifest.csv").read_text().splitlines()
    site = tmp_path / "site"
    shutil.copytree(source / "subjects", site / "subjects")
    first = rows[1].split(",")
    t1, affine = load_volume(source / first[1])
    pet, pet_affine = load_volume(source / first[2])
    head = t1 > 0.15 * np.percentile(t1, 99)
    knee = np.zeros((80, 80, 80), np.float32)
    zz, yy, xx = np.meshgrid(*[np.arange(80)] * 3, indexing="ij")
    radius = np.hypot(xx - 40, yy - 40)
    knee[radius < 30], knee[radius < 12] = 400.0, 700.0
    wrong_size = affine.copy()
    wrong_size[:3, :3] *= 0.6
    files = {
        "t2": _write(site / "bad" / "t2.nii.gz", np.where(head, t1.max() * 0.9 - t1, t1), affine),
        "knee": _write(site / "bad" / "knee.nii.gz", knee + 10, np.diag([3.0, 3.0, 3.0, 1.0])),
        "pet_flipped": _write(site / "bad" / "pet_flipped.nii.gz", pet[:, ::-1], pet_affine),
        "size": _write(site / "bad" / "t1_size.nii.gz", t1, wrong_size),
    }
    manifest = [rows[0], rows[1],
                f"T2,{files['t2']},,,CN,70,F", f"KNEE,{files['knee']},,,CN,70,F",
                f"FLIP,{first[1]},{files['pet_flipped']},,AD,70,F", f"SIZE,{files['size']},,,AD,70,F"]
    (site / "manifest.csv").write_text("\n".join(manifest) + "\n")
    data = SiteData.load(site, CFG, cache_dir=tmp_path / "cache")
    assert [r.entry.subject_id for r in data.records] == [first[0]]
    problems = {p.subject: p for p in data.summary.skipped}
    assert set(problems) == {"T2", "KNEE", "FLIP", "SIZE"}
    assert all(p.kind == "registration failed" for p in problems.values())
    assert problems["T2"].column == "mri" and "correlation with the template T1" in problems["T2"].problem
    assert "-0." in problems["T2"].problem                                   # a T2: the contrast is inverted
    assert problems["KNEE"].column == "mri" and problems["KNEE"].file.endswith("knee.nii.gz")
    assert problems["FLIP"].column == "pet" and problems["FLIP"].file.endswith("pet_flipped.nii.gz")
    assert "grey matter" in problems["FLIP"].problem
    assert problems["SIZE"].column == "mri"
    assert "FLIP" not in str(problems["FLIP"].public_message())              # what may leave the site: no id

    from cmvim.client.cli import main as client_main
    config = tmp_path / "run.yaml"
    config.write_text("model: small\npreprocess: {shape: 48, voxel_size: 4.0, normalize: {mri: zscore, pet: suvr}}\n")
    capsys.readouterr()
    assert client_main(["check", "--data", str(site), "--config", str(config), "--qc", str(tmp_path / "qc")]) == 0
    out = capsys.readouterr().out
    assert "spatial template" in out and "Registration quality" in out
    assert "visits whose registration failed its check: 4" in out
    assert "knee.nii.gz" in out and "T1 registration failed its check" in out
    table = (tmp_path / "qc" / "qc_site.tsv").read_text().splitlines()
    assert len(table) == 6 and sum("failed:" in line for line in table) == 4
    picture = tmp_path / "qc" / "qc_site.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000


def test_outliers_are_flagged_by_robust_z():
    from cmvim.client.qc import VisitQC, outliers
    visits = [VisitQC(i + 2, f"S{i}", "m", None, {"t1_similarity": 0.90 + 0.01 * (i % 3), "head_scale_min": 1.0,
                                                   "head_scale_max": 1.0}, "ok") for i in range(9)]
    visits.append(VisitQC(11, "LOW", "m", None, {"t1_similarity": 0.72, "head_scale_min": 1.0, "head_scale_max": 1.3},
                          "ok"))
    flagged = outliers(visits)
    assert list(flagged) == [9] and "t1_similarity 0.72" in flagged[9] and "head_scale_max 1.30" in flagged[9]


# -- the cache: a second run registers nothing -----------------------------------------------------

def test_transforms_are_cached_by_content_and_a_second_run_registers_nothing(cohorts, tmp_path, monkeypatch):
    source = cohorts / "scanner" / "A"
    site = tmp_path / "A"
    shutil.copytree(source, site)
    calls = {"t1": 0, "pet": 0}
    real_t1, real_pet = reg.register_t1, reg.register_pet
    monkeypatch.setattr(reg, "register_t1", lambda *a: calls.__setitem__("t1", calls["t1"] + 1) or real_t1(*a))
    monkeypatch.setattr(reg, "register_pet", lambda *a: calls.__setitem__("pet", calls["pet"] + 1) or real_pet(*a))
    first = SiteData.load(site, CFG, cache_dir=tmp_path / "cache")
    assert calls == {"t1": 3, "pet": 3}
    again = SiteData.load(site, CFG, cache_dir=tmp_path / "cache")
    assert calls == {"t1": 3, "pet": 3} and again.summary.cache_hits == 3
    for cached, computed in zip(again.records, first.records):
        assert cached.qc == pytest.approx(computed.qc, abs=1e-6)
    # another model grid and normalisation: new volumes, the same transforms
    other = PreprocessConfig(shape=40, voxel_size=4.5, normalize={"mri": "percentile", "pet": "zscore"})
    SiteData.load(site, other, cache_dir=tmp_path / "cache")
    assert calls == {"t1": 3, "pet": 3}
    # the same bytes moved and renamed: still the same transforms; one changed byte: registered again
    record = first.records[0]
    moved = site / "moved" / "scan.nii.gz"
    moved.parent.mkdir()
    shutil.move(record.entry.mri, moved)
    manifest = (site / "manifest.csv").read_text().replace(str(Path(record.entry.mri).relative_to(site)),
                                                            "moved/scan.nii.gz")
    (site / "manifest.csv").write_text(manifest)
    SiteData.load(site, CFG, cache_dir=tmp_path / "cache")
    assert calls == {"t1": 3, "pet": 3}
    image = nib.load(str(moved))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 1.001, image.affine), str(moved))
    SiteData.load(site, CFG, cache_dir=tmp_path / "cache")
    assert calls == {"t1": 4, "pet": 4}
    # no history: the replaced scan's transforms are pruned
    assert len(list((tmp_path / "cache").glob("tx-*.json"))) == 3


def test_content_digest_reads_bytes_not_names(tmp_path):
    a, b = tmp_path / "a.nii", tmp_path / "b.nii"
    a.write_bytes(b"scan")
    b.write_bytes(b"scan")
    assert content_digest([a, None]) == content_digest([b, None]) != content_digest([a, a])
    b.write_bytes(b"scan!")
    assert content_digest([a, None]) != content_digest([b, None])


# -- configuration, export, predict ----------------------------------------------------------------

def test_spatial_is_checked_and_recorded():
    with pytest.raises(ValueError, match="spatial"):
        PreprocessConfig(spatial="mni")
    with pytest.raises(ValueError, match="head_scale_range"):
        RegistrationConfig(head_scale_range=(1.2, 1.5))
    cfg = run_config({"model": "small", "preprocess": {"shape": 48}})
    assert cfg.preprocess.spatial == "template"                          # the default: scans as scanners write them
    assert PreprocessConfig(spatial="none").fingerprint() != PreprocessConfig().fingerprint()


TRAINED = {"pretrain_rounds": 1, "pretrain_rounds_aggregated": 1, "finetune_rounds": 1, "finetune_rounds_aggregated": 1,
           "finetune_sites": ["A"]}


def test_an_older_model_is_refused_with_the_way_to_export_it_again(tmp_path):
    """Versions 1 and 2 did not record whether fine-tuning trained the model (issue #31)."""
    from cmvim.calibration import Calibration
    from cmvim.portable import ModelFileError, export_model, load_model
    from cmvim.weights import build_model
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32}})
    folder = export_model(tmp_path / "model", cfg, build_model(cfg, "finetune").state_dict(), Calibration(), "run",
                          training=TRAINED, program=False)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["run"]["preprocess"]["spatial"] == "none" and load_model(folder).cfg.preprocess.spatial == "none"
    for version in (1, 2):
        (folder / "config.json").write_text(json.dumps({**meta, "schema_version": version}))
        with pytest.raises(ModelFileError, match="--resume"):
            load_model(folder)


def test_predict_applies_the_preprocessing_recorded_with_the_model(cohorts, tmp_path, capsys):
    """A model trained with spatial template registers every scan it scores; one trained with
    spatial none does not: each scores the arrays its own preprocessing gives."""
    import torch

    from cmvim import engine
    from cmvim.calibration import Calibration
    from cmvim.client.cli import main as client_main
    from cmvim.portable import export_model
    from cmvim.site_task import SiteTask
    from cmvim.weights import build_model
    site = tmp_path / "A"
    shutil.copytree(cohorts / "scanner" / "A", site)
    for spatial in ("template", "none"):
        cfg = run_config({"model": {"preset": "tiny"}, "use_reports": False,
                          "preprocess": {"spatial": spatial, "shape": 32, "voxel_size": 6.0,
                                         "normalize": {"mri": "zscore", "pet": "suvr"}}})
        torch.manual_seed(0)
        model = build_model(cfg, "finetune")
        folder = export_model(tmp_path / f"model-{spatial}", cfg, model.state_dict(), Calibration(), "run",
                              training=TRAINED, program=False)
        cache = tmp_path / f"cache-{spatial}"
        capsys.readouterr()
        assert client_main(["predict", "--model", str(folder), "--data", str(site), "--out",
                            str(tmp_path / f"{spatial}.csv"), "--cache-dir", str(cache)]) == 0
        assert f"spatial {spatial}" in capsys.readouterr().out
        assert bool(list(cache.glob("tx-*.json"))) == (spatial == "template")
        # the arrays predict scored are the model's preprocessing's: loading with its settings finds
        # every one in predict's cache (the cache key holds every preprocessing setting)
        loaded_site = SiteData.load(site, cfg.preprocess, cache_dir=cache, seed=cfg.seed, use_reports=False,
                                    split_fractions=cfg.split_fractions)
        assert loaded_site.summary.cache_hits == len(loaded_site.records) == 3
        task = SiteTask(cfg, [loaded_site], "A")
        dataset = task.views.dataset(["train", "val", "test"], None, augment=False)
        _, probabilities = engine.predict(task._model("finetune", model.state_dict(), {}),
                                          task.views.loader(dataset, 4, False, 0))
        with (tmp_path / f"{spatial}.csv").open() as handle:
            written = {r["subject_id"]: float(r["model_probability"]) for r in csv.DictReader(handle)}
        for record, probability in zip(dataset.records, probabilities[:, -1]):
            assert written[record.entry.subject_id] == pytest.approx(probability, abs=2e-6)


# -- the shipped template ---------------------------------------------------------------------------

def test_the_shipped_template_is_what_the_builder_makes_from_nilearns_files(tmp_path):
    pytest.importorskip("nilearn")
    from cmvim.simulations.anatomy import write_site_templates
    written = write_site_templates(tmp_path)
    shipped = Path(reg.__file__).parent / "templates"
    for name, path in written.items():
        ours, theirs = nib.load(str(path)), nib.load(str(shipped / path.name))
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        np.testing.assert_allclose(ours.affine, theirs.affine)
    template = reg.load_template()
    assert template.t1.shape == (99, 117, 95) and 0.15 < template.brain.mean() < 0.3
    assert (shipped / "README.md").exists()


def test_a_visit_failing_inside_itk_is_a_bad_row(tmp_path):
    """A scan ITK cannot register (too few voxels in the template's mask after the start) is the
    visit's problem, named, not a crash of the load."""
    step = reg.ToTemplate(CFG)
    tiny = Volume(np.random.default_rng(0).random((4, 4, 4)).astype(np.float32) + 1, np.diag([1.0, 1, 1, 1]))
    with pytest.raises(DataError) as info:
        step({"mri": tiny, "files": {"mri": "t.nii.gz"}})
    assert info.value.kind == "registration failed" and info.value.file == "t.nii.gz"


# -- the whole run ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_federated_run_on_scanner_space_registers_at_the_sites_and_learns(tmp_path):
    """cmvim-sim on a scanner-space cohort (skull on, heads posed, PET apart; large effects so the
    tiny model learns in a few rounds) with the default spatial: template: every site registers
    its own scans, the run learns, and the exported model records the preprocessing."""
    from test_federated import run_sim, tiny_config
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, CohortConfig(sites=3, subjects=24, shape=32, seed=2, effect_scale=5.0, pet_missing=0.0,
                                         space="scanner"), measure=False)
    cfg = tiny_config(cohort, preprocess={"spatial": "template", "voxel_size": 6.0,
                                          "normalize": {"mri": "zscore", "pet": "suvr"}},
                      split_fractions=[0.6, 0.0, 0.4], finetune={"rounds": 6})
    out = tmp_path / "run"
    proc = run_sim(tmp_path, cfg, out, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for site in "ABC":
        assert list(default_cache_dir(cohort / site).glob("tx-*.json"))         # registered at the site
    metrics = json.loads((out / "metrics.json").read_text())
    aucs = [m["auc"] for m in metrics["sites"].values() if m.get("auc") is not None]
    assert len(aucs) >= 2 and np.mean(aucs) > 0.7, metrics["sites"]        # a small test split may hold one class
    model = json.loads((out / "model" / "config.json").read_text())
    assert model["run"]["preprocess"]["spatial"] == "template"
