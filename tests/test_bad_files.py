"""Every bad file is one bad row (issue #15): `cmvim-client check` and training's `SiteData.load`
name the row and the file, agree on what they skip, print no traceback, and go on with the rest.

Each site here holds three good subjects (NIfTI, and a DICOM series where DICOM is the point)
and the bad file(s) written the way they were found: real files, links and manifests on disk.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmvim.client.cli import main
from cmvim.data import SiteData
from cmvim.data import site as site_module
from cmvim.run_config import run_config
from test_data import brain_like, save_nifti

GOOD = ("GOOD-0", "GOOD-1", "GOOD-2")
COLUMNS = "subject_id,visit,mri,label,split"
SHAPE = (20, 24, 20)                     # 2 mm voxels: a 40x48x40 mm box, 10-12 voxels of the 4 mm grid


@pytest.fixture
def run_yaml(tmp_path) -> Path:
    """The run config the coordinator shares; check and training both read it."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preprocess": {"spatial": "none", "shape": 32, "voxel_size": 4.0}}))
    return path


def good_site(root: Path, dicom: bool = False) -> list[str]:
    """Three good subjects (the last one a DICOM series if `dicom`); their manifest rows."""
    rows = []
    for i, subject in enumerate(GOOD):
        if dicom and i == len(GOOD) - 1:
            from cmvim.simulations.dicom_export import write_dicom_series
            write_dicom_series(root / subject / "t1", brain_like(SHAPE, seed=i), np.diag([2.0, 2.0, 2.0, 1.0]), "MR",
                               subject)
            mri = f"{subject}/t1"
        else:
            save_nifti(root / f"scans/{subject}.nii.gz", brain_like(SHAPE, seed=i))
            mri = f"scans/{subject}.nii.gz"
        rows.append(f"{subject},bl,{mri},{'CN' if i % 2 else 'AD'},")
    return rows


def write_manifest(root: Path, rows: list[str]) -> Path:
    (root / "manifest.csv").write_text("\n".join([COLUMNS, *rows]) + "\n")
    return root


def check_and_train(site: Path, run_yaml: Path, capsys) -> tuple[int, str, SiteData]:
    """`cmvim-client check` as a hospital runs it, then the load training does (client.app.load_task's)."""
    rc = main(["check", "--data", str(site), "--config", str(run_yaml)])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    cfg = run_config(run_yaml)
    data = SiteData.load(site, cfg.preprocess, seed=cfg.seed, use_reports=cfg.use_reports,
                         split_fractions=cfg.split_fractions)
    captured = capsys.readouterr()
    assert "Traceback" not in text + captured.out + captured.err
    return rc, text, data


def problem_line(text: str, row: int) -> str:
    """The line of check's problems table for manifest row `row`."""
    (line,) = [line for line in text.splitlines() if re.match(rf"\|\s+{row} \|", line)]
    return line


def assert_bad_rows(rc: int, text: str, data: SiteData, rows: dict[int, str], subject: str, says: str,
                    file: str) -> None:
    """Check said READY with these rows skipped, training skipped the same rows for the same
    reason, each naming the subject and the file, and loaded every good subject."""
    assert rc == 0, text
    assert f"READY: {len(GOOD)} subject-visits usable, {len(rows)} skipped." in text
    assert sorted(r.entry.subject_id for r in data.records) == list(GOOD)
    assert {err.row: err.column for err in data.summary.skipped} == rows
    for err in data.summary.skipped:
        assert err.subject == subject and says in err.problem, str(err)
        assert file in str(err)
        line = problem_line(text, err.row)                  # check's table: the same row, the same words
        assert f"| {subject} " in line and says in line and file in line, line


def patch_dims(raw: bytes, shape: tuple[int, ...]) -> bytes:
    """A NIfTI-1 header whose dim field claims `shape` (the data stay what they were)."""
    out = bytearray(raw)
    struct.pack_into("<8h", out, 40, len(shape), *shape, *[1] * (7 - len(shape)))
    return bytes(out)


