"""A site folder that is a BIDS dataset (cmvim.data.bids): real files on disk, read into the same
manifest entries manifest.csv gives, checked by `cmvim-client check`, trained on by `cmvim-sim`."""
from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmvim.client.check import check_site, manifest_ready
from cmvim.config import ConfigError
from cmvim.data import DataError, SiteData, load_volume, read_site_folder
from cmvim.run_config import CohortSpec, PreprocessConfig, RunConfig, run_config
from test_data import brain_like, save_nifti

SHAPE = (16, 16, 16)
T1_AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])          # a 64 mm box
PREPROCESS = PreprocessConfig(spatial="none", shape=16, voxel_size=4.0)
RUN = {"preprocess": {"spatial": "none", "shape": 32, "voxel_size": 4.0}}     # the tiny model's input, as a run config gives it


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    """Site caches go to the user's cache folder (never the site folder): here, the test's own."""
    monkeypatch.setenv("CMVIM_CACHE", str(tmp_path / "user-cache"))


def bids_site(root: Path, participants: list[str], header: str = "participant_id\tage\tdiagnosis\tsplit") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.10.0"}))
    (root / "participants.tsv").write_text("\n".join([header, *participants]) + "\n")
    return root


def visit(root: Path, subject: str, session: str = "", pet: bool = True, report: str | None = None,
          seed: int = 0, t1_name: str | None = None) -> None:
    """One visit's files, named as BIDS names them."""
    folder = root / subject / (f"ses-{session}" if session else "")
    stem = subject + (f"_ses-{session}" if session else "")
    save_nifti(folder / "anat" / (t1_name or f"{stem}_T1w.nii.gz"), brain_like(SHAPE, seed=seed), T1_AFFINE)
    if pet:
        save_nifti(folder / "pet" / f"{stem}_trc-FDG_pet.nii.gz", brain_like((8, 8, 8), seed=100 + seed),
                   np.diag([8.0, 8.0, 8.0, 1.0]))
    if report is not None:
        (folder / f"{stem}_report.txt").write_text(report)


def good_bids(root: Path) -> Path:
    """Six subjects, eight visits: sessions for sub-02 and sub-03, sub-03's diagnosis changing
    between them (its sessions.tsv), sub-04 without PET, sub-05 unlabelled, sub-06 put in test."""
    bids_site(root, ["sub-01\t70\tCN\tn/a", "sub-02\t74\tad\tn/a", "sub-03\t77\tMCI\tn/a", "sub-04\t68\tHC\tn/a",
                     "sub-05\t71\tn/a\tn/a", "sub-06\t80\tAlzheimer's\ttest"])
    visit(root, "sub-01", report="Normal study.", seed=1)
    visit(root, "sub-02", "01", report="Mild atrophy.", seed=2)
    visit(root, "sub-02", "02", seed=3)
    visit(root, "sub-03", "bl", seed=4)
    visit(root, "sub-03", "m12", pet=False, report="Progressive atrophy.", seed=5)
    (root / "sub-03" / "sub-03_sessions.tsv").write_text("session_id\tacq_time\tdiagnosis\n"
                                                          "ses-bl\t2019-01-01\tn/a\nses-m12\t2020-01-01\tDementia\n")
    visit(root, "sub-04", pet=False, seed=6)
    visit(root, "sub-05", seed=7)
    visit(root, "sub-06", seed=8)
    return root


def run_check(site: Path, tmp_path: Path, strict: bool = False, **config) -> tuple[int, str]:
    lines: list[str] = []
    cfg = run_config({**RUN, **config})
    rc = check_site(site, strict=strict, out=lines.append, cfg=cfg)
    return rc, "\n".join(lines)


# ----------------------------------------------------------------------------- a good dataset

