"""Flower ServerApp: reads the run config and drives `server.runner.FederatedRun`.

`flwr run .` passes pyproject's [tool.flwr.app.config] (overridable with --run-config):
  config-file   a RunConfig YAML: a path, or a name in simulations/configs/ (default quick.yaml)
  out-dir       where results and checkpoints go
  resume        "true" to continue from out-dir's last checkpoint
  deployment    "true" (set by cmvim-server): sites bring their own data; no synthetic cohort
Flower only accepts --run-config keys declared in pyproject, so other settings go in the YAML;
a dotted key that is declared there (e.g. "pretrain.rounds") overrides the file.
"""
from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cmvim.config import load_yaml
from cmvim.run_config import RunConfig, run_config

from .runner import FederatedRun

app = ServerApp()

RESERVED = ("config-file", "out-dir", "resume", "deployment")


def config_path(name: str) -> Path:
    """A path as given, or a name in simulations/configs/ (where `flwr run .` finds quick.yaml)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    bundled = Path(__file__).resolve().parent.parent / "simulations" / "configs" / name
    return bundled if bundled.exists() else path


def config_from_context(run_cfg: dict) -> RunConfig:
    name = str(run_cfg.get("config-file", ""))
    data = load_yaml(config_path(name)) if name else {}
    for key, value in run_cfg.items():
        if key in RESERVED:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return run_config(data)


def ensure_cohort(cfg: RunConfig) -> RunConfig:
    """A run without a cohort path is a simulation on a synthetic cohort: build (or reuse) it."""
    if cfg.cohort.path:
        return cfg
    from simulations.cohort import CohortConfig, cached_cohort    # simulation only: hospitals bring data
    spec = cfg.cohort
    path = cached_cohort(CohortConfig(sites=spec.sites, subjects=spec.subjects, shape=spec.shape, seed=spec.seed,
                                      effect_scale=spec.effect_scale))
    cfg.cohort.path = str(path)
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_cfg = dict(context.run_config)
    cfg = config_from_context(run_cfg)
    if str(run_cfg.get("deployment", "false")).lower() != "true":
        cfg = ensure_cohort(cfg)             # simulation: the synthetic cohort; deployment: sites bring data
    out_dir = Path(str(run_cfg.get("out-dir", "runs/flwr"))).expanduser().resolve()
    print(f"cmvim: results of this run go to {out_dir}", flush=True)
    resume = str(run_cfg.get("resume", "false")).lower() in ("1", "true", "yes")
    FederatedRun(cfg, out_dir, grid, resume=resume, context=context).run()
