"""One run assembly: how `cmvim-sim`, `flwr run .` and `cmvim-server` turn what they were given
into the run the ServerApp drives. Every entry goes the same way:

    RunRequest             what was asked: the run-config file, overrides of it (a command line's
                           --set KEY=VALUE, or the dotted keys of `flwr run --run-config`),
                           out-dir, resume
    RunRequest.config()    the RunConfig: the YAML with the overrides applied by
                           cmvim.run_config.overridden (the one override implementation), checked
    RunKind.check()        what this kind of run cannot do, before anything starts (ConfigError)
    RunKind.prepare()      what it needs before its first round -> PreparedRun
    serve()                the ServerApp body: the coordinator's signing key when there is one,
                           then FederatedRun

Two kinds: DEPLOYMENT (here: the sites bring their own data, nothing to prepare at the
coordinator) and the simulation (cmvim.simulations.assembly.SIMULATION: the device and GPU
checks, the synthetic cohort, every site loaded once, the baselines). cmvim-sim checks and
prepares before Flower's simulation engine starts (a config error or a cohort with too few
trainable sites stops it there) and serves from its own ServerApp; the apps Flower starts
(`flwr run .`, cmvim-server's SuperLink) build the request from their run config and assemble
in their main.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from cmvim.config import load_yaml
from cmvim.run_config import RunConfig, overridden, run_config

from .flower_app import APP_CONFIG, COORDINATOR_KEY_ENV


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """A run as asked for. `overrides`: `KEY=VALUE` strings (a command line's --set) or typed
    (KEY, value) pairs (Flower's run config), applied in order over `config_file` (None: the
    defaults); `given_as` names how they came, for messages."""
    config_file: Path | None = None
    overrides: tuple[str | tuple[str, Any], ...] = ()
    out_dir: Path = Path(APP_CONFIG["out-dir"])
    resume: bool = False
    given_as: str = "--set"

    @classmethod
    def from_context(cls, run_cfg: Mapping[str, Any], find: Callable[[str], Path] = Path) -> RunRequest:
        """The request in a Flower app's run config (protocol keys APP_CONFIG; every other key is a
        dotted RunConfig key that overrides the file named by `config-file`, found by `find`)."""
        name = str(run_cfg.get("config-file", ""))
        return cls(config_file=find(name) if name else None,
                   overrides=tuple((key, value) for key, value in run_cfg.items() if key not in APP_CONFIG),
                   out_dir=Path(str(run_cfg.get("out-dir", APP_CONFIG["out-dir"]))).expanduser().resolve(),
                   resume=str(run_cfg.get("resume", "false")).lower() in ("1", "true", "yes"),
                   given_as="--run-config")

    def mapping(self) -> dict:
        """The run config as a mapping, overrides applied, not yet checked (what a file records)."""
        data = load_yaml(self.config_file) if self.config_file is not None else {}
        return overridden(data, self.overrides)

    def config(self) -> RunConfig:
        """The RunConfig asked for; ConfigError naming a bad key or value, from the file or an override."""
        return run_config(self.mapping())

    def describe(self) -> str:
        """`FILE with --set a=1 b=2`, for messages."""
        shown = [o if isinstance(o, str) else f"{o[0]}={o[1]}" for o in self.overrides]
        where = str(self.config_file) if self.config_file is not None else "the defaults"
        return where + (f" with {self.given_as} " + " ".join(shown) if shown else "")


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """A checked config and what its kind of run brings to FederatedRun: `baselines` (called once
    the federated model is evaluated) and `site_slots` (sites that can work at once; None: all)."""
    cfg: RunConfig
    baselines: Callable[[], dict | None] | None = None
    site_slots: int | None = None


class RunKind:
    """A deployment: the sites bring their data and their devices; the coordinator checks nothing
    beyond the config and prepares nothing. A simulation overrides both steps."""
    name = "deployment"

    def check(self, cfg: RunConfig) -> RunConfig:
        """The config this kind runs, or ConfigError for what it cannot run."""
        return cfg

    def prepare(self, cfg: RunConfig, say: Callable[[str], None] = print) -> PreparedRun:
        return PreparedRun(cfg)


DEPLOYMENT = RunKind()


def assemble(request: RunRequest, kind: RunKind, say: Callable[[str], None] = print) -> PreparedRun:
    """Request -> config -> the kind's checks -> the kind's preparation."""
    return kind.prepare(kind.check(request.config()), say)


def serve(grid, context, request: RunRequest, prepared: PreparedRun) -> dict:
    """The body of every cmvim ServerApp: with the coordinator's key (cmvim-server with TLS puts
    its path in COORDINATOR_KEY_ENV) every instruction to the sites is signed; then the run."""
    from .runner import FederatedRun
    key = os.environ.get(COORDINATOR_KEY_ENV)
    if key:
        from cmvim.instructions import load_private_key, signing_grid
        grid = signing_grid(grid, load_private_key(Path(key)))
        print("cmvim: every instruction to the sites is signed with the coordinator's key", flush=True)
    return FederatedRun(prepared.cfg, request.out_dir, grid, resume=request.resume, context=context,
                        baselines=prepared.baselines, site_slots=prepared.site_slots).run()


def serve_from_context(grid, context, kind: RunKind, find: Callable[[str], Path] = Path) -> dict:
    """The main of an app Flower starts (`flwr run .`, cmvim-server's run): the request in its run
    config, assembled for `kind`, served."""
    request = RunRequest.from_context(dict(context.run_config), find)
    print(f"cmvim: a {kind.name}, config {request.describe()}; results of this run go to {request.out_dir}", flush=True)
    return serve(grid, context, request, assemble(request, kind, say=lambda text: print(text, flush=True)))
