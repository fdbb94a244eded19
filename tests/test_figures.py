"""What a run leaves for a person to look at: the loss and validation AUC curves, the TensorBoard
logs and the pretrained model's reconstruction figure, from real histories, real NIfTI files and
a real (tiny) model; and `--set KEY=VALUE` on cmvim-sim and cmvim-server."""
import argparse
import json
import math
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from cmvim.config import ConfigError, load_yaml
from cmvim.figures import AUC_FIGURE, LOSS_FIGURE, final_round, mean_series, plot_curves
from cmvim.reconstruction import RECONSTRUCTION_FIGURE, draw_reconstruction, reconstruction_figure
from cmvim.run_config import overridden, run_config
from cmvim.weights import initial_state

PNG = b"\x89PNG\r\n\x1a\n"


def round_entry(phase: str, round_: int, losses: dict, examples: dict, aucs: dict | None = None, **extra) -> dict:
    return {"phase": phase, "round": round_, "seconds": 10.0 + round_,
            "train": {s: {"loss": loss, "num-examples": examples[s], "work-seconds": 4.0} for s, loss in losses.items()},
            "evaluate": {s: {"auc": auc, "num-examples": 5} for s, auc in (aucs or {}).items()},
            "rejected": [], "site_work_seconds": 6.0, "overhead_seconds": 4.0 + round_, **extra}


EXAMPLES = {"A": 30, "B": 10}


def history() -> list[dict]:
    """Two pretraining rounds, three validated fine-tuning rounds selected by best_val (round 2
    best), site B under DP-SGD in round 2 of pretraining reporting its epsilon."""
    return [
        round_entry("pretrain", 1, {"A": 2.0, "B": 4.0}, EXAMPLES),
        round_entry("pretrain", 2, {"A": 1.5, "B": 3.0}, EXAMPLES),
        round_entry("finetune", 1, {"A": 0.70, "B": 0.68}, EXAMPLES, {"A": 0.60, "B": 0.70}, selected=True),
        round_entry("finetune", 2, {"A": 0.60, "B": 0.62}, EXAMPLES, {"A": 0.80, "B": 0.90}, selected=True),
        round_entry("finetune", 3, {"A": 0.50, "B": 0.58}, EXAMPLES, {"A": 0.70, "B": float("nan")}, selected=False),
    ]


def is_png(path: Path, min_bytes: int = 10_000) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > min_bytes