def test_a_bids_site_passes_check_and_loads_with_its_visits_and_labels(tmp_path):
    site = good_bids(tmp_path / "site")
    rc, text = run_check(site, tmp_path)
    assert rc == 0, text
    assert "BIDS dataset: 8 visits, 8 usable, 0 with problems" in text
    for row in ("| subjects        |     6 |", "| visits          |     8 |", "| with PET        |     6 |",
                "| with report     |     3 |", "| label CN        |     2 |", "| label MCI       |     1 |",
                "| label AD        |     4 |", "| label unlabeled |     1 |"):
        assert row in text, row
    assert "READY: 8 subject-visits usable." in text and "manifest.csv" not in text

    data = SiteData.load(site, PREPROCESS, cache_dir=tmp_path / "cache")
    assert data.summary.skipped == [] and data.summary.warnings == [] and data.summary.source == "BIDS dataset"
    assert data.counts() == {"subjects": 6, "visits": 8, "with_pet": 6, "with_report": 3,
                             "labels": {"CN": 2, "AD": 4, "MCI": 1, "unlabeled": 1},
                             "splits": data.counts()["splits"], "skipped": 0}
    seen = {(r.entry.subject_id, r.entry.visit): (r.entry.row, r.entry.label, r.has_pet) for r in data.records}
    assert seen == {("sub-01", ""): (1, "CN", True), ("sub-02", "01"): (2, "AD", True), ("sub-02", "02"): (3, "AD", True),
                    ("sub-03", "bl"): (4, "MCI", True),              # sessions.tsv n/a: participants.tsv stands
                    ("sub-03", "m12"): (5, "AD", False),             # sessions.tsv wins for its session
                    ("sub-04", ""): (6, "CN", False), ("sub-05", ""): (7, None, True), ("sub-06", ""): (8, "AD", True)}
    splits = {(r.entry.subject_id, r.entry.visit): r.split for r in data.records}
    assert splits[("sub-06", "")] == "test"                          # the split column
    assert splits[("sub-02", "01")] == splits[("sub-02", "02")]      # visits of a subject share one
    report = next(r for r in data.records if r.entry.subject_id == "sub-03" and r.entry.visit == "m12")
    assert report.report == "Progressive atrophy." and report.entry.report.name == "sub-03_ses-m12_report.txt"
    item = data.dataset()[0]
    assert tuple(item["mri"].shape) == (1, 16, 16, 16) and item["pet_present"]
    # what may leave the site is aggregates: no BIDS subject id in the counts
    assert "sub-0" not in json.dumps(data.counts())
    assert manifest_ready(site, out=lambda line: None) == 0


def test_the_bids_config_section_chooses_the_column_and_the_label_map(tmp_path):
    site = bids_site(tmp_path / "site", ["sub-01\tSCD\ttrain", "sub-02\tprobable AD\ttrain", "sub-03\tCN\ttrain"],
                     header="participant_id\tgroup\tfold")
    for i, subject in enumerate(("sub-01", "sub-02", "sub-03")):
        visit(site, subject, seed=i)
    cfg = run_config({**RUN, "bids": {"label_column": "group", "split_column": "fold",
                                      "label_map": {"SCD": "cn", "probable AD": "AD", "CN": None}}})
    assert cfg.bids.label_map["scd"] == "CN" and cfg.bids.label_map["mci"] == "MCI"      # added to the defaults
    assert RunConfig.from_json(cfg.to_json()).bids == cfg.bids                          # as every site receives it
    manifest = read_site_folder(site, cfg.bids)
    assert {(e.subject_id, e.label, e.split) for e in manifest.entries} == {
        ("sub-01", "CN", "train"), ("sub-02", "AD", "train"), ("sub-03", None, "train")}
    with pytest.raises(ConfigError, match="bids: unknown key 'label_colum'.*did you mean 'label_column'"):
        run_config({"bids": {"label_colum": "group"}})
    with pytest.raises(ConfigError, match="bids.label_map: 'FTD' maps to 'OTHER'"):
        run_config({"bids": {"label_map": {"FTD": "other"}}})
    # without the section the default column is looked for, and its absence is said, not guessed
    manifest = read_site_folder(site)
    assert all(e.label is None for e in manifest.entries)
    assert any("no 'diagnosis' column" in w for w in manifest.warnings)


