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
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from cmvim.cli_util import HelpFormatter, add_set_option, add_version, require_extra
from cmvim.config import ConfigError, load_yaml
from cmvim.data import SiteData
from cmvim.run_config import RunConfig, overridden, run_config

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "quick.yaml"


def config_path(name: str | Path) -> Path:
    """A path as given, or the name of a config that ships in simulations/configs/ (quick.yaml, ...)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    bundled = CONFIGS / str(name)
    return bundled if bundled.exists() else path


def _say(text: str) -> None:
    print(text, flush=True)


class NoTrainingData(SystemExit):
    """Too few sites have anything to train on: the run stops before any round."""


def prepare_sites(cfg: RunConfig) -> dict[str, SiteData]:
    """Every site loaded once in this process, so clients only read the cache; problems show now.
    A site with no usable training visit is named with why; when fewer sites than
    strategy.min_nodes have one, no round could aggregate: NoTrainingData, before Ray starts."""
    from cmvim.data import DataError
    folders = cfg.cohort.site_folders()
    if not folders:
        raise SystemExit(f"no site folders (with manifest.csv or a BIDS dataset_description.json) in {cfg.cohort.path}")
    sites, unusable = {}, {}
    for name, folder in folders.items():
        start = time.perf_counter()
        try:
            site = SiteData.for_run(folder, cfg, show_progress=True, workers=os.cpu_count() or 1)
        except DataError as err:
            _say(f"  site {name}: not readable: {err}")
            unusable[name] = str(err).splitlines()[0]
            continue
        counts = site.counts()
        _say(f"  site {name}: {counts['visits']} subject-visits ({counts['labels']}), PET {counts['with_pet']}, "
             f"splits {counts['splits']}, {len(site.summary.skipped)} skipped "
             f"[{time.perf_counter() - start:.1f}s, {site.summary.cache_hits} from cache]")
        for err in site.summary.skipped:
            _say(f"    skipped: {err}")
        sites[name] = site
        if not counts["splits"].get("train"):
            unusable[name] = (f"no usable subject-visit in its train split ({counts['visits']} usable, "
                              f"{len(site.summary.skipped)} skipped: see above)")
    usable = len(folders) - len(unusable)
    for name, why in unusable.items():
        _say(f"  ! site {name} cannot train: {why}")
    if usable < cfg.strategy.min_nodes:
        raise NoTrainingData(
            f"cmvim-sim: stopped before any round: {usable} of {len(folders)} sites have data to train on and "
            f"strategy.min_nodes is {cfg.strategy.min_nodes}, so no round could aggregate an update ("
            + "; ".join(f"site {n}: {why}" for n, why in unusable.items()) + ")")
    return sites


def run_federated(cfg: RunConfig, out_dir: Path, n_sites: int, resume: bool, verbose: bool,
                  sites: dict[str, SiteData] | None = None) -> None:
    """The federated run on Flower's simulation engine, one SuperNode per site; with `sites`
    (loaded by prepare_sites) the config's baselines are trained on them and reported beside it."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from cmvim.client.app import app as client_app
    from cmvim.server.runner import FederatedRun

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    server_app = ServerApp()

    cores, per_site = os.cpu_count() or 1, max(1, cfg.threads_per_site)
    slots = max(1, cores // per_site)                           # Ray runs this many sites at once
    if cfg.gpus_per_site > 0:
        import torch
        slots = min(slots, max(1, int(torch.cuda.device_count() / cfg.gpus_per_site)))

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        FederatedRun(cfg, out_dir, grid, resume=resume, context=context, baselines=baselines, site_slots=slots).run()

    def baselines() -> dict | None:
        if not (cfg.baselines and sites):
            return None
        from .baselines import run_baselines
        trainable = {name: site for name, site in sites.items() if site.counts()["splits"].get("train")}
        if not trainable:
            _say("baselines: not trained (no site has a usable training visit)")
            return None
        return run_baselines(cfg, trainable, cfg.baselines, say=_say)

    backend = {"client_resources": {"num_cpus": per_site, "num_gpus": float(cfg.gpus_per_site)},
               "init_args": {"num_cpus": cores, "include_dashboard": False, "logging_level": "error"}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_sites, backend_config=backend,
                   verbose_logging=verbose)


def gpu_problem(cfg) -> str | None:
    """Why the config's GPU shares cannot run on this machine (Ray would wait for GPUs forever), or None.
    Simulated sites get a GPU only through `gpus_per_site` (see `simulated_device`)."""
    if cfg.gpus_per_site <= 0:
        if cfg.device.startswith("cuda"):
            return f"device {cfg.device} needs gpus_per_site > 0 in a simulation (a share of a GPU for each site)"
        return None
    import torch
    count = torch.cuda.device_count()
    if count == 0:
        return f"gpus_per_site {cfg.gpus_per_site:g}, but this machine has no CUDA device: set gpus_per_site: 0"
    if cfg.gpus_per_site > count:
        return f"gpus_per_site {cfg.gpus_per_site:g} is more than the {count} GPU(s) here: no site could start"
    return None


def simulated_device(cfg):
    """Without GPU shares the simulated sites compute on the CPU: `device: auto` must not let
    every site take the same GPU behind Ray's back (Ray plans to stop hiding GPUs from actors
    that asked for none)."""
    if cfg.gpus_per_site <= 0 and cfg.device == "auto":
        return dataclasses.replace(cfg, device="cpu")
    return cfg


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
    where = f"{config_file}" + (" with --set " + " ".join(args.set) if args.set else "")
    try:
        cfg = run_config(overridden(load_yaml(config_file), args.set))
    except ConfigError as exc:
        parser.error(f"{where}: {exc}")
    problem = gpu_problem(cfg)
    if problem:
        parser.error(f"{where}: {problem}")
    cfg = simulated_device(cfg)
    start = time.perf_counter()
    _say(f"cmvim-sim: config {where}, results in {out_dir}")
    if not cfg.cohort.path:
        from .cohort import prepare_cohort
        spec = cfg.cohort
        _say(f"cohort: synthetic, {spec.sites} sites x {spec.subjects} subjects at {spec.shape}^3 (seed {spec.seed}); "
             "built once, then reused")
        cfg = prepare_cohort(cfg)
    _say(f"cohort at {cfg.cohort.path}")
    try:
        sites = prepare_sites(cfg)
    except NoTrainingData as stop:
        _say(str(stop))
        return 1
    run_federated(cfg, out_dir, len(cfg.cohort.site_folders()), resume=bool(args.resume), verbose=args.verbose,
                  sites=sites)
    if not (out_dir / "metrics.json").exists():
        _say("the federated run did not finish: no metrics.json (see the messages above)")
        return 1
    _say(f"\ncmvim-sim finished in {(time.perf_counter() - start) / 60:.1f} min; results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
