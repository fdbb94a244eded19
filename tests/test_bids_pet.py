"""BIDS PET read as BIDS says (cmvim.data.pet): the tracer from the _pet.json sidecar, a dynamic
PET made static from the frames of a late window weighted by their durations, the units shown,
and a PET that cannot be read costing the visit its PET only. The fixtures copy the layout and
sidecars of the bids-examples PET datasets (pet001-pet006: sub-01/ses-baseline/pet/
sub-01_ses-baseline_pet.nii.gz + .json, TracerName DASB, frames of 10 s to 600 s, Bq/mL, a T1w
beside it), on 16^3-voxel images."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cmvim.data import SiteData, load_volume, read_site_folder
from cmvim.data.pet import PetPolicy, frame_weights, tracer_key
from cmvim.run_config import PreprocessConfig
from test_bids import SHAPE, T1_AFFINE, bids_site, run_check
from test_data import brain_like, save_nifti

PREPROCESS = PreprocessConfig(spatial="none", shape=16, voxel_size=4.0)
# bids-examples pet002-style frames: 6 x 10 s, 4 x 60 s, 4 x 120 s, 4 x 300 s, 4 x 600 s (0-4380 s)
DURATIONS = [10] * 6 + [60] * 4 + [120] * 4 + [300] * 4 + [600] * 4
STARTS = [sum(DURATIONS[:i]) for i in range(len(DURATIONS))]


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    """Site caches go to the user's cache folder (never the site folder): here, the test's own."""
    monkeypatch.setenv("CMVIM_CACHE", str(tmp_path / "user-cache"))


def pet_sidecar(tracer="DASB", starts=STARTS, durations=DURATIONS, units="Bq/mL", **more) -> dict:
    """The fields bids-examples' pet00x sidecars carry that the reader uses, and some it does not."""
    sidecar = {"Manufacturer": "Siemens", "ManufacturersModelName": "High-Resolution Research Tomograph (HRRT)",
               "Units": units, "TracerName": tracer, "TracerRadionuclide": "C11", "InjectedRadioactivity": 629.74,
               "InjectedRadioactivityUnits": "MBq", "ModeOfAdministration": "bolus", "TimeZero": "17:28:40",
               "ScanStart": 0, "InjectionStart": 0, "FrameTimesStart": starts, "FrameDuration": durations,
               "AcquisitionMode": "list mode", "ImageDecayCorrected": True, "ImageDecayCorrectionTime": 0,
               "ReconMethodName": "3D-OSEM-PSF", "AttenuationCorrection": "[137Cs]transmission scan-based"}
    sidecar.update(more)
    return {k: v for k, v in sidecar.items() if v is not None}


def dynamic_frames(n_frames=len(DURATIONS)) -> np.ndarray:
    """Frame t is the same brain times (t + 1): a weighted mean shows which frames it took."""
    brain = brain_like(SHAPE, seed=3)
    return np.stack([brain * (t + 1) for t in range(n_frames)], axis=-1)


def pet_visit(root: Path, subject="sub-01", session="baseline", sidecar: dict | None = None,
              frames: np.ndarray | None = None, name: str | None = None, t1: bool = True) -> Path:
    """A pet00x-style visit: anat T1w and a (dynamic) PET with its sidecar beside it."""
    folder = root / subject / f"ses-{session}"
    stem = f"{subject}_ses-{session}"
    if t1:
        save_nifti(folder / "anat" / f"{stem}_T1w.nii.gz", brain_like(SHAPE, seed=1), T1_AFFINE)
    pet = save_nifti(folder / "pet" / (name or f"{stem}_pet.nii.gz"),
                     dynamic_frames() if frames is None else frames, T1_AFFINE)
    if sidecar is not None:
        pet.with_name(pet.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))
    return pet


def site_with(root: Path, **visit) -> tuple[Path, Path]:
    site = bids_site(root, ["sub-01\t30\tCN\tn/a"])
    return site, pet_visit(site, **visit)


# ----------------------------------------------------------------------------- tracer

