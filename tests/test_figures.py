"""`--set KEY=VALUE` on cmvim-sim and cmvim-server: settings over the config file's, checked
like the file, and what the run really gets."""
import argparse
from pathlib import Path

import pytest
import yaml

from cmvim.config import ConfigError, load_yaml
from cmvim.run_config import overridden, run_config


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