# ----------------------------------------------------------------------------- 1: headers

@pytest.mark.parametrize("name, claimed, says", [
    ("huge.nii.gz", (30000, 30000, 30000), "header claims shape (30000, 30000, 30000)"),
    ("huge.nii", (30000, 30000, 30000), "header claims shape (30000, 30000, 30000)"),
    ("short.nii", (64, 64, 64), "truncated or header claims 262,144 voxels"),
])
def test_a_header_claiming_voxels_the_file_lacks_is_one_bad_row(tmp_path, run_yaml, capsys, name, claimed, says):
    site = tmp_path / "site"
    rows = good_site(site)
    plain = save_nifti(tmp_path / "real.nii", brain_like((16, 16, 16)))       # 16^3 voxels really stored
    raw = patch_dims(plain.read_bytes(), claimed)
    (site / "scans" / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    write_manifest(site, rows + [f"BAD,bl,scans/{name},CN,"])
    rc, text, data = check_and_train(site, run_yaml, capsys)
    assert_bad_rows(rc, text, data, {5: "mri"}, "BAD", says, f"scans/{name}")


# ----------------------------------------------------------------------------- 2: symlink loops

def test_a_symlink_loop_is_one_bad_row(tmp_path, run_yaml, capsys):
    site = tmp_path / "site"
    rows = good_site(site, dicom=True)
    os.symlink("loop.nii.gz", site / "scans" / "loop.nii.gz")                 # a link to itself
    from cmvim.simulations.dicom_export import write_dicom_series
    series = site / "LOOPED" / "t1"
    write_dicom_series(series, brain_like(SHAPE, seed=7), np.diag([2.0, 2.0, 2.0, 1.0]), "MR", "LOOPED")
    os.symlink("a", series / "b")                                             # a loop among the slices
    os.symlink("b", series / "a")
    write_manifest(site, rows + ["BAD,bl,scans/loop.nii.gz,CN,", "BAD,m12,LOOPED/t1,CN,"])
    rc, text, data = check_and_train(site, run_yaml, capsys)
    assert_bad_rows(rc, text, data, {5: "mri", 6: "mri"}, "BAD", "symlink loop", "manifest.csv")
    assert "'scans/loop.nii.gz'" in problem_line(text, 5) and "'LOOPED/t1'" in problem_line(text, 6)


# ----------------------------------------------------------------------------- 3: split conflicts

def test_visits_in_different_splits_leave_out_that_subject_only(tmp_path, run_yaml, capsys):
    site = tmp_path / "site"
    rows = good_site(site)
    save_nifti(site / "scans/bad_bl.nii.gz", brain_like(SHAPE, seed=5))
    save_nifti(site / "scans/bad_m12.nii.gz", brain_like(SHAPE, seed=6))
    write_manifest(site, rows + ["BAD,bl,scans/bad_bl.nii.gz,CN,train", "BAD,m12,scans/bad_m12.nii.gz,CN,test"])
    rc, text, data = check_and_train(site, run_yaml, capsys)
    assert_bad_rows(rc, text, data, {5: "split", 6: "split"}, "BAD", "visits of one subject are in different splits",
                    "manifest.csv")
    line = problem_line(text, 6)
    assert "row 5 visit 'bl': train" in line and "row 6 visit 'm12': test" in line


# ----------------------------------------------------------------------------- 4: links out of the site

def test_a_link_out_of_the_site_inside_a_dicom_folder_is_one_bad_row(tmp_path, run_yaml, capsys):
    from cmvim.simulations.dicom_export import write_dicom_series
    site = tmp_path / "site"
    rows = good_site(site, dicom=True)
    series = site / "BAD" / "t1"
    write_dicom_series(series, brain_like(SHAPE, seed=8), np.diag([2.0, 2.0, 2.0, 1.0]), "MR", "BAD")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (series / "IM0003.dcm").rename(outside / "IM0003.dcm")
    os.symlink(outside / "IM0003.dcm", series / "IM0003.dcm")                # a slice that lives elsewhere
    write_manifest(site, rows + ["BAD,bl,BAD/t1,CN,"])
    rc, text, data = check_and_train(site, run_yaml, capsys)
    assert_bad_rows(rc, text, data, {5: "mri"}, "BAD", "holds a link leading outside the site folder: 'IM0003.dcm'",
                    "manifest.csv")
    assert "'BAD/t1'" in problem_line(text, 5)


# ----------------------------------------------------------------------------- 5: what preprocessing refuses

@pytest.mark.parametrize("voxel_mm, data, says", [
    (100.0, None, "voxel size 100x100x100 mm: resampling onto the 4 mm grid needs a 376x376x376 grid"),
    (0.01, None, "voxel size 0.01x0.01x0.01 mm: the scan spans 0.15x0.15x0.15 mm, less than two voxels"),
    (2.0, "one voxel", "no foreground to normalise"),
])
def test_check_runs_trainings_preprocessing_and_refuses_what_it_refuses(tmp_path, run_yaml, capsys, voxel_mm, data,
                                                                         says):
    site = tmp_path / "site"
    rows = good_site(site)
    volume = brain_like((16, 16, 16))
    if data == "one voxel":                     # a valid scan of nothing: one voxel above zero
        volume = np.zeros((16, 16, 16), np.float32)
        volume[8, 8, 8] = 1000.0
    save_nifti(site / "scans/odd.nii.gz", volume, np.diag([voxel_mm] * 3 + [1.0]))
    write_manifest(site, rows + ["BAD,bl,scans/odd.nii.gz,CN,"])
    rc, text, data = check_and_train(site, run_yaml, capsys)
    assert_bad_rows(rc, text, data, {5: "mri"}, "BAD", says, "scans/odd.nii.gz")
    # check did training's work: training read every good subject from the cache check filled
    assert data.summary.cache_hits == len(GOOD)


def test_an_unexpected_exception_is_that_rows_problem_with_the_traceback_in_the_debug_log(
        tmp_path, run_yaml, capsys, caplog, monkeypatch):
    """What no check foresaw (here a MemoryError from the reader) costs the row, named by type."""
    site = tmp_path / "site"
    rows = good_site(site)
    save_nifti(site / "scans/big.nii.gz", brain_like(SHAPE))
    write_manifest(site, rows + ["BAD,bl,scans/big.nii.gz,CN,"])
    real = site_module.load_volume

    def reader(path, modality=None):
        if Path(path).name == "big.nii.gz":
            raise MemoryError("Unable to allocate 10.1 GiB for an array with shape (767, 767, 767)")
        return real(path, modality)
    monkeypatch.setattr(site_module, "load_volume", reader)
    with caplog.at_level(logging.DEBUG, logger="cmvim.data"):
        rc, text, data = check_and_train(site, run_yaml, capsys)
    assert_bad_rows(rc, text, data, {5: "mri"}, "BAD", "MemoryError while reading the scan: Unable to allocate",
                    "scans/big.nii.gz")
    (err,) = data.summary.skipped
    assert err.kind == "out of memory" and "BAD" not in err.public_message()
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug and "MemoryError" in debug[-1].getMessage() and "BAD" not in debug[-1].getMessage()


def test_a_site_of_bad_files_only_fails_check_and_training_alike(tmp_path, run_yaml, capsys):
    site = tmp_path / "site"
    site.mkdir()
    os.symlink("loop.nii.gz", site / "loop.nii.gz")
    write_manifest(site, ["BAD,bl,loop.nii.gz,CN,"])
    rc, text, data = check_and_train(site, run_yaml, capsys)
    assert rc == 1 and "FAILED: no usable subject" in text and "symlink loop" in problem_line(text, 2)
    assert data.records == [] and [err.row for err in data.summary.skipped] == [2]
