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

import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from torch import nn

from .engine import train
from .run_config import RunConfig


class PrivacyBudgetExceeded(Exception):
    """The next round would take the run past the site's privacy budget; the message is public
    (numbers of the privacy accounting only)."""


def default_delta(n: int) -> float:
    return 1.0 / (10 * max(n, 1))


def epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDP accountant over (noise_multiplier, sample_rate, steps) entries."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
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
    phase: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


class PrivacyLedger:
    """Every DP round this site trained, on disk (atomic writes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: list[Spend] = []
        if self.path.exists():
            self.entries = [Spend(**e) for e in json.loads(self.path.read_text())["spends"]]

    def history(self, run: str | None = None) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries if run is None or e.run == run]

    def epsilon(self, delta: float, run: str | None = None, extra: Sequence[tuple[float, float, int]] = ()) -> float:
        return epsilon(self.history(run) + list(extra), delta)

    def record(self, spend: Spend) -> None:
        self.entries.append(spend)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-")
        with os.fdopen(fd, "w") as f:
            json.dump({"spends": [asdict(e) for e in self.entries]}, f, indent=1)
        os.replace(tmp, self.path)


def dp_train(model: nn.Module, dataset, collate: Callable, loss_fn: Callable, optimizer: torch.optim.Optimizer,
             noise_multiplier: float, max_grad_norm: float, sample_rate: float, steps: int, seed: int,
             after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """`steps` DP-SGD steps with Poisson sampling, through the one training loop (engine.train)
    with Opacus' per-sample gradients and DP optimizer handed in. `loss_fn(module, batch) ->
    (loss, stats, n)` with loss the batch mean of per-sample losses. Returns the mean stats and
    num-examples."""
    generator = torch.Generator().manual_seed(seed)
    n = len(dataset)
    expected = max(1, round(sample_rate * n))
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=expected, loss_reduction="mean", generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]

    def poisson_batches():
        for _ in range(steps):
            chosen = (torch.rand(n, generator=generator) < sample_rate).nonzero().flatten().tolist()
            if chosen:
                yield collate([dataset[i] for i in chosen])
                continue
            dp_optimizer.zero_grad(set_to_none=True)     # Poisson sampling drew nobody: a noise-only step, as Opacus takes it
            for p in params:
                p.grad = torch.normal(0.0, noise_multiplier * max_grad_norm, p.shape, generator=generator) / expected
            optimizer.step()
            if after_step is not None:
                after_step()

    with warnings.catch_warnings():
        # the image inputs never require grad, so torch says the full backward hooks fire on
        # module outputs: that is what Opacus' hooks expect here
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        try:
            return train(private, poisson_batches(), dp_optimizer, loss_fn, grad_clip=None, after_step=after_step)
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
    for phase in ("pretrain", "finetune"):
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
