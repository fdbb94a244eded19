"""The Flower app cmvim runs, as Flower sees it: its components and the run-config keys `flwr run`
accepts. No Flower or torch imports (cmvim-server reads it before anything heavy).

The checkout's pyproject.toml declares the same app for `flwr run .` (a simulation: its
ServerApp builds the synthetic cohort); cmvim-server writes a one-file app project
(`write_project`) naming the installed deployment ServerApp, so a coordinator needs no checkout,
and the bundle Flower ships to the sites carries no code: every site runs the cmvim it installed.
"""
from __future__ import annotations

from pathlib import Path

PUBLISHER = "cmvim"
CLIENT_APP = "cmvim.client.app:app"
SERVER_APP = "cmvim.server.app:app"              # a deployment: the sites bring their data
SIMULATION_SERVER_APP = "cmvim.simulations.app:app"   # `flwr run .` in a checkout

# the app's own run config; the values are defaults. Flower accepts `--run-config` keys declared
# here only (and dotted RunConfig keys declared beside them, which override the YAML)
APP_CONFIG = {"config-file": "quick.yaml", "out-dir": "runs/flwr", "resume": "false"}
# where cmvim-server tells the ServerApp (through the SuperLink's environment) its signing key is
COORDINATOR_KEY_ENV = "CMVIM_COORDINATOR_KEY"


def write_project(folder: Path, version: str) -> Path:
    """A Flower app project (pyproject.toml alone) for the installed deployment app, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f'{key} = "{value}"' for key, value in APP_CONFIG.items())
    (folder / "pyproject.toml").write_text(f'''[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "cmvim"
version = "{version}"
description = "cmvim's deployment app: code comes from each machine's installed cmvim"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "{PUBLISHER}"

[tool.flwr.app.components]
serverapp = "{SERVER_APP}"
clientapp = "{CLIENT_APP}"

[tool.flwr.app.config]
{config}
''')
    return folder
