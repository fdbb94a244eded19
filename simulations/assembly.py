"""A simulation as a kind of run (cmvim.server.assembly): what `cmvim-sim` and `flwr run .` in a
checkout check and prepare before the first round, the same for both.

  check    the config's GPU shares against this machine (Ray would wait for GPUs forever), and
           `device: auto` kept on the CPU unless the sites were given GPU shares
  prepare  the synthetic cohort the config describes (built once, then reused) when it names no
           cohort.path; every site loaded once in this process (the clients then only read the
           cache; problems show now; too few trainable sites stop the run before any round); the
           sites that can work at once; the config's baselines, trained on the same sites
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

from cmvim.config import ConfigError
from cmvim.data import SiteData
from cmvim.run_config import RunConfig
from cmvim.server.assembly import PreparedRun, RunKind

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


def prepare_sites(cfg: RunConfig, say: Callable[[str], None] = _say) -> dict[str, SiteData]:
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
            say(f"  site {name}: not readable: {err}")
            unusable[name] = str(err).splitlines()[0]
            continue
        counts = site.counts()
        say(f"  site {name}: {counts['visits']} subject-visits ({counts['labels']}), PET {counts['with_pet']}, "
            f"splits {counts['splits']}, {len(site.summary.skipped)} skipped "
            f"[{time.perf_counter() - start:.1f}s, {site.summary.cache_hits} from cache]")
        for err in site.summary.skipped:
            say(f"    skipped: {err}")
        sites[name] = site
        if not counts["splits"].get("train"):
            unusable[name] = (f"no usable subject-visit in its train split ({counts['visits']} usable, "
                              f"{len(site.summary.skipped)} skipped: see above)")
    usable = len(folders) - len(unusable)
    for name, why in unusable.items():
        say(f"  ! site {name} cannot train: {why}")
    if usable < cfg.strategy.min_nodes:
        raise NoTrainingData(
            f"cmvim-sim: stopped before any round: {usable} of {len(folders)} sites have data to train on and "
            f"strategy.min_nodes is {cfg.strategy.min_nodes}, so no round could aggregate an update ("
            + "; ".join(f"site {n}: {why}" for n, why in unusable.items()) + ")")
    return sites


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


def site_slots(cfg: RunConfig) -> int:
    """How many simulated sites work at once: the cores over threads_per_site, and no more than
    the GPUs' shares allow."""
    slots = max(1, (os.cpu_count() or 1) // max(1, cfg.threads_per_site))
    if cfg.gpus_per_site > 0:
        import torch
        slots = min(slots, max(1, int(torch.cuda.device_count() / cfg.gpus_per_site)))
    return slots


class Simulation(RunKind):
    name = "simulation"

    def check(self, cfg: RunConfig) -> RunConfig:
        problem = gpu_problem(cfg)
        if problem:
            raise ConfigError(problem)
        return simulated_device(cfg)

    def prepare(self, cfg: RunConfig, say: Callable[[str], None] = _say) -> PreparedRun:
        """NoTrainingData when too few sites could train (before any round)."""
        if not cfg.cohort.path:
            from .cohort import prepare_cohort
            spec = cfg.cohort
            say(f"cohort: synthetic, {spec.sites} sites x {spec.subjects} subjects at {spec.shape}^3 "
                f"(seed {spec.seed}); built once, then reused")
            cfg = prepare_cohort(cfg)
        say(f"cohort at {cfg.cohort.path}")
        sites = prepare_sites(cfg, say)

        def baselines() -> dict | None:
            if not cfg.baselines:
                return None
            from .baselines import run_baselines
            trainable = {name: site for name, site in sites.items() if site.counts()["splits"].get("train")}
            if not trainable:
                say("baselines: not trained (no site has a usable training visit)")
                return None
            return run_baselines(cfg, trainable, cfg.baselines, say=say)

        return PreparedRun(cfg, baselines=baselines, site_slots=site_slots(cfg))


SIMULATION = Simulation()