def test_curves_from_a_round_history(tmp_path):
    runs = history()
    # the numbers drawn: the loss mean weighted by examples, the AUC mean over the sites that scored
    assert mean_series(runs, "pretrain", "train") == [(1, pytest.approx((2.0 * 30 + 4.0 * 10) / 40)),
                                                      (2, pytest.approx((1.5 * 30 + 3.0 * 10) / 40))]
    assert mean_series(runs, "finetune", "evaluate") == [(1, pytest.approx(0.65)), (2, pytest.approx(0.85)),
                                                         (3, pytest.approx(0.70))]
    assert final_round(runs) == (2, "best validation AUC")
    assert final_round([dict(e, selected=False) for e in runs]) == (3, "last round")      # no round validated
    assert final_round([{k: v for k, v in e.items() if k != "selected"} for e in runs]) == (3, "last round")

    paths = plot_curves(tmp_path, runs, probe_rounds=1)
    assert paths == [tmp_path / LOSS_FIGURE, tmp_path / AUC_FIGURE]
    assert all(is_png(p) for p in paths)

    # a run that validated no round: no AUC figure, and an earlier run's is not left behind
    unvalidated = [dict(e, evaluate={}) for e in runs]
    assert plot_curves(tmp_path, unvalidated) == [tmp_path / LOSS_FIGURE]
    assert not (tmp_path / AUC_FIGURE).exists()
    # under DP-SGD the sites keep their loss: the panel says so, the figure is still drawn
    dp = [dict(e, train={s: {"epsilon": 1.0} for s in e["train"]}) for e in runs]
    assert plot_curves(tmp_path, dp) == [tmp_path / LOSS_FIGURE, tmp_path / AUC_FIGURE]


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under `log_dir`, parsed from the TFRecord
    framing (u64 length, u32 crc, payload, u32 crc) with tensorboardX's Event protobuf."""
    from tensorboardX.proto.event_pb2 import Event
    scalars: dict[str, dict[int, float]] = {}
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_logs_hold_every_rounds_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    from cmvim.tracking import write_tensorboard
    runs = history()
    runs[1]["train"]["B"]["epsilon"] = 2.5
    runs[4]["central_dp"] = {"epsilon": 0.75, "delta": 1e-5, "releases": 5}
    sites = {"A": {"auc": 0.81, "n_test": 12}, "B": {"auc": 0.69, "n_test": 8}}
    baselines = {"linear": {"sites": {"A": {"auc": 0.77}, "B": {"auc": None}}, "pooled": {"auc": 0.74},
                            "mean_auc": 0.77}}
    log_dir = write_tensorboard(tmp_path, runs, sites, {"auc": 0.76}, baselines)
    assert log_dir == tmp_path / "tensorboard"
    # written again (a resumed run's final report): one event file, the same numbers
    write_tensorboard(tmp_path, runs, sites, {"auc": 0.76}, baselines)
    scalars = read_scalars(log_dir)
    assert scalars["pretrain/loss/A"] == {1: 2.0, 2: 1.5}
    assert scalars["pretrain/loss/mean"][1] == pytest.approx(2.5)
    assert scalars["finetune/loss/B"][3] == pytest.approx(0.58)
    assert scalars["finetune/val_auc/B"] == {1: pytest.approx(0.7), 2: pytest.approx(0.9)}   # NaN left out
    assert scalars["finetune/val_auc/mean"][2] == pytest.approx(0.85)
    assert scalars["pretrain/epsilon/B"] == {2: 2.5}
    assert scalars["finetune/central_epsilon"] == {3: 0.75}
    assert scalars["finetune/round_seconds"] == {1: 11.0, 2: 12.0, 3: 13.0}
    assert scalars["pretrain/site_work_seconds"] == {1: 6.0, 2: 6.0}
    assert scalars["pretrain/overhead_seconds"] == {1: 5.0, 2: 6.0}
    assert scalars["test/auc/A"] == {0: pytest.approx(0.81)}
    assert scalars["test/auc/mean"][0] == pytest.approx(0.75)
    assert scalars["test/auc/pooled"][0] == pytest.approx(0.76)
    assert scalars["test/auc_linear/A"][0] == pytest.approx(0.77) and "test/auc_linear/B" not in scalars
    assert "pretrain/val_auc/mean" not in scalars


def test_final_report_writes_the_figures_and_lists_them(tmp_path, capsys):
    from cmvim.server.central_dp import CentralDP
    from cmvim.server.report import final_report
    cfg = run_config({"finetune": {"select": "best_val", "probe_rounds": 1}})
    sites = {"A": {"auc": 0.8, "acc": 0.7, "n_test": 10}, "B": {"auc": 0.7, "acc": 0.6, "n_test": 10}}
    histograms = {"A": ([0] * 5 + [1] * 5, [1] * 5 + [0] * 5),          # positive / negative score histograms
                  "B": ([0] * 4 + [1] * 5 + [0], [1] * 3 + [0] * 2 + [1, 1] + [0] * 3)}
    final_report(cfg, tmp_path, sites, histograms, history(), [], 60.0, CentralDP(cfg.central_dp, 2))
    for name in (LOSS_FIGURE, AUC_FIGURE, "roc_A.png", "roc_pooled.png"):
        assert is_png(tmp_path / name), name
    assert read_scalars(tmp_path / "tensorboard")["test/auc/B"] == {0: pytest.approx(0.7)}
    summary = (tmp_path / "summary.md").read_text()
    assert "## Figures" in summary
    for text in ("`roc_A.png`, `roc_B.png`, `roc_pooled.png`", f"`{LOSS_FIGURE}`", f"`{AUC_FIGURE}`",
                 "`tensorboard --logdir tensorboard`"):
        assert text in summary, text
    assert RECONSTRUCTION_FIGURE not in summary                # not drawn in this folder: not listed
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in capsys.readouterr().out


