"""Central differential privacy's bookkeeping over a run: one Flower RDP accountant for all
phases, created at the first training phase for the sites connected then, its spend reported
every round, its state carried through checkpoints, and the reason training stopped when the
budget ran out. (The noise itself is added by Flower's wrappers: cmvim.server.strategy.)"""
from __future__ import annotations

import dataclasses

from flwr.serverapp import GaussianPrivacyEvent

from cmvim.run_config import CentralDPConfig

from .strategy import central_accountant


class CentralDP:
    def __init__(self, cfg: CentralDPConfig, min_nodes: int):
        self.cfg, self.min_nodes = cfg, min_nodes
        self.accountant = None          # Flower's RDP accountant, one for the whole run
        self.sites = 0                  # the sites each round's noise is calibrated for
        self.stopped: str | None = None     # why training stopped (the budget), if it did

    @property
    def active(self) -> bool:
        return self.accountant is not None

    def start(self, phase_rounds: int, later_rounds: int, connected: int) -> str:
        """Create the accountant at the first training phase; what the plan will spend, for a person."""
        if not self.cfg.enabled:
            return ""
        if self.accountant is None:
            self.sites = max(self.min_nodes, connected)
            self.accountant = central_accountant(self.cfg, self.sites)
        planned = phase_rounds + later_rounds
        projection = central_accountant(dataclasses.replace(self.cfg, max_epsilon=None), self.sites)
        projection.compose(GaussianPrivacyEvent(self.cfg.noise_multiplier, self.sites, self.sites),
                           self.accountant.num_releases + planned)      # every release is the same event
        budget = f", budget {self.cfg.max_epsilon}" if self.cfg.max_epsilon is not None else ""
        return (f"central DP: clipping to {self.cfg.clipping_norm}, noise std {self.cfg.noise_multiplier} x clip / "
                f"{self.sites} sites; epsilon {self.spent()['epsilon']:.3f} spent, the {planned} planned "
                f"round(s) bring it to {projection.get_epsilon(self.cfg.delta):.3f} (delta {self.cfg.delta:g}){budget}")

    def spent(self) -> dict:
        spent = self.accountant.get_privacy_spent()
        return {"epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases}

    def budget_spent(self) -> str:
        """Mark training stopped because the budget is spent; the reason, for a person."""
        spent = self.spent()
        self.stopped = (f"the central DP budget (max_epsilon {self.cfg.max_epsilon}) is spent: "
                        f"epsilon {spent['epsilon']:.3f} after {spent['releases']} round(s)")
        return self.stopped

    def state(self) -> dict:
        """What a checkpoint keeps ({} without central DP)."""
        if self.accountant is None:
            return {}
        return {"sites": self.sites, "accountant": self.accountant.state_dict(), "stopped": self.stopped}

    def restore(self, state: dict) -> None:
        if not state or not self.cfg.enabled:
            return
        self.sites = int(state["sites"])
        self.accountant = central_accountant(self.cfg, self.sites)
        self.accountant.load_state_dict(state["accountant"])
        self.stopped = state.get("stopped")

    def summary(self) -> tuple[dict, str]:
        """metrics.json's "central_dp" entry and summary.md's line."""
        entry = {"clipping": self.cfg.clipping, "noise_multiplier": self.cfg.noise_multiplier,
                 "clipping_norm": self.cfg.clipping_norm, "sites": self.sites, **self.spent(), "stopped": self.stopped}
        line = (f"- central DP (Flower, {self.cfg.clipping}-side clipping to {self.cfg.clipping_norm}, noise multiplier "
                f"{self.cfg.noise_multiplier}, {self.sites} sites): epsilon {entry['epsilon']:.3f} at delta "
                f"{self.cfg.delta:g} for a whole site's data, {entry['releases']} noised round(s)"
                + (f"; stopped early: {self.stopped}" if self.stopped else ""))
        return entry, line