def test_several_images_of_a_visit_read_the_first_run_and_say_so(tmp_path):
    site = bids_site(tmp_path / "site", ["sub-01\t70\tCN\tn/a"])
    visit(site, "sub-01", t1_name="sub-01_run-10_T1w.nii.gz", seed=1)
    save_nifti(site / "sub-01" / "anat" / "sub-01_run-2_T1w.nii", brain_like(SHAPE, seed=2), T1_AFFINE)
    save_nifti(site / "sub-01" / "pet" / "sub-01_trc-PiB_pet.nii.gz", brain_like((8, 8, 8)), T1_AFFINE)
    (entry,) = read_site_folder(site).entries
    assert entry.mri.name == "sub-01_run-2_T1w.nii"                  # run 2 before run 10
    assert entry.pet.name == "sub-01_trc-FDG_pet.nii.gz"             # amyloid PET is not FDG
    warnings = read_site_folder(site).warnings
    assert any("reading sub-01_run-2_T1w.nii, not sub-01_run-10_T1w.nii.gz" in w for w in warnings)
    assert any("sub-01_trc-PiB_pet.nii.gz: tracer 'PiB' is not FDG" in w and "not read" in w for w in warnings)


def test_manifest_csv_wins_over_a_bids_dataset_with_a_warning(tmp_path):
    site = good_bids(tmp_path / "site")
    (site / "manifest.csv").write_text("subject_id,mri,label\nM-1,sub-01/anat/sub-01_T1w.nii.gz,AD\n")
    manifest = read_site_folder(site)
    assert manifest.format == "manifest.csv" and [e.subject_id for e in manifest.entries] == ["M-1"]
    assert any("also a BIDS dataset" in w and "manifest.csv is what is read" in w for w in manifest.warnings)
    rc, text = run_check(site, tmp_path)
    assert rc == 0 and "manifest.csv: 1 rows, 1 usable" in text and "also a BIDS dataset" in text


def test_site_folders_of_a_cohort_include_bids_datasets(tmp_path):
    good_bids(tmp_path / "cohort" / "A")
    (tmp_path / "cohort" / "B").mkdir()
    (tmp_path / "cohort" / "B" / "manifest.csv").write_text("subject_id,mri\n")
    (tmp_path / "cohort" / "notes").mkdir()
    assert CohortSpec(path=str(tmp_path / "cohort")).site_folders() == {
        "A": tmp_path / "cohort" / "A", "B": tmp_path / "cohort" / "B"}


# ----------------------------------------------------------------------------- a malformed dataset

