"""What a run leaves for a person to look at: the loss and validation AUC curves and the
TensorBoard logs, from real round histories; and `--set KEY=VALUE` on cmvim-sim and cmvim-server."""
import argparse
import struct
from pathlib import Path

import pytest
import yaml

from cmvim.config import ConfigError, load_yaml
from cmvim.figures import AUC_FIGURE, LOSS_FIGURE, final_round, mean_series, plot_curves
from cmvim.run_config import overridden, run_config

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
    pytest.importorskip("flwr")
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
    assert "reconstruction.png" not in summary                 # not drawn in this folder: not listed
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in capsys.readouterr().out


# -- --set KEY=VALUE ---------------------------------------------------------------------------
QUICK = Path(__file__).parents[1] / "simulations" / "configs" / "quick.yaml"


def test_set_overrides_reach_the_parsed_config():
    data = load_yaml(QUICK)
    cfg = run_config(overridden(data, ["finetune.rounds=8", "model.depth=2", "baselines=[linear, local]",
                                       "strategy.norm_bound=null", "pretrain.lr=2e-3", "device=cuda:0"]))
    assert (cfg.finetune.rounds, cfg.model.depth, cfg.baselines) == (8, 2, ["linear", "local"])
    assert cfg.strategy.norm_bound is None and cfg.pretrain.lr == 0.002 and cfg.device == "cuda:0"
    assert cfg.model.embed_dim == 96 and cfg.finetune.probe_rounds == 5       # the rest stays the file's
    # checked like the file: 3 rounds cannot hold the file's 5 probe rounds
    with pytest.raises(ConfigError, match="probe_rounds must lie between 0 and finetune.rounds"):
        run_config(overridden(data, ["finetune.rounds=3"]))
    assert data["finetune"]["rounds"] == 11                                   # the file's mapping untouched
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
    from cmvim.simulations import cli
    seen = {}

    def run_federated(cfg, out_dir, n_sites, resume, verbose, sites=None):
        seen["cfg"] = cfg          # what FederatedRun would run (and record in config.yaml)

    monkeypatch.setattr(cli, "prepare_sites", lambda cfg: {"A": None, "B": None})
    monkeypatch.setattr(cli, "run_federated", run_federated)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"cohort": {"path": str(tmp_path)}, "model": "tiny",
                                      "preprocess": {"shape": 32}, "finetune": {"rounds": 5}}))
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
    pytest.importorskip("flwr")
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
    config.write_text(yaml.safe_dump({"model": "tiny", "preprocess": {"shape": 32}, "strategy": {"min_nodes": 2}}))
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