# -- the reconstruction figure --------------------------------------------------------------
def write_scan(path: Path, seed: int, shape=(40, 48, 40), voxel: float = 4.0) -> Path:
    """A head-like NIfTI: an ellipsoid with a smooth intensity pattern and a little noise, in mm
    world space centred on the origin (what the preprocessing pipeline expects of MRI and PET)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    radius = np.sqrt(sum(((grid[i] - centre[i]) / (shape[i] * 0.38)) ** 2 for i in range(3)))
    data = np.clip(1 - radius, 0, None) * 100 * (1 + 0.3 * np.sin(grid[0] / 3 + seed)) + rng.normal(0, 1, shape)
    affine = np.diag([voxel] * 3 + [1.0])
    affine[:3, 3] = -centre * voxel
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def tiny_cfg(**overrides):
    return run_config({"model": {"preset": "tiny", **overrides}, "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
                       "pretrain": {"rounds": 1}})


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_reconstruction_figure_masks_the_configured_share(tmp_path, mask_ratio):
    cfg = tiny_cfg(mask_ratio=mask_ratio)
    state = initial_state(cfg, "pretrain")
    mri, pet = write_scan(tmp_path / "t1.nii.gz", 0), write_scan(tmp_path / "fdg.nii.gz", 1)
    result = reconstruction_figure(cfg, state, mri, pet, tmp_path / "recon.png", seed=3)
    assert result.path == tmp_path / "recon.png" and is_png(result.path, 30_000)
    # tiny: 32^3 in 8^3 patches = 64 per modality; mask ratio r masks round(64 r) of them
    assert result.masked_fraction == {"mri": mask_ratio, "pet": mask_ratio}
    for m in ("mri", "pet"):
        assert math.isfinite(result.masked_mse[m]) and result.masked_mse[m] > 0
        assert math.isfinite(result.baseline_mse[m]) and result.baseline_mse[m] > 0
    # the masking comes from the seed: the same draw, the same numbers
    again = reconstruction_figure(cfg, state, mri, pet, tmp_path / "again.png", seed=3)
    assert again.masked_mse == result.masked_mse
    # no PET: the MRI alone is drawn
    alone = reconstruction_figure(cfg, state, mri, None, tmp_path / "mri_only.png")
    assert set(alone.masked_fraction) == {"mri"} and is_png(alone.path)


def test_reconstruction_uses_the_pretrained_weights_and_the_models_masking(tmp_path):
    """A decoder whose prediction head outputs 0.5 everywhere (weights loaded from the state)
    reconstructs every masked voxel as 0.5: the error equals the one computed by hand on the
    preprocessed scan, over the patches the model's masking draws from the seed."""
    from cmvim.data import Volume, build_pipeline, load_volume
    from cmvim.model.patch import patchify
    cfg = tiny_cfg()
    state = initial_state(cfg, "pretrain")
    for m in ("mri", "pet"):
        state[f"decoders.{m}.pred.weight"] = torch.zeros_like(state[f"decoders.{m}.pred.weight"])
        state[f"decoders.{m}.pred.bias"] = torch.full_like(state[f"decoders.{m}.pred.bias"], 0.5)
    mri = write_scan(tmp_path / "t1.nii.gz", 0)
    result = reconstruction_figure(cfg, state, mri, None, tmp_path / "recon.png", seed=11)
    volume = build_pipeline(cfg.preprocess)({"mri": Volume(*load_volume(mri, "mri"))})["mri"].data
    values = patchify(torch.from_numpy(volume).reshape(1, 1, 32, 32, 32), 8)[0]      # (64 patches, 8^3)
    # cmvim.model.patch.random_masking: the MRI's noise is the generator's first draw; 16 patches stay
    noise = torch.rand(1, 64, generator=torch.Generator().manual_seed(11))
    masked = torch.argsort(noise, dim=1)[0, 16:]
    expected = float(((values[masked] - 0.5) ** 2).mean())
    assert result.masked_mse["mri"] == pytest.approx(expected, rel=1e-5)
    visible = torch.ones(64, dtype=torch.bool)
    visible[masked] = False
    assert result.baseline_mse["mri"] == pytest.approx(
        float(((values[masked] - values[visible].mean()) ** 2).mean()), rel=1e-5)


