"""Flower ServerApp of a deployment: reads the run config and drives `FederatedRun`; the sites
bring their own data. (`flwr run .` in a checkout runs the simulation's ServerApp,
cmvim.simulations.app, which also builds the synthetic cohort.)

Flower passes the app's run config (protocol.APP_CONFIG, overridable with --run-config):
  config-file   a RunConfig YAML path (cmvim-server passes an absolute one)
  out-dir       where results and checkpoints go
  resume        "true" to continue from out-dir's last checkpoint
Flower only accepts --run-config keys declared in the app's pyproject, so other settings go in
the YAML; a dotted key that is declared there (e.g. "pretrain.rounds") overrides the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cmvim.config import load_yaml
from .flower_app import APP_CONFIG, COORDINATOR_KEY_ENV
from cmvim.run_config import RunConfig, run_config

from .runner import FederatedRun

app = ServerApp()
SERVER_POLL_ENV = "CMVIM_SERVER_POLL"


@app.lifespan()
def collect_replies_sooner(context: Context) -> Iterator[None]:
    """For the app's run, in its process: the ServerApp asks the SuperLink for the sites' replies
    0.05 s after sending a round's messages, the wait growing with the time since up to
    CMVIM_SERVER_POLL s instead of Flower's hard-coded 3 s (cmvim.flower_polls.quicken_server_polls),
    and retries an object a site is still uploading after 0.05 s. Default 0.2 s: each ask is a
    request on the coordinator's loopback to a SuperLink with its state in memory, a few ms of its
    time; at 0.5 s a round's last reply waited 0.25 s on average to be collected. (The simulation's
    ServerApp, cmvim.simulations.app, has the same lifespan.)"""
    from cmvim.flower_polls import quicken_server_polls, shorten_object_backoff
    quicken_server_polls(float(os.environ.get(SERVER_POLL_ENV, "0.2")))
    shorten_object_backoff()
    yield


def config_from_context(run_cfg: dict, find: Callable[[str], Path] = Path) -> RunConfig:
    """The RunConfig named by the app's `config-file` (resolved by `find`), with the dotted
    run-config keys applied over it."""
    name = str(run_cfg.get("config-file", ""))
    data = load_yaml(find(name)) if name else {}
    for key, value in run_cfg.items():
        if key in APP_CONFIG:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return run_config(data)


def run(grid: Grid, context: Context, cfg: RunConfig) -> None:
    """The federated run the app's run config asks for: results in out-dir, resumed if asked."""
    run_cfg = dict(context.run_config)
    out_dir = Path(str(run_cfg.get("out-dir", APP_CONFIG["out-dir"]))).expanduser().resolve()
    print(f"cmvim: results of this run go to {out_dir}", flush=True)
    resume = str(run_cfg.get("resume", "false")).lower() in ("1", "true", "yes")
    FederatedRun(cfg, out_dir, grid, resume=resume, context=context).run()


@app.main()
def main(grid: Grid, context: Context) -> None:
    key = os.environ.get(COORDINATOR_KEY_ENV)
    if key:                      # cmvim-server with TLS: every instruction signed (cmvim.instructions)
        from cmvim.instructions import load_private_key, signing_grid
        grid = signing_grid(grid, load_private_key(Path(key)))
        print("cmvim: every instruction to the sites is signed with the coordinator's key", flush=True)
    run(grid, context, config_from_context(dict(context.run_config)))
