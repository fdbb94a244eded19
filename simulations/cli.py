"""`cmvim-sim`: a whole federated CMViM run on one machine, on Flower's simulation engine.

    cmvim-sim                                  the default: built-in synthetic cohort, quick.yaml
    cmvim-sim --config simulations/configs/baselines.yaml --out runs/baselines
    cmvim-sim --resume runs/sim                continue a stopped run from its last checkpoint
    cmvim-sim --set finetune.rounds=3 --set model.depth=2     a setting over the config's (repeatable)

Steps: build (or reuse) the cohort; load and preprocess every site once (cached); run
pretrain -> finetune -> evaluate with one simulated SuperNode per site; run the baselines the
config asks for; write metrics.json, ROC plots, curves, summary.md and TensorBoard logs to --out
(its config.yaml records the config the run used, --set overrides included).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from cmvim.cli_util import HelpFormatter, add_set_option, add_version, require_extra
from cmvim.config import ConfigError
from cmvim.server.assembly import PreparedRun, RunRequest

from .assembly import DEFAULT_CONFIG, SIMULATION, NoTrainingData, config_path


def _say(text: str) -> None:
    print(text, flush=True)


def run_federated(request: RunRequest, prepared: PreparedRun, n_sites: int, verbose: bool) -> None:
    """The federated run on Flower's simulation engine, one SuperNode per site, its ServerApp
    serving the prepared run (cmvim.server.assembly.serve, as every cmvim ServerApp does)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from cmvim.client.app import app as client_app
    from cmvim.server.assembly import serve

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, context, request, prepared)

    cfg = prepared.cfg
    backend = {"client_resources": {"num_cpus": max(1, cfg.threads_per_site), "num_gpus": float(cfg.gpus_per_site)},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "logging_level": "error"}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_sites, backend_config=backend,
                   verbose_logging=verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmvim-sim", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, help=f"run config YAML (default {DEFAULT_CONFIG.name})")
    parser.add_argument("--out", type=Path, help="results folder (default runs/sim)")
    parser.add_argument("--resume", type=Path, help="a stopped run's results folder: continue it")
    parser.add_argument("--verbose", action="store_true", help="Flower's own logs too")
    add_set_option(parser)
    add_version(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_extra("cmvim-sim", "sim", ("ray", "nilearn"))    # Flower's simulation engine; the cohort's templates
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")

    if args.resume:
        out_dir = args.resume
        config_file = args.config or out_dir / "config.yaml"
        if not config_file.exists():
            parser.error(f"--resume {out_dir}: no config.yaml there (is it a cmvim-sim results folder?)")
    else:
        out_dir = args.out or Path("runs/sim")
        config_file = config_path(args.config) if args.config else DEFAULT_CONFIG
    request = RunRequest(config_file, tuple(args.set), out_dir, resume=bool(args.resume))
    try:
        cfg = SIMULATION.check(request.config())
    except ConfigError as exc:
        parser.error(f"{request.describe()}: {exc}")
    start = time.perf_counter()
    _say(f"cmvim-sim: config {request.describe()}, results in {out_dir}")
    try:
        prepared = SIMULATION.prepare(cfg, _say)
    except NoTrainingData as stop:
        _say(str(stop))
        return 1
    run_federated(request, prepared, len(prepared.cfg.cohort.site_folders()), verbose=args.verbose)
    if not (out_dir / "metrics.json").exists():
        _say("the federated run did not finish: no metrics.json (see the messages above)")
        return 1
    _say(f"\ncmvim-sim finished in {(time.perf_counter() - start) / 60:.1f} min; results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
