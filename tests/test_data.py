"""Site data layer on real files: readers, bad input, manifest, preprocessing, cache, datasets."""
import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cmvim.data import (DataError, PretrainAugment, SiteData, Volume, assign_splits, load_volume,
                        make_loader, read_manifest, read_report)
from cmvim.data import site as site_module
from cmvim.data.cache import default_cache_dir
from cmvim.run_config import AugmentConfig, PreprocessConfig, RunConfig, run_config
from cmvim.data.preprocess import CheckOverlap, CropPad, Reorient, resample, world_bounds

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    """Site caches go to the user's cache folder (never the site folder): here, the test's own."""
    monkeypatch.setenv("CMVIM_CACHE", str(tmp_path / "user-cache"))


def brain_like(shape=(40, 48, 40), seed=0):
    """A blob of 'tissue' with texture on a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.6
    return (inside * (100 + 20 * rng.standard_normal(shape))).astype(np.float32)


def save_nifti(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def write_site(root: Path, n=6, with_pet=True, extra_rows=()):
    rows = ["subject_id,mri,pet,report,label"]
    for i in range(n):
        save_nifti(root / f"scans/sub{i}_t1.nii.gz", brain_like(seed=i))
        pet = ""
        if with_pet and i % 2 == 0:
            save_nifti(root / f"scans/sub{i}_pet.nii.gz", brain_like((20, 24, 20), seed=100 + i),
                       np.diag([4.0, 4.0, 4.0, 1.0]))
            pet = f"scans/sub{i}_pet.nii.gz"
        (root / f"scans/sub{i}.txt").write_text(f"Report {i}: mild   changes.\n")
        rows.append(f"SUBJ-{i:03d},scans/sub{i}_t1.nii.gz,{pet},scans/sub{i}.txt,{['CN', 'AD', 'MCI'][i % 3]}")
    rows += list(extra_rows)
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


# -- reading -------------------------------------------------------------------------------------

def test_load_real_nifti_from_nibabel_test_data():
    volume, affine = load_volume(NIBABEL_DATA / "anatomical.nii")
    assert volume.shape == (33, 41, 25) and volume.dtype == np.float32
    np.testing.assert_allclose(affine, nib.load(str(NIBABEL_DATA / "anatomical.nii")).affine)


def test_4d_single_volume_squeezed_and_pet_frames_averaged(tmp_path):
    """Without frame timing a dynamic PET's frames count alike, and the visit's warnings say so;
    with weights (a BIDS sidecar's window) frame t counts by its weight, a zero weight not at all."""
    one = save_nifti(tmp_path / "one.nii.gz", brain_like()[..., None])
    assert load_volume(one)[0].shape == (40, 48, 40)
    frames = np.stack([brain_like(seed=s) for s in range(3)], axis=-1)
    path = save_nifti(tmp_path / "frames.nii.gz", frames)
    warnings = []
    volume, _ = load_volume(path, "pet", warnings=warnings)
    np.testing.assert_allclose(volume, frames.mean(-1), rtol=1e-5)
    assert warnings == ["frames.nii.gz: 3 frames averaged with equal weights (no frame timing)"]
    weighted, _ = load_volume(path, "pet", (0.0, 0.25, 0.75), warnings)
    np.testing.assert_allclose(weighted, 0.25 * frames[..., 1] + 0.75 * frames[..., 2], rtol=1e-5)
    assert len(warnings) == 1
    with pytest.raises(DataError, match="3 frames in the image, 2 frame weights"):
        load_volume(path, "pet", (0.5, 0.5))
    with pytest.raises(DataError, match="4D image with 3 volumes"):
        load_volume(path, "mri")


@pytest.mark.parametrize("case", ["truncated", "not_image", "two_d", "nan", "inf", "all_zero", "unreadable",
                                  "wrong_suffix"])
def test_bad_volumes_are_data_errors_naming_the_file(tmp_path, case):
    good = save_nifti(tmp_path / "good.nii.gz", brain_like())
    path = tmp_path / "bad.nii.gz"
    if case == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = "truncated or corrupt"
    elif case == "not_image":
        path.write_bytes(gzip.compress(b"this is a radiology report, not an image" * 20))
        expected = "not a readable NIfTI"
    elif case == "two_d":
        save_nifti(path, brain_like()[:, :, 0])
        expected = "expected a 3D volume"
    elif case in ("nan", "inf"):
        data = brain_like()
        data[3, 4, 5] = np.nan if case == "nan" else np.inf
        save_nifti(path, data)
        expected = "1 NaN/inf voxels"
    elif case == "all_zero":
        save_nifti(path, np.zeros((10, 10, 10), np.float32))
        expected = "all voxels are zero"
    elif case == "unreadable":
        path.symlink_to(tmp_path / "gone.nii.gz")       # a dangling link: there and not readable, even for root
        expected = "file not found"
    else:
        path = tmp_path / "scan.mgz"
        path.write_bytes(b"x")
        expected = "not a NIfTI file"
    with pytest.raises(DataError, match=expected) as info:
        load_volume(path)
    assert str(path) in str(info.value)


def test_reports_normalised_latin1_tolerated_empty_rejected(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffMild  atrophy,\r\n\r\n hippocampi  ".encode("utf-8"))
    assert read_report(tmp_path / "a.txt") == "Mild atrophy, hippocampi"
    (tmp_path / "b.txt").write_bytes("Befund: Atrophie gering, Ödem.".encode("latin-1"))
    assert read_report(tmp_path / "b.txt") == "Befund: Atrophie gering, Ödem."
    (tmp_path / "c.txt").write_text("   \n\t ")
    with pytest.raises(DataError, match="report is empty"):
        read_report(tmp_path / "c.txt")


# -- manifest ------------------------------------------------------------------------------------

def test_manifest_accepts_bom_crlf_extra_columns_and_flags_typos(tmp_path):
    save_nifti(tmp_path / "a.nii.gz", brain_like())
    text = "\ufeffSubject_ID,MRI,age,labl\r\nA1,a.nii.gz,71,CN\r\n\r\n"
    (tmp_path / "manifest.csv").write_bytes(text.encode("utf-8"))
    manifest = read_manifest(tmp_path)
    assert [e.subject_id for e in manifest.entries] == ["A1"] and not manifest.problems
    assert manifest.entries[0].label is None
    assert manifest.warnings == ["column 'labl' is not used; did you mean 'label'?"]


def test_manifest_row_problems_name_row_and_column(tmp_path):
    save_nifti(tmp_path / "a.nii.gz", brain_like())
    outside = tmp_path.parent / f"{tmp_path.name}_outside.nii.gz"
    save_nifti(outside, brain_like())
    (tmp_path / "manifest.csv").write_text(
        "subject_id,mri,pet,label,split\n"
        "A1,a.nii.gz,,CN,\n"
        "A1,a.nii.gz,,AD,\n"                             # duplicate subject
        "A2,a.nii.gz,,Alzheimers,\n"                     # unknown label
        "A3,missing.nii.gz,,CN,\n"                       # missing file
        f"A4,../{outside.name},,CN,\n"                   # escapes the site folder
        "A5,a.nii.gz,,CN,training\n"                     # unknown split
        "A6,,,CN,\n")                                    # no MRI
    manifest = read_manifest(tmp_path)
    assert [e.subject_id for e in manifest.entries] == ["A1"]
    found = {(p.row, p.column, p.kind) for p in manifest.problems}
    assert found == {(3, "subject_id", "duplicate subject"), (4, "label", "unknown label"),
                     (5, "mri", "missing file"), (6, "mri", "path outside site"), (7, "split", "unknown split"),
                     (8, "mri", "bad manifest")}
    duplicate = next(p for p in manifest.problems if p.row == 3)
    assert "already on row 2" in str(duplicate) and "'A1'" in str(duplicate)
    assert "A1" not in duplicate.public_message()


def test_manifest_missing_required_column_is_fatal(tmp_path):
    (tmp_path / "manifest.csv").write_text("subject,mri\nA1,a.nii.gz\n")
    with pytest.raises(DataError, match=r"required column\(s\) missing: 'subject_id' \(found 'subject'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").unlink()
    with pytest.raises(DataError, match="no manifest.csv"):
        read_manifest(tmp_path)


def test_visits_of_one_subject_need_a_visit_column_and_share_a_split(tmp_path):
    save_nifti(tmp_path / "a.nii.gz", brain_like())
    (tmp_path / "manifest.csv").write_text(
        "subject_id,visit,mri,label\n" + "".join(f"S{i},{v},a.nii.gz,{'CN' if i % 2 else 'AD'}\n"
                                                 for i in range(20) for v in ("bl", "m12")))
    manifest = read_manifest(tmp_path)
    assert len(manifest.entries) == 40 and not manifest.problems
    splits = assign_splits(manifest.entries, seed=3)
    assert set(splits.values()) == {"train", "val", "test"}
    assert assign_splits(manifest.entries, seed=3) == splits           # deterministic
    assert assign_splits(list(reversed(manifest.entries)), seed=3) == splits   # row order does not matter
    (tmp_path / "manifest.csv").write_text("subject_id,mri,split\nS1,a.nii.gz,train\n")
    one = read_manifest(tmp_path).entries[0]
    with pytest.raises(DataError, match="different splits"):
        assign_splits([one, type(one)(**{**one.__dict__, "visit": "m12", "split": "test"})], seed=0)


# -- preprocessing -------------------------------------------------------------------------------

def test_reorient_keeps_world_positions():
    data = brain_like((10, 12, 14))
    affine = np.array([[0, 0, -2.0, 30], [-2.0, 0, 0, 40], [0, 2.0, 0, -20], [0, 0, 0, 1]])   # PIL-ish
    sample = Reorient()({"mri": Volume(data, affine)})
    vol = sample["mri"]
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    ijk = np.array([3, 5, 7])
    world = nib.affines.apply_affine(affine, ijk)
    new_ijk = np.round(nib.affines.apply_affine(np.linalg.inv(vol.affine), world)).astype(int)
    assert vol.data[tuple(new_ijk)] == data[tuple(ijk)]


def test_resample_matches_world_coordinates():
    data = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)     # linear in each axis
    src = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    same = resample(src, src.affine, data.shape)
    np.testing.assert_allclose(same.data, data, atol=1e-3)
    target = np.diag([1.0, 1.0, 1.0, 1.0])                                # 1 mm grid over the same box
    fine = resample(src, target, (15, 15, 15))
    # voxel (3, 5, 7) of the 1 mm grid is world (3, 5, 7) = source voxel (1.5, 2.5, 3.5): linear interpolation
    expected = 1.5 * 64 + 2.5 * 8 + 3.5
    assert fine.data[3, 5, 7] == pytest.approx(expected, rel=1e-4)
    assert fine.data.shape == (15, 15, 15)


def test_crop_pad_shifts_affine_consistently():
    data = brain_like((20, 30, 10))
    vol = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = CropPad(16)({"mri": vol})["mri"]
    assert out.data.shape == (16, 16, 16)
    ijk = np.array([8, 8, 8])                                            # a voxel inside both
    world = nib.affines.apply_affine(out.affine, ijk)
    src = np.round(nib.affines.apply_affine(np.linalg.inv(vol.affine), world)).astype(int)
    assert out.data[tuple(ijk)] == data[tuple(src)]


def test_check_overlap_warns_when_pet_is_elsewhere():
    mri = Volume(brain_like(), np.diag([2.0, 2.0, 2.0, 1.0]))
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = 500
    sample = CheckOverlap(0.5)({"mri": mri, "pet": Volume(brain_like(), far)})
    assert "overlap 0%" in sample["warnings"][0]
    assert "warnings" not in CheckOverlap(0.5)({"mri": mri, "pet": Volume(brain_like(), mri.affine)})
    assert world_bounds(mri)[1].tolist() == [78.0, 94.0, 78.0]


# -- site loading, cache, datasets ---------------------------------------------------------------

CFG = PreprocessConfig(spatial="none", shape=24, voxel_size=4.0)


def test_site_loads_skips_bad_subjects_and_reports_every_skip(tmp_path):
    site = write_site(tmp_path / "site", n=6, extra_rows=[
        "BAD-1,scans/broken.nii.gz,,,CN", "BAD-2,scans/sub0_t1.nii.gz,,scans/empty.txt,CN",
        "BAD-3,scans/nan.nii.gz,,,AD"])
    (site / "scans/broken.nii.gz").write_bytes((site / "scans/sub1_t1.nii.gz").read_bytes()[:300])
    (site / "scans/empty.txt").write_text("")
    nan = brain_like()
    nan[0, 0, 0] = np.nan
    save_nifti(site / "scans/nan.nii.gz", nan)
    data = SiteData.load(site, CFG, cache_dir=tmp_path / "cache")
    assert data.summary.loaded == 6 and data.summary.rows == 9
    skipped = {e.subject: (e.row, e.column, e.kind) for e in data.summary.skipped}
    assert skipped == {"BAD-1": (8, "mri", "corrupt file"), "BAD-2": (9, None, "empty report"),
                       "BAD-3": (10, "mri", "non-finite voxels")}
    for err in data.summary.skipped:
        assert err.file and err.subject in str(err)
    counts = data.counts()
    assert counts["visits"] == 6 and counts["with_pet"] == 3 and counts["skipped"] == 3
    assert counts["labels"] == {"CN": 2, "AD": 2, "MCI": 2}
    assert not any("SUBJ" in str(v) for v in counts.values())


def test_cache_serves_later_loads_and_invalidates_on_change(tmp_path, monkeypatch):
    site = write_site(tmp_path / "site", n=3)
    first = SiteData.load(site, CFG)
    assert first.summary.cache_hits == 0 and len(list(default_cache_dir(site).glob("*.npz"))) == 3

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a scan although it was cached")
    monkeypatch.setattr(site_module, "load_volume", no_decoding)
    second = SiteData.load(site, CFG)
    assert second.summary.cache_hits == 3
    torch.testing.assert_close(second.dataset()[0]["mri"], first.dataset()[0]["mri"])
    monkeypatch.setattr(site_module, "load_volume", load_volume)

    changed = SiteData.load(site, PreprocessConfig(spatial="none", shape=24, voxel_size=3.0))     # config change
    assert changed.summary.cache_hits == 0
    scan = site / "scans/sub1_t1.nii.gz"
    save_nifti(scan, brain_like(seed=42))                                           # file change
    os.utime(scan, ns=(1, 1))
    again = SiteData.load(site, CFG)
    assert again.summary.cache_hits == 2


def test_the_cache_keeps_one_entry_per_subject_and_config(tmp_path):
    """Entries for changed files and removed rows go when the site is loaded again; another
    preprocessing config's entries stay (another run may use them); so does nothing else."""
    site = write_site(tmp_path / "site", n=4)
    cache = default_cache_dir(site)
    other = PreprocessConfig(spatial="none", shape=24, voxel_size=3.0)
    SiteData.load(site, CFG)
    SiteData.load(site, other)
    assert len(list(cache.glob("*.npz"))) == 8
    (cache / "v1-old-entry.npz").write_bytes(b"an earlier cache version")
    for step in range(3):                       # a scan rewritten three times: still one entry for it
        scan = site / "scans/sub1_t1.nii.gz"
        save_nifti(scan, brain_like(seed=step))
        os.utime(scan, ns=(step + 1, step + 1))
        data = SiteData.load(site, CFG)
    assert data.summary.cache_hits == 3 and len(list(cache.glob("*.npz"))) == 8
    rows = (site / "manifest.csv").read_text().splitlines()
    (site / "manifest.csv").write_text("\n".join(rows[:-1]) + "\n")          # a subject removed
    data = SiteData.load(site, CFG)
    assert data.summary.loaded == 3 and len(list(cache.glob("*.npz"))) == 7
    # the other config's entries were kept: its unchanged subjects (sub0, sub2) still hit
    assert SiteData.load(site, other).summary.cache_hits == 2


def test_datasets_splits_subsets_and_missing_modality(tmp_path):
    site = write_site(tmp_path / "site", n=9)
    data = SiteData.load(site, CFG, seed=1)
    all_items = data.dataset()
    assert len(all_items) == 9
    labeled = data.subset(labeled=True)
    assert {r.entry.label for r in labeled} == {"CN", "AD"}                         # MCI has no binary class
    assert len(data.subset(labeled=True, classes=("CN", "MCI", "AD"))) == 9
    item = all_items[1]
    assert item["pet_present"] is False and torch.count_nonzero(item["pet"]) == 0
    assert item["mri"].shape == (1, 24, 24, 24)
    assert set(item) == {"mri", "pet", "mri_present", "pet_present", "report", "label", "index"}
    assert "SUBJ" not in repr({k: v for k, v in item.items() if k != "report"})
    batch = next(iter(make_loader(data.dataset(split="train"), batch_size=4, shuffle=True)))
    assert batch["mri"].shape[1:] == (1, 24, 24, 24) and batch["report_ids"].dtype == torch.long
    assert sum(len(data.subset(split=s)) for s in ("train", "val", "test")) == 9


def test_cn_vs_mci_is_a_task_of_its_own(tmp_path):
    """model.positive: MCI asks CN vs MCI: MCI is class 1 (the score is P(MCI)), AD has no class,
    and everything that reads labels (the views a round trains on, the results' wording, the
    exported model's card) follows the config, not a hard-coded AD."""
    from cmvim.config import ConfigError
    from cmvim.data.views import SiteViews
    site = write_site(tmp_path / "site", n=9)
    cfg = run_config({"model": {"preset": "tiny", "positive": "MCI"}, "preprocess": {"spatial": "none", "shape": 32},
                      "split_fractions": [1.0, 0.0, 0.0]})
    assert cfg.model.classes == ("CN", "MCI") and cfg.model.task == "MCI vs CN"
    assert run_config({}).model.classes == ("CN", "AD") and run_config({}).model.task == "AD vs CN"
    data = SiteData.load(site, CFG, seed=1, split_fractions=(1.0, 0.0, 0.0))
    views = SiteViews(cfg, [data])
    train = views.finetuning()
    assert sorted(r.entry.label for r in train.records) == ["CN"] * 3 + ["MCI"] * 3       # no AD
    assert sorted(zip((r.entry.label for r in train.records), views.labels(train))) == [("CN", 0)] * 3 + [("MCI", 1)] * 3
    assert {train[i]["label"] for i in range(len(train)) if train.records[i].entry.label == "MCI"} == {1}
    with pytest.raises(ConfigError, match="positive: MCI names a binary task"):
        run_config({"model": {"num_classes": 3, "positive": "MCI"}})
    with pytest.raises(ConfigError, match="'CN'"):
        run_config({"model": {"positive": "CN"}})


def test_augmentation_moves_mri_and_pet_together(tmp_path):
    shape = (1, 24, 24, 24)
    volume = torch.from_numpy(brain_like((24, 24, 24)))[None]
    item = {"mri": volume, "pet": volume.clone(), "mri_present": True, "pet_present": True}
    augment = PretrainAugment(AugmentConfig(flip=0.5, rotate_deg=10, scale=0.1, translate=0.05, intensity=0.0,
                                            noise=0.0))
    out = augment(item, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["mri"], out["pet"])                              # same spatial transform
    assert not torch.allclose(out["mri"], volume)
    missing = augment(dict(item, pet=torch.zeros(shape), pet_present=False), torch.Generator().manual_seed(0))
    assert torch.count_nonzero(missing["pet"]) == 0
    again = augment(item, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["mri"], out["mri"])                            # reproducible from the seed


def test_workers_preprocess_what_the_serial_load_does(tmp_path):
    """SiteData.load(workers=2) preprocesses the visits missing from the cache in forked processes:
    the same records, arrays, problems and warnings as one process; cache hits count only what
    was in the cache before the load."""
    far = np.diag([4.0, 4.0, 4.0, 1.0])
    far[:3, 3] = [45.0, 0.0, 0.0]                                   # a PET half elsewhere: CheckOverlap warns
    site = write_site(tmp_path / "site", n=6, extra_rows=["BAD-1,scans/none.nii.gz,,,CN", "FAR,scans/sub0_t1.nii.gz,"
                                                           "scans/far_pet.nii.gz,,AD"])
    save_nifti(site / "scans/far_pet.nii.gz", brain_like((20, 24, 20), seed=9), far)
    serial = SiteData.load(site, CFG, cache_dir=tmp_path / "serial")
    parallel = SiteData.load(site, CFG, cache_dir=tmp_path / "parallel", workers=2)
    assert [r.entry.subject_id for r in parallel.records] == [r.entry.subject_id for r in serial.records]
    assert [str(p) for p in parallel.summary.skipped] == [str(p) for p in serial.summary.skipped]
    assert parallel.summary.warnings == serial.summary.warnings and "overlap" in " ".join(serial.summary.warnings)
    assert parallel.summary.cache_hits == serial.summary.cache_hits == 0
    for a, b in zip(parallel.records, serial.records):
        for name, array in serial.cache.load(b.key).items():
            np.testing.assert_array_equal(parallel.cache.load(a.key)[name], array)
    assert SiteData.load(site, CFG, cache_dir=tmp_path / "parallel", workers=2).summary.cache_hits == 7


def test_finetune_augmentation_moves_both_modalities_and_modality_dropout_still_applies(tmp_path):
    """finetune_augment: the fine-tuning rounds' items move (MRI and PET together, as in
    pretraining), reproducibly per round; modality dropout still hides PETs after it; without it
    the items are the cached arrays as they are."""
    from cmvim.data.views import SiteViews
    data = SiteData.load(write_site(tmp_path / "site", n=9), CFG, seed=1, split_fractions=(1.0, 0.0, 0.0))
    moves = {"flip": 0.0, "rotate_deg": 8.0, "scale": 0.05, "translate": 0.03, "intensity": 0.0, "noise": 0.0}
    plain = run_config({"model": {"preset": "tiny", "img_size": 24, "patch_size": 8},
                        "preprocess": {"spatial": "none", "shape": 24}, "modality_dropout": 0.0})
    moved = run_config({**{"model": {"preset": "tiny", "img_size": 24, "patch_size": 8},
                           "preprocess": {"spatial": "none", "shape": 24}}, "modality_dropout": 0.0,
                        "finetune_augment": moves})
    dropped = run_config({"model": {"preset": "tiny", "img_size": 24, "patch_size": 8},
                          "preprocess": {"spatial": "none", "shape": 24}, "modality_dropout": 1.0,
                          "finetune_augment": moves})
    reference = SiteViews(plain, [data]).finetuning()
    augmented = SiteViews(moved, [data]).finetuning()
    index = next(i for i, r in enumerate(augmented.records) if r.has_pet)
    cached = data.cache.load(augmented.records[index].key)
    assert torch.equal(reference[index]["mri"][0], torch.from_numpy(cached["mri"]))
    item = augmented[index]
    assert not torch.allclose(item["mri"], reference[index]["mri"])
    again = augmented[index]
    torch.testing.assert_close(again["mri"], item["mri"])                          # reproducible within a round
    augmented.seed = 2
    assert not torch.allclose(augmented[index]["mri"], item["mri"])               # another round, another move
    hidden = SiteViews(dropped, [data]).finetuning()[index]
    assert hidden["pet_present"] is False and torch.count_nonzero(hidden["pet"]) == 0


def test_check_command_prints_table_and_exit_codes(tmp_path, capsys):
    from cmvim.client.cli import main
    site = write_site(tmp_path / "site", n=4, extra_rows=["BAD-1,scans/none.nii.gz,,,CN"])
    config = tmp_path / "run.yaml"                   # the blobs here are no heads: taken as in template space
    config.write_text("preprocess: {spatial: none, shape: 32}\n")
    assert main(["check", "--data", str(site), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "manifest.csv: 5 rows, 4 usable, 1 with problems" in out and "spatial none" in out
    assert "| mri      | 40x48x40" in out and "file not found: 'scans/none.nii.gz'" in out
    assert main(["check", "--data", str(site), "--config", str(config), "--strict"]) == 1
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check", "--data", str(empty)]) == 1
    assert "FATAL" in capsys.readouterr().out


def test_site_with_dicom_series_loads_and_a_gapped_series_is_skipped(tmp_path):
    """A PACS export: real CT slices from pydicom's test data as a site's 'MRI' series."""
    import pydicom.data as pydicom_data
    ct5n = Path(pydicom_data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    site = tmp_path / "site"
    shutil.copytree(ct5n, site / "A" / "ct")
    shutil.copytree(ct5n, site / "B" / "ct")
    middle = sorted((site / "B" / "ct").iterdir())[2]
    middle.unlink()                                          # one slice missing from B's series
    (site / "manifest.csv").write_text("subject_id,mri,label\nA,A/ct,CN\nB,B/ct,AD\n")
    volume, affine = load_volume(site / "A" / "ct")
    assert volume.shape == (16, 16, 5) and abs(abs(affine[2, 2]) - 2.5) < 1e-6
    data = SiteData.load(site, PreprocessConfig(spatial="none", shape=16, voxel_size=None, normalize={"mri": "percentile"}))
    assert data.summary.loaded == 1
    (err,) = data.summary.skipped
    assert (err.subject, err.row, err.column, err.kind) == ("B", 3, "mri", "missing slice")
    assert "B/ct" in str(err)


def test_modality_dropout_hides_pet_as_if_missing():
    from cmvim.data.augment import ModalityDropout
    volume = torch.ones(1, 8, 8, 8)
    item = {"mri": volume, "pet": volume.clone(), "mri_present": True, "pet_present": True}
    hidden = [not ModalityDropout(0.3)(item, torch.Generator().manual_seed(s))["pet_present"] for s in range(400)]
    assert 0.22 < np.mean(hidden) < 0.38
    out = ModalityDropout(1.0)(item, torch.Generator().manual_seed(0))
    assert out["pet_present"] is False and torch.count_nonzero(out["pet"]) == 0 and out["mri_present"]
    assert item["pet_present"] is True                                       # the input is not modified


def test_check_shows_the_splits_the_run_will_use(tmp_path, capsys):
    """`cmvim-client check --config run.yaml` counts splits as training assigns them (the run's
    seed and split_fractions, over the same manifest entries), not by a rule of its own."""
    import re

    import yaml

    from cmvim.client.cli import main
    site = write_site(tmp_path / "site", n=20)
    for seed, fractions in [(0, [0.7, 0.1, 0.2]), (3, [0.4, 0.2, 0.4])]:
        config = tmp_path / f"run{seed}.yaml"
        config.write_text(yaml.safe_dump({"seed": seed, "split_fractions": fractions, "preprocess": {"spatial": "none", "shape": 32}}))
        assert main(["check", "--data", str(site), "--config", str(config)]) == 0
        shown = {m.group(1): int(m.group(2)) for m in re.finditer(r"\| split (\w+) +\| +(\d+)", capsys.readouterr().out)}
        loaded = SiteData.load(site, PreprocessConfig(spatial="none", shape=16, voxel_size=None), seed=seed, split_fractions=fractions)
        assert shown == loaded.counts()["splits"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("split_fractons: [0.5, 0.25, 0.25]\n")
    assert main(["check", "--data", str(site), "--config", str(bad)]) == 1
    assert "split_fractions" in capsys.readouterr().out          # the typo named, the right key suggested


def test_a_run_loads_a_site_through_one_call_and_check_sees_the_rows_training_does(tmp_path, monkeypatch):
    """`SiteData.for_run` passes the run's preprocessing, seed, split_fractions, use_reports and
    bids to `load`: the same records and splits as that load written out. `cmvim-client check`
    and the ClientApp's training load both go through it, so with a seed and split fractions of
    the run's own, check's usable rows, splits and skipped rows are training's."""
    import re

    from cmvim.client import app as client_app
    from cmvim.client.check import check_site
    from cmvim.data import run_load_key
    site = write_site(tmp_path / "site", n=12, extra_rows=["BAD-1,scans/none.nii.gz,,,CN",
                                                           "BAD-2,scans/sub0_t1.nii.gz,,scans/none.txt,AD"])
    run = run_config({"seed": 5, "split_fractions": [0.5, 0.25, 0.25], "use_reports": False,
                      "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 4.0}})

    def seen(data):
        return ([(r.entry.row, r.entry.subject_id, r.split, r.key, r.report) for r in data.records],
                sorted((p.row, p.column, p.kind) for p in data.summary.skipped))

    for_run = SiteData.for_run(site, run, cache_dir=tmp_path / "cache")
    written_out = SiteData.load(site, run.preprocess, cache_dir=tmp_path / "cache", seed=5, use_reports=False,
                                split_fractions=(0.5, 0.25, 0.25), bids=run.bids)
    assert seen(for_run) == seen(written_out)
    default = SiteData.load(site, run.preprocess, cache_dir=tmp_path / "cache")
    assert [r.split for r in for_run.records] != [r.split for r in default.records]   # the run's splits, not 0's
    assert [r.entry.row for r in for_run.records] == list(range(2, 14))
    assert seen(for_run)[1] == [(14, "mri", "missing file"), (15, "report", "missing file")]
    assert all(r.report is None for r in for_run.records) and all(r.report for r in default.records)  # use_reports

    loads = []
    original = SiteData.load.__func__
    monkeypatch.setattr(SiteData, "load", classmethod(lambda cls, *a, **kw: loads.append(original(cls, *a, **kw))
                                                      or loads[-1]))
    lines = []
    assert check_site(site, out=lines.append, cfg=run) == 0, "\n".join(lines)
    training = client_app.site_data(run, site)                       # the ClientApp's load (a simulated site)
    checked = loads[0]
    assert loads[1] is training and seen(checked) == seen(training) == seen(for_run)
    out = "\n".join(lines)
    shown = {m.group(1): int(m.group(2)) for m in re.finditer(r"\| split (\w+) +\| +(\d+)", out)}
    assert shown == training.counts()["splits"] == {"train": 6, "val": 3, "test": 3}
    skipped = sorted((int(m.group(1)), m.group(2)) for m in re.finditer(r"^\| +(\d+) \| (\S+) ", out, re.MULTILINE))
    assert skipped == sorted((p.row, p.subject) for p in training.summary.skipped) == [(14, "BAD-1"), (15, "BAD-2")]
    assert "14 rows, 12 usable, 2 with problems" in out
    # a process that keeps loaded sites reuses one only under the same run arguments
    assert run_load_key(site, run) == run_load_key(site, RunConfig.from_json(run.to_json()))
    assert len({run_load_key(site, run), run_load_key(site, run, (5, (0.6, 0.2, 0.2))),
                run_load_key(site, run_config({"seed": 5, "split_fractions": [0.5, 0.25, 0.25],
                                               "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 4.0}}))}) == 3


def test_a_pooled_dataset_sets_its_augmentation_counters_in_every_part(tmp_path):
    from cmvim.data.views import Pooled
    a = SiteData.load(write_site(tmp_path / "a", n=3), CFG).dataset()
    b = SiteData.load(write_site(tmp_path / "b", n=2), CFG).dataset()
    pooled = Pooled([a, b])
    pooled.epoch, pooled.seed = 4, 9
    assert (a.epoch, a.seed, b.epoch, b.seed) == (4, 9, 4, 9) and (pooled.epoch, pooled.seed) == (4, 9)
    assert len(pooled) == 5 and len(pooled.records) == 5


def test_a_read_only_site_folder_is_read_checked_and_cached_elsewhere(tmp_path):
    """A PACS export mounted read-only (0555 folders, 0444 files): check and load read it, the
    preprocessed scans go to the user's cache (folders 0700, files 0600), nothing under the site
    changes (compared file by file: tests may run as root, which a mode does not stop)."""
    from cmvim.client.check import check_site
    run = run_config({"preprocess": {"spatial": "none", "shape": 32, "voxel_size": 4.0}})
    site = write_site(tmp_path / "site", n=4)

    def snapshot():
        return sorted((str(p.relative_to(site)), p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_mode)
                      for p in [site, *site.rglob("*")])
    for path in [site, *site.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot()
    try:
        lines = []
        assert check_site(site, out=lines.append, cfg=run) == 0, "\n".join(lines)
        data = SiteData.load(site, run.preprocess)
        assert data.summary.loaded == 4 and data.summary.cache_hits == 4
        cache = default_cache_dir(site)
        assert cache.parent.parent == tmp_path / "user-cache" and f"preprocessed into the cache {cache}\n" in "\n".join(lines)
        assert snapshot() == before
        assert len(list(cache.glob("*.npz"))) == 4
        assert cache.stat().st_mode & 0o777 == 0o700 and (tmp_path / "user-cache").stat().st_mode & 0o777 == 0o700
        assert {p.stat().st_mode & 0o777 for p in cache.iterdir()} == {0o600}
    finally:
        for path in [site, *site.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_cache_inside_the_site_folder_is_warned(tmp_path):
    site = write_site(tmp_path / "site", n=2)
    data = SiteData.load(site, CFG, cache_dir=site / "cache")
    assert any("is inside the site folder" in w for w in data.summary.warnings)
    assert not any("inside the site folder" in w for w in SiteData.load(site, CFG).summary.warnings)
