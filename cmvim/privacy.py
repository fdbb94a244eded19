"""Sample-level differential privacy at a site: DP-SGD with Opacus, and a privacy ledger on disk.

DP-SGD (Abadi et al. 2016) as Opacus implements it: Poisson sampling (each subject joins each
step with probability q = batch_size / n), per-sample gradients (Opacus' GradSampleModule),
each clipped to `max_grad_norm`, Gaussian noise of std `noise_multiplier * max_grad_norm` added
to their sum. Opacus' RDP accountant turns the steps into (epsilon, delta).

The ledger is a JSON file at the site listing every DP round it trained (run, phase, round,
noise multiplier, sample rate, steps), written before the round's weights leave the site. So
the budget is cumulative across rounds and phases and survives a restart of the site's
process; a round that would take a run past its budget is refused before it starts.

What DP-SGD needs from the model, handled explicitly:
- per-sample losses: pretraining under DP uses the reconstruction loss only (the contrastive
  terms compare subjects within a batch, so one subject's gradient would depend on others);
  the projector and report encoder, used only by those terms, are frozen for the round;
- the momentum encoder takes no gradients (requires_grad False); its EMA update is
  post-processing of the private weights;
- no BatchNorm anywhere, and the scan backend must be vmap-safe (`torch` or `cpu`).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .durable import write_atomic
from .device import FP32, DeviceError, Precision, model_device
from .engine import train
from .names import PHASES, Phase
from .release import AS_COMPUTED, ReleaseGrid
from .run_config import RunConfig


class PrivacyBudgetExceeded(Exception):
    """The next round would take the run past the site's privacy budget; the message is public
    (numbers of the privacy accounting only)."""


class ReleaseLimit(PrivacyBudgetExceeded):
    """The run has had all the evaluations the site's policy allows; public."""


class PrivacyRefused(PrivacyBudgetExceeded):
    """The run's DP settings are outside what the site allows (delta, noise floor); public too."""


def default_delta(n: int) -> float:
    return 1.0 / (10 * max(n, 1))


def epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDP accountant over (noise_multiplier, sample_rate, steps) entries."""
    if not history:
        return 0.0
    steps: dict[tuple[float, float], int] = {}          # RDP adds up over steps: one entry per (noise, rate)
    for s, q, n in history:
        steps[(float(s), float(q))] = steps.get((float(s), float(q)), 0) + int(n)
    from opacus.accountants import RDPAccountant          # here: a plain training message never loads Opacus
    accountant = RDPAccountant()
    accountant.history = [(s, q, n) for (s, q), n in steps.items()]
    return float(accountant.get_epsilon(delta))


def noise_for_target(target: float, delta: float, plan: Sequence[tuple[float, int]]) -> float:
    """The smallest noise multiplier (to 1e-3) that keeps the planned (sample_rate, steps)
    entries within `target` epsilon."""
    def spent(sigma: float) -> float:
        return epsilon([(sigma, q, n) for q, n in plan], delta)
    low, high = 0.3, 2.0
    while spent(high) > target:
        high *= 2
        if high > 1e4:
            raise ValueError(f"privacy.target_epsilon {target} is out of reach for this schedule")
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= target else (mid, high)
    return high


@dataclass
class Spend:
    run: str
    phase: Phase
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class SiteLimits:
    """What a site (its policy, never the run config) lets DP training spend there."""
    max_epsilon: float | None = None        # over every run this site has trained, not just this one
    max_delta: float | None = None          # the largest delta a run may use; None: 1/n (n: the site's subjects)
    min_noise_multiplier: float = 0.0       # the smallest noise a DP round may add
    min_cell_count: int = 0                 # an evaluation with fewer subjects of a class releases nothing
    release: ReleaseGrid = AS_COMPUTED     # the site's grid for what evaluations release


class PrivacyLedger:
    """Every DP round this site trained, over every run, in one file. A spend is checked against
    the budgets and appended under an exclusive lock (two runs at one site cannot both pass the
    check and lose a spend), written atomically and fsync'd, 0600 in a 0700 folder."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def entries(self) -> list[Spend]:
        if not self.path.exists():
            return []
        return [Spend(**e) for e in json.loads(self.path.read_text())["spends"]]

    def history(self, run: str | None = None) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries if run is None or e.run == run]

    def epsilon(self, delta: float, run: str | None = None, extra: Sequence[tuple[float, float, int]] = ()) -> float:
        return epsilon(self.history(run) + list(extra), delta)

    def _locked(self):
        return locked(self.path)

    def spend(self, spend: Spend, delta: float, run_budget: float | None, site_budget: float | None) -> None:
        """Record `spend` if the run stays within `run_budget` and the site's total over every run
        within `site_budget` (both epsilon at `delta`); else PrivacyBudgetExceeded, nothing recorded.
        Called before training: a round that then fails still counts (the safe side)."""
        new = (spend.noise_multiplier, spend.sample_rate, spend.steps)
        with self._locked():
            entries = self.entries
            if run_budget is not None:
                run = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.run == spend.run]
                projected = epsilon(run + [new], delta)
                if projected > run_budget + 1e-9:
                    raise PrivacyBudgetExceeded(
                        f"privacy budget: this {spend.phase} round would take the run to epsilon {projected:.2f} > "
                        f"budget {run_budget:.2f} (spent {epsilon(run, delta):.2f}, delta {delta:.1e}); the site "
                        "stops training for this run and still evaluates")
            if site_budget is not None:
                every = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
                projected = epsilon(every + [new], delta)
                if projected > site_budget + 1e-9:
                    raise PrivacyBudgetExceeded(
                        f"site privacy budget: this {spend.phase} round would take the site's total over every "
                        f"run to epsilon {projected:.2f} > the site policy's max_epsilon {site_budget:.2f} (spent "
                        f"{epsilon(every, delta):.2f}, delta {delta:.1e}); the site stops DP training and still "
                        "evaluates")
            self._write(entries + [spend])

    def _write(self, entries: list[Spend]) -> None:
        write_durably(self.path, {"spends": [asdict(e) for e in entries]})