def test_every_spelling_of_fdg_is_fdg_and_other_tracers_are_not():
    for name in ("FDG", "fdg", "18F-FDG", "[18F]FDG", "[18F]-FDG", "F-18 FDG", "Fluorodeoxyglucose",
                 "[18F]fluorodeoxyglucose", "2-[18F]fluoro-2-deoxy-D-glucose"):
        assert tracer_key(name) == "FDG", name
    for name in ("DASB", "CIMBI-36", "AZ-10419369", "PiB", "[11C]PiB", "florbetapir", "FDOPA"):
        assert tracer_key(name) != "FDG", name
    assert PetPolicy(accept_tracers=("cimbi-36",)).accepts("CIMBI-36")
    assert not PetPolicy().accepts("DASB") and PetPolicy().accepts("[18F]FDG")


def test_a_dasb_pet_is_refused_by_default_and_read_when_the_run_accepts_it(tmp_path):
    site, pet = site_with(tmp_path / "site", sidecar=pet_sidecar("DASB"))
    refused = read_site_folder(site)
    (entry,) = refused.entries
    assert entry.pet is None and entry.mri.name == "sub-01_ses-baseline_T1w.nii.gz" and not refused.problems
    assert any("sub-01_ses-baseline_pet.nii.gz: tracer 'DASB' is not FDG (the run accepts FDG): not read" in w
               for w in refused.warnings), refused.warnings

    accepted = read_site_folder(site, pet=PetPolicy(accept_tracers=("FDG", "DASB")))
    (entry,) = accepted.entries
    assert entry.pet == pet and entry.pet_reading.tracer == "DASB" and entry.pet_reading.units == "Bq/mL"
    # 30-60 min = 1800-3600 s: frame 18 (1680-1980 s) by 180 s, 19 and 20 whole, 21 (3180-3780 s) by 420 s
    expected = np.zeros(len(DURATIONS))
    expected[[17, 18, 19, 20]] = np.array([180, 600, 600, 420]) / 1800
    np.testing.assert_allclose(entry.pet_reading.weights, expected)
    assert entry.pet_reading.summary == "frames 18-21 of 22, 30-60 min, duration-weighted"
    volume, _ = load_volume(pet, "pet", entry.pet_reading.weights)
    np.testing.assert_allclose(volume, brain_like(SHAPE, seed=3) * (expected * np.arange(1, 23)).sum(), rtol=1e-5)


def test_the_window_is_a_parameter_and_frames_count_by_their_overlap():
    assert frame_weights([0, 600], [600, 600], (5, 15)) == (0.5, 0.5)
    assert frame_weights([0, 600], [600, 600], (0, 5)) == (1.0, 0.0)
    assert frame_weights([100, 700], [600, 600], (0, 5), injection_s=100) == (1.0, 0.0)    # InjectionStart 100 s
    assert frame_weights([0], [600], (30, 60)) is None


def test_a_filename_tracer_that_disagrees_with_the_sidecar_is_that_pets_problem(tmp_path):
    site, _ = site_with(tmp_path / "site", sidecar=pet_sidecar("DASB"), name="sub-01_ses-baseline_trc-FDG_pet.nii.gz")
    manifest = read_site_folder(site, pet=PetPolicy(accept_tracers=("FDG", "DASB")))
    (entry,) = manifest.entries
    assert entry.pet is None and not manifest.problems                       # an MRI-only visit
    assert any("sub-01_ses-baseline_trc-FDG_pet.nii.gz: the file name says trc-FDG but the sidecar's TracerName "
               "is 'DASB'" in w and "without PET" in w for w in manifest.warnings), manifest.warnings


def test_dataset_level_sidecars_are_inherited_the_file_s_own_wins(tmp_path):
    site, pet = site_with(tmp_path / "site", sidecar={"Units": "kBq/mL"}, frames=brain_like(SHAPE, seed=3))
    (site / "pet.json").write_text(json.dumps({"TracerName": "[18F]FDG", "Units": "Bq/mL"}))
    (site / "sub-02_pet.json").write_text(json.dumps({"TracerName": "DASB"}))   # another subject's: not inherited
    (entry,) = read_site_folder(site).entries
    assert entry.pet == pet and entry.pet_reading.tracer == "FDG" and entry.pet_reading.units == "kBq/mL"
    assert entry.pet_reading.weights is None and entry.pet_reading.summary == "static"


