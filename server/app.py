"""Flower ServerApp of a deployment: the run its run config asks for, assembled as every cmvim
run is (server/assembly.py), the sites bringing their own data. (`flwr run .` in a checkout
runs the simulation's ServerApp, cmvim.simulations.app: the same assembly for a simulation.)

Flower passes the app's run config (flower_app.APP_CONFIG, overridable with --run-config):
  config-file   a RunConfig YAML path (cmvim-server passes an absolute one)
  out-dir       where results and checkpoints go
  resume        "true" to continue from out-dir's last checkpoint
Flower only accepts --run-config keys declared in the app's pyproject, so other settings go in
the YAML; a dotted key that is declared there (e.g. "pretrain.rounds") overrides the file.
"""
from __future__ import annotations

import os
from typing import Iterator

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .assembly import DEPLOYMENT, serve_from_context

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


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve_from_context(grid, context, DEPLOYMENT)