def write_site(root: Path, name: str, with_pet: bool = True) -> Path:
    site = root / name
    site.mkdir(parents=True)
    write_scan(site / "sub-0001_t1.nii.gz", 0)
    rows = ["subject_id,mri,pet,label", f"sub-0001,sub-0001_t1.nii.gz,{'sub-0001_fdg.nii.gz' if with_pet else ''},CN"]
    if with_pet:
        write_scan(site / "sub-0001_fdg.nii.gz", 1)
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    return site


def test_the_example_subject_comes_from_the_config_or_the_cohort(tmp_path):
    state = initial_state(tiny_cfg(), "pretrain")
    said = []
    # the cohort at the coordinator (cmvim-sim's): the first site's first subject-visit, named by neither
    write_site(tmp_path / "cohort", "A")
    cfg = run_config(overridden({"model": "tiny", "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25}},
                                [f"cohort.path={tmp_path / 'cohort'}"]))
    (tmp_path / "run").mkdir()
    result = draw_reconstruction(cfg, state, tmp_path / "run", say=said.append)
    assert result.masked_fraction == {"mri": 0.75, "pet": 0.75} and is_png(tmp_path / "run" / RECONSTRUCTION_FIGURE)
    assert said and "site A's first subject-visit" in said[-1] and "sub-0001" not in said[-1]
    # figures.example_subject wins, PET optional
    mri = write_scan(tmp_path / "mine_t1.nii.gz", 5)
    cfg = run_config(overridden({"model": "tiny", "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25}},
                                [f"figures.example_subject.mri={mri}", f"cohort.path={tmp_path / 'cohort'}"]))
    result = draw_reconstruction(cfg, state, tmp_path / "run", say=said.append)
    assert set(result.masked_fraction) == {"mri"} and "figures.example_subject" in said[-1]
    # neither: one line saying how to get the figure, and an earlier run's figure is gone
    cfg = run_config({"model": "tiny", "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25}})
    assert draw_reconstruction(cfg, state, tmp_path / "run", say=said.append) is None
    assert "figures.example_subject" in said[-1] and not (tmp_path / "run" / RECONSTRUCTION_FIGURE).exists()
    # a site folder that cannot be read (a broken manifest.csv, which wins over the BIDS files): skipped, said
    broken = tmp_path / "bids" / "A"
    broken.mkdir(parents=True)
    (broken / "manifest.csv").write_text("participant,t1\n")
    (broken / "dataset_description.json").write_text("{}")
    cfg = run_config({"model": "tiny", "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
                      "cohort": {"path": str(tmp_path / "bids")}})
    assert draw_reconstruction(cfg, state, tmp_path / "run", say=said.append) is None
    assert said[-1].startswith("reconstruction figure skipped")
    # a missing scan: skipped, naming what is wrong but not the subject's file
    (tmp_path / "cohort" / "A" / "sub-0001_t1.nii.gz").unlink()
    cfg = run_config({"model": "tiny", "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
                      "cohort": {"path": str(tmp_path / "cohort")}})
    assert draw_reconstruction(cfg, state, tmp_path / "run", say=said.append) is None
    assert said[-1].startswith("reconstruction figure skipped") and "sub-0001" not in said[-1]


def test_the_runner_draws_the_figure_and_never_fails_the_run_over_it(tmp_path, capsys):
    from cmvim.server.runner import FederatedRun
    write_site(tmp_path / "cohort", "A", with_pet=False)
    cfg = run_config({"model": "tiny", "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
                      "cohort": {"path": str(tmp_path / "cohort")}})
    run = FederatedRun(cfg, tmp_path / "run", grid=None)
    run.out_dir.mkdir()
    run._reconstruction_figure(initial_state(cfg, "pretrain"))
    assert is_png(tmp_path / "run" / RECONSTRUCTION_FIGURE)
    run._reconstruction_figure({"not": torch.zeros(1)})                 # weights of another model
    out = capsys.readouterr().out
    assert "reconstruction figure not drawn (RuntimeError" in out and "the run goes on" in out


# -- --set KEY=VALUE ---------------------------------------------------------------------------
QUICK = Path(__file__).parents[1] / "simulations" / "configs" / "quick.yaml"


def test_set_overrides_reach_the_parsed_config():
    data = load_yaml(QUICK)
    untouched = load_yaml(QUICK)
    cfg = run_config(overridden(data, ["finetune.rounds=8", "model.depth=2", "baselines=[linear, local]",
                                       "strategy.norm_bound=null", "pretrain.lr=2e-3", "device=cuda:0"]))
    assert (cfg.finetune.rounds, cfg.model.depth, cfg.baselines) == (8, 2, ["linear", "local"])
    assert cfg.strategy.norm_bound is None and cfg.pretrain.lr == 0.002 and cfg.device == "cuda:0"
    assert cfg.model.embed_dim == 96 and cfg.finetune.probe_rounds == 5       # the rest stays the file's
    # checked like the file: 3 rounds cannot hold the file's 5 probe rounds
    with pytest.raises(ConfigError, match="probe_rounds must lie between 0 and finetune.rounds"):
        run_config(overridden(data, ["finetune.rounds=3"]))
    assert data == untouched and data["finetune"]["rounds"] != 8               # the file's mapping untouched
    # a model given as a preset name opens up for a dotted key; no model section means the default preset
    assert run_config(overridden({"model": "tiny"}, ["model.depth=3"])).model.depth == 3
    tiny = run_config(overridden({}, ["model.depth=3"])).model
    assert (tiny.depth, tiny.report.dim) == (3, 48)


def test_a_bad_set_gives_the_yamls_error_or_a_usage_error(tmp_path):
    with pytest.raises(ConfigError) as from_yaml:
        run_config({"finetune": {"roundz": 3}})
    with pytest.raises(ConfigError) as from_set:
        run_config(overridden({}, ["finetune.roundz=3"]))
    assert str(from_set.value) == str(from_yaml.value) and "'roundz'" in str(from_set.value)
    with pytest.raises(ConfigError, match="expected int, got 'many'"):
        run_config(overridden({}, ["finetune.rounds=many"]))
    for bad in ("finetune.rounds", "=3", "finetune..rounds=3"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            overridden({}, [bad])
    with pytest.raises(ConfigError, match="seed is 0, a value, not a section"):
        overridden({"seed": 0}, ["seed.value=1"])


def test_cmvim_sim_runs_the_overridden_config(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    pytest.importorskip("nilearn")
    from cmvim.simulations import assembly, cli
    seen = {}

    def run_federated(request, prepared, n_sites, verbose):
        seen["cfg"] = prepared.cfg          # what FederatedRun would run (and record in config.yaml)

    monkeypatch.setattr(assembly, "prepare_sites", lambda cfg, say: {"A": None, "B": None})
    monkeypatch.setattr(cli, "run_federated", run_federated)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"cohort": {"path": str(tmp_path)}, "model": "tiny",
                                      "preprocess": {"spatial": "none", "shape": 32}, "finetune": {"rounds": 5}}))
    code = cli.main(["--config", str(config), "--out", str(tmp_path / "out"), "--set", "finetune.rounds=2",
                     "--set", "model.depth=1", "--set", "baselines=[linear]"])
    assert code == 1                                 # the fake run wrote no metrics.json
    cfg = seen["cfg"]
    assert (cfg.finetune.rounds, cfg.model.depth, cfg.baselines) == (2, 1, ["linear"])
    assert "with --set finetune.rounds=2 model.depth=1 baselines=[linear]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", str(config), "--set", "finetune.roundz=2"])
    assert exit_.value.code == 2 and "unknown key 'roundz'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", str(config), "--set", "finetune.rounds"])
    assert exit_.value.code == 2 and "argument --set" in capsys.readouterr().err