@contextmanager
def locked(path: Path):
    """An exclusive lock on `path`'s lock file (its folder made 0700): one process at a time."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_durably(path: Path, data: dict) -> None:
    """JSON written atomically (0600) and fsync'd, file and folder (cmvim.durable)."""
    text = json.dumps(data, indent=1).encode()
    write_atomic(path, lambda handle: handle.write(text))


def count_release(path: Path, run: str, limit: int | None) -> int:
    """Count one evaluation release in the site's release log (locked, durable), under `run` for
    the record. The limit is the site's, over every run (like the privacy ledger): the
    coordinator names the run key, so a limit per key would be no limit (a new key per message).
    Past `limit` releases in all, ReleaseLimit and nothing counted. Returns the site's total."""
    with locked(path):
        counts = json.loads(path.read_text())["runs"] if path.exists() else {}
        done = sum(int(n) for n in counts.values())
        if limit is not None and done >= limit:
            raise ReleaseLimit(f"release limit: this site has made its {limit} evaluation release(s) over every "
                               "run (site policy max_evaluations); it answers no more")
        counts[run] = int(counts.get(run, 0)) + 1
        write_durably(path, {"runs": counts, "total": done + 1})
        return done + 1


def dp_train(model: nn.Module, dataset, collate: Callable, loss_fn: Callable, optimizer: torch.optim.Optimizer,
             noise_multiplier: float, max_grad_norm: float, sample_rate: float, steps: int, seed: int,
             after_step: Callable[[], None] | None = None, precision: Precision = FP32) -> dict[str, float]:
    """`steps` DP-SGD steps with Poisson sampling, through the one training loop (engine.train)
    with Opacus' per-sample gradients and DP optimizer handed in. `loss_fn(module, batch) ->
    (loss, stats, n)` with loss the batch mean of per-sample losses. Returns the mean stats and
    num-examples. On a GPU the noise is drawn there (from a generator seeded the same way)."""
    if precision.scaler is not None:
        raise DeviceError("precision fp16 with DP-SGD: a loss scaler would scale the per-sample gradients "
                          "Opacus clips; use bf16 or fp32")
    from opacus import GradSampleModule                               # here: a plain training message never loads Opacus
    from opacus.optimizers import DPOptimizer
    generator = torch.Generator().manual_seed(seed)                     # Poisson sampling: on the CPU
    device = model_device(model)
    noise_generator = generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    n = len(dataset)
    expected = max(1, round(sample_rate * n))
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=expected, loss_reduction="mean", generator=noise_generator)
    params = [p for p in model.parameters() if p.requires_grad]

    def poisson_batches():
        for _ in range(steps):
            chosen = (torch.rand(n, generator=generator) < sample_rate).nonzero().flatten().tolist()
            if chosen:
                yield collate([dataset[i] for i in chosen])
                continue
            dp_optimizer.zero_grad(set_to_none=True)     # Poisson sampling drew nobody: a noise-only step, as Opacus takes it
            for p in params:
                p.grad = torch.normal(0.0, noise_multiplier * max_grad_norm, p.shape, generator=noise_generator,
                                      device=device) / expected
            optimizer.step()
            if after_step is not None:
                after_step()

    with warnings.catch_warnings():
        # the image inputs never require grad, so torch says the full backward hooks fire on
        # module outputs: that is what Opacus' hooks expect here
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        try:
            return train(private, poisson_batches(), dp_optimizer, loss_fn, grad_clip=None, after_step=after_step,
                         precision=precision)
        finally:
            private._close()        # remove Opacus' hooks: the model goes back to being plain
            for p in model.parameters():
                for attr in ("grad_sample", "summed_grad"):
                    if hasattr(p, attr):
                        delattr(p, attr)


def steps_per_epoch(sample_rate: float) -> int:
    return max(1, math.ceil(1.0 / sample_rate))


def privacy_plan(cfg: RunConfig, sizes: dict[str, int]) -> tuple[float, dict[str, tuple[float, int]]]:
    """A site's DP-SGD plan from the run config and the size of each phase's dataset there:
    (delta, {phase: (sample_rate, steps per round)})."""
    plan = {}
    for phase in PHASES:
        pc = cfg.phase(phase)
        q = min(1.0, pc.batch_size / max(sizes[phase], 1))
        steps = pc.local_epochs * steps_per_epoch(q)
        plan[phase] = (q, min(steps, pc.max_steps) if pc.max_steps else steps)
    delta = cfg.privacy.delta or default_delta(sizes["pretrain"])
    return delta, plan


def planned_noise(cfg: RunConfig, delta: float, plan: dict[str, tuple[float, int]]) -> float:
    """The config's noise multiplier, or the smallest one that keeps the whole planned run (every
    round of every phase) within its target epsilon."""
    pv = cfg.privacy
    if pv.noise_multiplier is not None:
        return pv.noise_multiplier
    planned = [(q, steps * cfg.phase(ph).rounds) for ph, (q, steps) in plan.items()]
    return noise_for_target(pv.target_epsilon, delta, planned)