# ----------------------------------------------------------------------------- frames

def test_an_fdg_pet_without_frames_in_the_window_leaves_an_mri_only_visit_naming_its_frames(tmp_path):
    durations = [10] * 6 + [60] * 9                                             # 0-600 s only
    starts = [sum(durations[:i]) for i in range(len(durations))]
    site, _ = site_with(tmp_path / "site", sidecar=pet_sidecar("FDG", starts, durations),
                        frames=dynamic_frames(len(durations)))
    manifest = read_site_folder(site)
    (entry,) = manifest.entries
    assert entry.pet is None and not manifest.problems
    (warning,) = [w for w in manifest.warnings if "no frame" in w]
    assert "sub-01/ses-baseline/pet/sub-01_ses-baseline_pet.nii.gz: no frame in the 30-60 min window" in warning
    assert "540+60" in warning and "without PET" in warning


def test_frames_that_do_not_match_the_image_are_that_pets_problem(tmp_path):
    site, _ = site_with(tmp_path / "site", sidecar=pet_sidecar("FDG"), frames=dynamic_frames(5))
    manifest = read_site_folder(site)
    assert manifest.entries[0].pet is None
    assert any("the image has 5 frame(s) but sub-01_ses-baseline_pet.json gives 22 FrameTimesStart" in w
               for w in manifest.warnings), manifest.warnings


def test_a_dynamic_pet_without_frame_timing_is_averaged_equally_with_a_warning(tmp_path):
    site, pet = site_with(tmp_path / "site", sidecar={"TracerName": "FDG"}, frames=dynamic_frames(4))
    manifest = read_site_folder(site)
    (entry,) = manifest.entries
    assert entry.pet == pet and entry.pet_reading.weights == (0.25,) * 4 and entry.pet_reading.units == "not given"
    assert any("4 frames but no FrameTimesStart/FrameDuration" in w and "equal weights" in w
               for w in manifest.warnings), manifest.warnings


def test_check_shows_each_pet_s_tracer_units_and_frames(tmp_path):
    site = bids_site(tmp_path / "site", ["sub-01\t30\tCN\tn/a", "sub-02\t31\tAD\tn/a"])
    pet_visit(site, "sub-01", sidecar=pet_sidecar("[18F]FDG"))
    pet_visit(site, "sub-02", sidecar=pet_sidecar("FDG", [1800], [1800], units="kBq/mL"),
              frames=brain_like(SHAPE, seed=4))
    rc, out = run_check(site, tmp_path)
    assert rc == 0, out
    assert "| FDG    | Bq/mL  | frames 18-21 of 22, 30-60 min, duration-weighted |      1 |" in out, out
    assert "| FDG    | kBq/mL | static, 30-60 min" in out, out


# ----------------------------------------------------------------------------- every problem of a visit

def test_a_damaged_pet_costs_its_pet_and_a_damaged_mri_lists_both(tmp_path):
    """The PET's header reads but its data is cut short: found only when the voxels are read, at
    load. With a good T1 the visit trains MRI-only (warned, also from the cache); with the T1
    cut short too, the visit is one bad row listing both files."""
    site = bids_site(tmp_path / "site", ["sub-01\t30\tCN\tn/a", "sub-02\t31\tAD\tn/a"])
    cut = []
    for subject in ("sub-01", "sub-02"):
        pet = pet_visit(site, subject, sidecar=pet_sidecar("FDG", [1800], [1800]), frames=brain_like(SHAPE, seed=5))
        cut.append(pet)
    cut.append(site / "sub-02" / "ses-baseline" / "anat" / "sub-02_ses-baseline_T1w.nii.gz")
    for path in cut:
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    for attempt in ("fresh", "cached"):
        data = SiteData.load(site, PREPROCESS, cache_dir=tmp_path / "cache")
        assert [r.entry.subject_id for r in data.records] == ["sub-01"] and not data.records[0].has_pet, attempt
        assert data.summary.rows == 2 and data.counts()["skipped"] == 1 and data.counts()["with_pet"] == 0
        assert any("PET not used, the visit is read without it: sub-01/ses-baseline/pet/sub-01_ses-baseline_pet.nii.gz"
                   in w for w in data.summary.warnings), (attempt, data.summary.warnings)
        assert sorted((p.row, p.column, Path(p.file).name) for p in data.summary.skipped) == [
            (2, "mri", "sub-02_ses-baseline_T1w.nii.gz"), (2, "pet", "sub-02_ses-baseline_pet.nii.gz")], attempt
    assert data.summary.cache_hits == 1