def test_cmvim_server_submits_the_overridden_config(tmp_path, monkeypatch, capsys):
    from cmvim.server import deploy
    monkeypatch.setattr(deploy.signal, "signal", lambda *args: None)     # serve's SIGTERM handler: not pytest's
    submitted = {}
    for step in ("write_connection", "start_superlink", "register_sites", "stop"):
        monkeypatch.setattr(deploy.Coordinator, step, lambda self: None)
    monkeypatch.setattr(deploy.Coordinator, "wait_for_sites", lambda self, wanted: submitted.update(wanted=wanted))

    def submit(self):
        submitted["config"] = self.args.config
        return "7"
    monkeypatch.setattr(deploy.Coordinator, "submit", submit)
    monkeypatch.setattr(deploy.Coordinator, "wait_for_run", lambda self, run_id: "finished:completed")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", "preprocess": {"spatial": "none", "shape": 32}, "strategy": {"min_nodes": 2}}))
    parser = argparse.ArgumentParser()
    deploy.add_arguments(parser)
    args = parser.parse_args(["--config", str(config), "--out", str(tmp_path / "out"), "--insecure",
                              "--set", "strategy.min_nodes=3", "--set", "finetune.rounds=4"])
    assert deploy.serve(args) == 1                   # nothing ran: no metrics.json
    written = submitted["config"]
    assert written == tmp_path / "out" / ".superlink" / "run-config.yaml" and submitted["wanted"] == 3
    cfg = run_config(load_yaml(written))             # what the ServerApp reads (server/app.py)
    assert (cfg.strategy.min_nodes, cfg.finetune.rounds, cfg.model.depth) == (3, 4, 2)
    assert yaml.safe_load(config.read_text())["strategy"]["min_nodes"] == 2   # the user's file untouched
    args = parser.parse_args(["--config", str(config), "--out", str(tmp_path / "out"), "--set", "strategy.min_node=3"])
    assert deploy.serve(args) == 2 and "unknown key 'min_node'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(config), "--out", str(tmp_path / "out"), "--set", "nothing"])


