"""Flower ServerApp of a simulation (`flwr run .` in a checkout): the deployment's app
(cmvim.server.app) plus the synthetic cohort, built or reused when the config names no
cohort.path. `config-file` may be a name in simulations/configs/ (default quick.yaml)."""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cmvim.server.app import collect_replies_sooner, config_from_context, run

from .cli import config_path
from .cohort import prepare_cohort

app = ServerApp()
app.lifespan()(collect_replies_sooner)        # its Grid asks the local SuperLink for replies too


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = prepare_cohort(config_from_context(dict(context.run_config), find=config_path))
    run(grid, context, cfg)