def test_a_visit_without_t1_lists_its_pet_s_problem_too(tmp_path):
    site, _ = site_with(tmp_path / "site", sidecar=pet_sidecar("FDG", [0], [600]), frames=dynamic_frames(1), t1=False)
    (site / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_pet.json").write_text("{not json")
    manifest = read_site_folder(site)
    assert not manifest.entries
    assert [(p.row, p.kind) for p in manifest.problems] == [(1, "missing file"), (1, "bad sidecar")]
    rc, out = run_check(site, tmp_path)
    assert rc == 1 and "Problems (2 in 1 visits" in out and "sidecar is not valid JSON" in out, out


# ----------------------------------------------------------------------------- the cohort writer's PET

def test_the_bids_cohort_s_pet_is_read_from_its_sidecar(tmp_path):
    from cmvim.simulations.cohort import CohortConfig, generate_cohort
    generate_cohort(tmp_path / "cohort", CohortConfig(sites=1, subjects=4, shape=32, seed=3, pet_missing=0.0,
                                                      format="bids"), measure=False)
    manifest = read_site_folder(tmp_path / "cohort" / "A")
    assert len(manifest.entries) == 4 and not manifest.problems and not manifest.warnings, manifest.warnings
    for entry in manifest.entries:
        sidecar = json.loads(entry.pet.with_name(entry.pet.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["TracerName"] == "FDG" and sidecar["FrameTimesStart"] == [1800]
        assert (entry.pet_reading.tracer, entry.pet_reading.units, entry.pet_reading.summary) == \
            ("FDG", "Bq/mL", "static, 30-60 min")


def test_a_pet_window_must_be_a_window():
    with pytest.raises(ValueError, match="0 <= start < end"):
        PetPolicy(window_min=(60, 30))


def test_a_sidecar_leading_outside_the_site_folder_is_not_read(tmp_path):
    site, _ = site_with(tmp_path / "site", frames=brain_like(SHAPE, seed=3))
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"TracerName": "FDG"}))
    (site / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_pet.json").symlink_to(outside)
    manifest = read_site_folder(site)
    assert manifest.entries[0].pet is None
    assert any("sub-01_ses-baseline_pet.json: the sidecar leads outside the site folder" in w for w in manifest.warnings), \
        manifest.warnings


def test_the_run_config_names_the_tracers_and_a_changed_sidecar_is_read_again(tmp_path):
    """bids.accept_tracers / pet_window_min in the run config reach the reader; a warm site process
    (the site worker keeps its SiteData between messages) reads the visit again when a PET's sidecar
    changes, as when a scan does."""
    import os

    from cmvim.client.app import site_data
    from cmvim.run_config import run_config
    site, pet = site_with(tmp_path / "site", sidecar=pet_sidecar("DASB"))
    base = {"model": {"preset": "tiny", "img_size": 16, "patch_size": 8},
            "preprocess": {"spatial": "none", "shape": 16, "voxel_size": 4.0}}
    assert [r.has_pet for r in site_data(run_config(base), site).records] == [False]         # FDG only by default
    cfg = run_config({**base, "bids": {"accept_tracers": ["FDG", "DASB"], "pet_window_min": [30, 60]}})
    first = site_data(cfg, site)
    assert [r.has_pet for r in first.records] == [True] and site_data(cfg, site) is first
    sidecar = pet.with_name("sub-01_ses-baseline_pet.json")
    sidecar.write_text(json.dumps(pet_sidecar("PiB")))
    os.utime(sidecar, ns=(sidecar.stat().st_atime_ns, sidecar.stat().st_mtime_ns + 10**9))
    again = site_data(cfg, site)
    assert again is not first and [r.has_pet for r in again.records] == [False]
    assert any("tracer 'PiB' is not FDG" in w for w in again.summary.warnings), again.summary.warnings
