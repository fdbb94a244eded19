"""Flower ServerApp of a simulation (`flwr run .` in a checkout): the run its run config asks
for, assembled as every cmvim run is (cmvim.server.assembly) for a simulation (.assembly): the
same checks, synthetic cohort (built or reused when the config names no cohort.path), site
loading and baselines as cmvim-sim. `config-file` may be a name in simulations/configs/
(default quick.yaml)."""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cmvim.server.app import collect_replies_sooner
from cmvim.server.assembly import serve_from_context

from .assembly import SIMULATION, config_path

app = ServerApp()
app.lifespan()(collect_replies_sooner)        # its Grid asks the local SuperLink for replies too


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve_from_context(grid, context, SIMULATION, find=config_path)
