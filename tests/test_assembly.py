"""One run assembly (server/assembly.py): cmvim-sim, `flwr run .` (simulations/app.py) and
cmvim-server (server/deploy.py, then server/app.py in the SuperLink's ServerApp) turn the same
config file and overrides into the same RunConfig through the same steps, and a simulation run
through Flower's CLI gets the device and GPU checks cmvim-sim has."""
import argparse
import dataclasses
import types

import pytest
import yaml

from cmvim.config import ConfigError
from cmvim.run_config import run_config
from cmvim.server import app as deployment_app
from cmvim.server import assembly, deploy
from cmvim.server.assembly import DEPLOYMENT, RunRequest
from cmvim.simulations import app as simulation_app
from cmvim.simulations import cli
from cmvim.simulations.assembly import SIMULATION


def _config(tmp_path, easy_cohort):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "cohort": {"path": str(easy_cohort)}, "model": "tiny", "preprocess": {"spatial": "none", "shape": 32},
        "split_fractions": [0.6, 0.1, 0.3], "finetune": {"rounds": 5}, "strategy": {"min_nodes": 2},
        "baselines": ["linear"]}))
    return config


def _served(monkeypatch) -> list:
    """What each ServerApp would serve: (request, prepared), in place of FederatedRun."""
    served = []
    monkeypatch.setattr(assembly, "serve", lambda grid, context, request, prepared: served.append((request, prepared)))
    return served


def test_every_entry_assembles_the_same_run(tmp_path, monkeypatch, easy_cohort):
    config = _config(tmp_path, easy_cohort)
    out = tmp_path / "out"
    sets = ["finetune.rounds=2", "model.depth=1", "strategy.name=fedprox"]
    run_cfg = {"config-file": str(config), "out-dir": str(out), "resume": "false",
               "finetune.rounds": 2, "model.depth": 1, "strategy.name": "fedprox"}

    simulated = []
    monkeypatch.setattr(cli, "run_federated", lambda request, prepared, n, verbose: simulated.append((request, prepared)))
    assert cli.main(["--config", str(config), "--out", str(out)] + [a for s in sets for a in ("--set", s)]) == 1
    served = _served(monkeypatch)
    simulation_app.main(None, types.SimpleNamespace(run_config=run_cfg))        # `flwr run .`
    deployment_app.main(None, types.SimpleNamespace(run_config=run_cfg))        # cmvim-server's ServerApp
    (sim_request, sim), (flwr_request, flwr_run), (deploy_request, deployed) = simulated + served

    asked = run_config(yaml.safe_load(config.read_text()))
    assert (sim.cfg.finetune.rounds, sim.cfg.model.depth, sim.cfg.strategy.name) == (2, 1, "fedprox")
    assert asked.finetune.rounds == 5                                  # the file itself untouched
    assert flwr_run.cfg == sim.cfg                                     # same config, same device
    assert sim.cfg.device == "cpu" and deployed.cfg.device == "auto"   # a simulation keeps auto off the GPU
    assert deployed.cfg == dataclasses.replace(sim.cfg, device="auto")
    assert sim_request.out_dir.resolve() == flwr_request.out_dir == deploy_request.out_dir == out.resolve()
    assert flwr_run.site_slots == sim.site_slots >= 1 and deployed.site_slots is None
    assert callable(sim.baselines) and callable(flwr_run.baselines) and deployed.baselines is None

    # cmvim-server writes the overridden config the SuperLink's ServerApp reads: the same again
    monkeypatch.setattr(deploy.signal, "signal", lambda *args: None)
    submitted = {}
    for step in ("write_connection", "start_superlink", "register_sites", "wait_for_sites", "stop"):
        monkeypatch.setattr(deploy.Coordinator, step, lambda self, *args: None)
    monkeypatch.setattr(deploy.Coordinator, "submit", lambda self: submitted.setdefault("config", self.args.config))
    monkeypatch.setattr(deploy.Coordinator, "wait_for_run", lambda self, run_id: "finished:completed")
    parser = argparse.ArgumentParser()
    deploy.add_arguments(parser)
    deploy.serve(parser.parse_args(["--config", str(config), "--out", str(out), "--insecure"]
                                   + [a for s in sets for a in ("--set", s)]))
    deployment_app.main(None, types.SimpleNamespace(run_config={"config-file": str(submitted["config"]),
                                                                "out-dir": str(out)}))
    assert served[-1][1].cfg == deployed.cfg


def test_flwr_run_gets_the_simulations_gpu_checks(tmp_path, monkeypatch, easy_cohort):
    """Before, `flwr run .` ran a config cmvim-sim refuses (Ray then waits for a GPU forever)."""
    config = _config(tmp_path, easy_cohort)
    served = _served(monkeypatch)
    context = types.SimpleNamespace(run_config={"config-file": str(config), "out-dir": str(tmp_path / "o"),
                                                "device": "cuda"})
    with pytest.raises(ConfigError, match="needs gpus_per_site > 0 in a simulation"):
        simulation_app.main(None, context)
    deployment_app.main(None, context)            # a deployment: each site's policy decides its device
    assert served[-1][1].cfg.device == "cuda"


def test_a_request_says_what_it_was_asked():
    request = RunRequest.from_context({"config-file": "run.yaml", "out-dir": "x", "resume": "true",
                                       "finetune.rounds": 3})
    assert request.resume and request.config_file.name == "run.yaml" and request.out_dir.is_absolute()
    assert request.describe() == "run.yaml with --run-config finetune.rounds=3"
    assert RunRequest(overrides=("seed=4",)).describe() == "the defaults with --set seed=4"
    assert RunRequest(overrides=("seed=4", ("finetune.rounds", 2))).config().seed == 4
    with pytest.raises(ConfigError, match="unknown key 'roundz'"):
        RunRequest(overrides=(("finetune.roundz", 2),)).config()
    assert DEPLOYMENT.check(run_config({})) == run_config({})
    assert SIMULATION.check(run_config({})).device == "cpu"