def test_bad_visits_are_named_with_their_bids_file_and_the_good_ones_load(tmp_path):
    site = good_bids(tmp_path / "site")
    participants = site / "participants.tsv"
    participants.write_text(participants.read_text()
                            + "sub-07\t66\tFTD\tn/a\n"          # a diagnosis the map does not know (line 8)
                            + "sub-08\t70\tCN\tn/a\n"           # no T1w
                            + "sub-09\t70\tCN\tn/a\n"           # its T1w a link out of the site folder
                            + "sub-10\t70\tCN\tn/a\nsub-10\t72\tAD\tn/a\n"   # listed twice (lines 11, 12)
                            + "sub-11\t70\tCN\tvalidation\n")   # an unknown split
    visit(site, "sub-07", seed=9)
    save_nifti(site / "sub-08" / "pet" / "sub-08_pet.nii.gz", brain_like((8, 8, 8)), T1_AFFINE)
    outside = save_nifti(tmp_path / "elsewhere" / "t1.nii.gz", brain_like(SHAPE), T1_AFFINE)
    (site / "sub-09" / "anat").mkdir(parents=True)
    os.symlink(outside, site / "sub-09" / "anat" / "sub-09_T1w.nii.gz")
    visit(site, "sub-10", seed=10)
    visit(site, "sub-11", seed=11)
    visit(site, "sub-12", seed=12)                                   # a folder participants.tsv does not list
    (site / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tdiagnosis\nses-01\tAD\nses-02\tvascular\n")

    rc, text = run_check(site, tmp_path)
    assert rc == 0, text                                             # the good visits are usable
    assert "BIDS dataset: 14 visits, 8 usable, 6 with problems" in text
    assert "these visits are skipped in training" in text and "| visit # |" in text
    problems = {p.subject: p for p in SiteData.load(site, PREPROCESS, cache_dir=tmp_path / "cache").summary.skipped}
    assert set(problems) == {"sub-02", "sub-07", "sub-08", "sub-09", "sub-10", "sub-11"}
    expected = {   # subject: (file, kind, what the problem says)
        "sub-02": (site / "sub-02" / "sub-02_sessions.tsv", "unknown label", "line 3: diagnosis 'vascular' is not in"),
        "sub-07": (participants, "unknown label", "participants.tsv line 8: diagnosis 'FTD' is not in bids.label_map"),
        "sub-08": (site / "sub-08" / "anat", "missing file", "no T1w image (anat/*_T1w.nii[.gz])"),
        "sub-09": (site / "sub-09" / "anat" / "sub-09_T1w.nii.gz", "path outside site", "leads outside the site folder"),
        "sub-10": (participants, "duplicate subject", "line 12: participant 'sub-10' is listed twice (also line 11)"),
        "sub-11": (participants, "unknown split", "unknown split 'validation' in column 'split'"),
    }
    for subject, (file, kind, says) in expected.items():
        err = problems[subject]
        assert (err.file, err.kind) == (str(file), kind) and says in err.problem, (subject, err)
        assert subject in str(err) and str(file) in str(err)         # the hospital sees who and where
        assert subject not in err.public_message()                   # what may leave the site does not
        assert says in text                                          # check's table shows it
    assert problems["sub-02"].row == 3 and "ses-02" in problems["sub-02"].problem   # the session, not the subject
    assert "sub-12 is not in participants.tsv" in text               # loaded, unlabelled, and said
    loaded = SiteData.load(site, PREPROCESS, cache_dir=tmp_path / "cache")
    assert {(r.entry.subject_id, r.entry.visit) for r in loaded.records} >= {("sub-02", "01"), ("sub-12", "")}
    assert loaded.counts()["labels"]["unlabeled"] == 2               # sub-05 and sub-12
    assert run_check(site, tmp_path, strict=True)[0] == 1


@pytest.mark.parametrize("case, file, says", [
    ("no participant_id", "participants.tsv", "no 'participant_id' column (found 'participant': a typo?)"),
    ("commas", "participants.tsv", "columns are separated by tabs, not commas"),
    ("broken description", "dataset_description.json", "not valid JSON"),
    ("description a list", "dataset_description.json", "not a JSON object"),
    ("participants outside", "participants.tsv", "leads outside the site folder"),
])
def test_a_malformed_bids_table_is_fatal_and_named(tmp_path, case, file, says):
    site = good_bids(tmp_path / "site")
    if case == "no participant_id":
        (site / "participants.tsv").write_text("participant\tdiagnosis\nsub-01\tCN\n")
    elif case == "commas":
        (site / "participants.tsv").write_text("participant_id,diagnosis\nsub-01,CN\n")
    elif case == "broken description":
        (site / "dataset_description.json").write_text('{"Name": "test",')
    elif case == "description a list":
        (site / "dataset_description.json").write_text("[]")
    else:
        (tmp_path / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-01\tCN\n")
        (site / "participants.tsv").unlink()
        os.symlink(tmp_path / "participants.tsv", site / "participants.tsv")
    with pytest.raises(DataError) as raised:
        read_site_folder(site)
    assert raised.value.file == str(site / file) and says in raised.value.problem
    rc, text = run_check(site, tmp_path)
    assert rc == 1 and "FATAL" in text and str(site / file) in text and says in text
    lines: list[str] = []
    assert manifest_ready(site, out=lines.append) == 1 and str(site / file) in lines[0]


def test_neither_manifest_nor_bids_is_fatal_and_says_both(tmp_path):
    (tmp_path / "site").mkdir()
    with pytest.raises(DataError, match="no manifest.csv in the site folder, and no dataset_description.json"):
        read_site_folder(tmp_path / "site")


# ----------------------------------------------------------------------------- progress bars

def _on_a_terminal(args: list[str]) -> str:
    """What `args` writes to stderr when stderr is a terminal (a pseudo-terminal, 100 columns)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:                       # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


def test_check_draws_a_progress_bar_on_a_terminal_only(tmp_path):
    site = good_bids(tmp_path / "site")
    config = tmp_path / "run.yaml"                          # these small volumes are no heads: template space
    config.write_text("preprocess: {spatial: none, shape: 32}\n")
    command = [sys.executable, "-m", "cmvim.client.cli", "check", "--data", str(site), "--config", str(config)]
    drawn = _on_a_terminal(command)
    assert "preprocessing:" in drawn and "/8 [" in drawn and "visit/s" in drawn
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "READY: 8 subject-visits usable." in piped.stdout
    assert "preprocessing" not in piped.stderr and "%|" not in piped.stderr     # a log gets no bar lines
    assert "checked" not in piped.stdout


def test_the_progress_callback_still_reports_every_visit(tmp_path):
    site = good_bids(tmp_path / "site")
    calls = []
    SiteData.load(site, PREPROCESS, cache_dir=tmp_path / "cache", progress=lambda n, total: calls.append((n, total)))
    assert calls == [(n, 8) for n in range(1, 9)]


# ----------------------------------------------------------------------------- synthetic cohorts and a run

def test_cmvim_cohort_writes_bids_datasets_that_pass_check(tmp_path):
    pytest.importorskip("nilearn")
    from cmvim.simulations.cohort_cli import main as cohort_main
    out = tmp_path / "bids"
    args = ["--sites", "2", "--subjects", "4", "--shape", "32", "--seed", "5", "--workers", "1"]
    assert cohort_main([*args, "--out", str(out), "--format", "bids"]) == 0
    assert cohort_main([*args, "--out", str(tmp_path / "manifest")]) == 0
    for name in ("A", "B"):
        site = out / name
        assert not (site / "manifest.csv").exists() and (site / "participants.tsv").exists()
        rc, text = run_check(site, tmp_path)
        assert rc == 0 and "BIDS dataset: 4 visits, 4 usable, 0 with problems" in text and "Warnings" not in text
    # the same subjects as the manifest cohort of that seed: site A's T1 volumes, NIfTI in both
    manifest_rows = (tmp_path / "manifest" / "A" / "manifest.csv").read_text().splitlines()[1:]
    participants = (out / "A" / "participants.tsv").read_text().splitlines()[1:]
    for row, participant in zip(manifest_rows, participants):
        subject = participant.split("\t")[0]
        np.testing.assert_array_equal(load_volume(tmp_path / "manifest" / "A" / row.split(",")[1])[0],
                                      load_volume(out / "A" / subject / "anat" / f"{subject}_T1w.nii.gz")[0])
        assert participant.split("\t")[3] == (row.split(",")[4] or "n/a")   # the diagnosis, n/a when unlabelled


def test_a_simulation_trains_on_bids_site_folders(tmp_path):
    """cmvim-sim with cohort.path at BIDS datasets: sites found, loaded, trained and scored."""
    pytest.importorskip("nilearn")
    from cmvim.simulations.cohort import CohortConfig, generate_cohort
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, CohortConfig(sites=2, subjects=24, shape=32, seed=2, effect_scale=5.0, pet_missing=0.0,
                                         format="bids"), measure=False)
    assert (cohort / "A" / "dataset_description.json").exists() and not (cohort / "A" / "manifest.csv").exists()
    cfg = {"seed": 0, "cohort": {"path": str(cohort)}, "model": {"preset": "tiny"},
           "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25}, "split_fractions": [0.6, 0.0, 0.4],
           "pretrain": {"rounds": 1, "local_epochs": 1, "batch_size": 6},
           "finetune": {"rounds": 2, "local_epochs": 2, "batch_size": 4, "lr": 0.002},
           "modality_dropout": 0.0, "strategy": {"name": "fedavg", "min_nodes": 2},
           "evaluation": {"bootstrap": 50, "every_round": False}}
    config, out = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "cmvim.simulations.cli", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "site A: 24 subject-visits" in proc.stdout and "site B: 24 subject-visits" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"A", "B"}
    for name, site in metrics["sites"].items():
        assert site["auc"] is not None and math.isfinite(site["auc"]) and site["n_test"] > 0, (name, site)
    participants = [line.split("\t")[0] for name in "AB"
                    for line in (cohort / name / "participants.tsv").read_text().splitlines()[1:]]
    assert not [p for p in participants if p in (out / "metrics.json").read_text() + proc.stdout]