@pytest.mark.slow
def test_a_simulated_run_leaves_its_figures_and_the_overridden_config(easy_cohort, tmp_path):
    """cmvim-sim end to end on the tiny model (minutes): --set reaches the run and its config.yaml,
    and the results folder holds the curves, the reconstruction and the TensorBoard logs."""
    import os
    import subprocess
    import sys
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "cohort": {"path": str(easy_cohort)}, "model": {"preset": "tiny"},
        "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25}, "split_fractions": [0.6, 0.1, 0.3],
        "pretrain": {"rounds": 1, "batch_size": 6}, "finetune": {"rounds": 3, "batch_size": 4, "select": "best_val"},
        "strategy": {"min_nodes": 2}, "evaluation": {"bootstrap": 50, "every_round": True}}))
    out = tmp_path / "run"
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "cmvim.simulations.cli", "--config", str(config), "--out", str(out),
                           "--set", "finetune.rounds=2", "--set", "pretrain.rounds=2"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["pretrain"]["rounds"], recorded["finetune"]["rounds"]) == (2, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["phase"], r["round"]) for r in metrics["rounds"]] == [
        ("pretrain", 1), ("pretrain", 2), ("finetune", 1), ("finetune", 2)]
    for name in (LOSS_FIGURE, AUC_FIGURE, RECONSTRUCTION_FIGURE):
        assert is_png(out / name), name
    assert "reconstruction figure: " in proc.stdout
    scalars = read_scalars(out / "tensorboard")
    assert set(scalars["pretrain/loss/A"]) == {1, 2}
    assert scalars["test/auc/A"][0] == pytest.approx(metrics["sites"]["A"]["auc"])
    summary = (out / "summary.md").read_text()
    assert f"`{RECONSTRUCTION_FIGURE}`" in summary and f"`{AUC_FIGURE}`" in summary
