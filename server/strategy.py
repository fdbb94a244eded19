"""Flower's own strategies (FedAvg, FedProx, FedAdam), optionally under Flower's central-DP
wrappers, guarded.

The guard wraps the strategy and looks at every reply before it aggregates: a site that
failed (its reply names it and says why) or that sent a NaN/inf or misshapen update is
reported by name and left out; the strategy's own aggregation (and DP clipping, noise and
accounting) then runs on the rest, unchanged. It also keeps the per-site metrics of the last
round for progress lines.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Message
from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx, Strategy)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from cmvim.run_config import CentralDPConfig, StrategyConfig
from cmvim.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SITE, SITE_ERROR, SITE_NAME, WEIGHT

log = logging.getLogger("cmvim.server")


@dataclass
class RoundLog:
    """What the guard saw in the last train and evaluate rounds."""
    train: dict[str, dict] = field(default_factory=dict)        # site -> metrics
    evaluate: dict[str, dict] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)          # {"round", "site", "stage", "reason"}


SUPERLINK_NODE_ID = 1      # the sender of the error replies Flower's SuperLink makes for lost nodes


def site_name(msg: Message) -> str:
    if msg.has_error():
        if msg.metadata.src_node_id == SUPERLINK_NODE_ID:     # the SuperLink answered for a node it lost
            return "(unreachable)"
        return f"node {msg.metadata.src_node_id}"
    record = msg.content.get(SITE) if hasattr(msg.content, "get") else None
    return str(record[SITE_NAME]) if record is not None and SITE_NAME in record else f"node {msg.metadata.src_node_id}"


def _metrics(msg: Message) -> dict:
    record = msg.content.get(METRICS)
    return {k: v for k, v in record.items()} if record is not None else {}


def check_update(msg: Message, expected: dict[str, tuple] | None,
                 current: dict[str, np.ndarray] | None = None) -> str | None:
    """Why an update must be rejected, or None. With `current` (server-side DP clipping), an
    update equal to the global model is rejected too: Flower 1.42's clipping divides by the
    update's norm (flwrlabs/flower#7631)."""
    arrays = msg.content.get(ARRAYS)
    if arrays is None:
        return "no parameters in the reply"
    for key, array in arrays.items():
        values = array.numpy()
        if not np.all(np.isfinite(values)):
            bad = int((~np.isfinite(values)).sum())
            return f"non-finite update: {bad} NaN/inf values in {key!r}"
        if expected is not None and key in expected and tuple(values.shape) != expected[key]:
            return f"{key!r} has shape {tuple(values.shape)}, expected {expected[key]}"
    if expected is not None and set(arrays.keys()) != set(expected):
        missing = sorted(set(expected) - set(arrays.keys()))
        return f"the update lacks {len(missing)} parameters (first: {missing[0]})" if missing else \
            "the update carries parameters the global model does not have"
    if current and all(np.array_equal(array.numpy(), current[key]) for key, array in arrays.items()):
        return "the site sent the global model back unchanged (a zero update, which central DP clipping cannot scale)"
    return None


class CentralBudgetSpent(Exception):
    """Central DP: the next release would pass central_dp.max_epsilon; no more training."""


# Under central DP the strategy averages by protocol.WEIGHT, which the guard sets on every kept
# reply: 1 for training (equal weights: the noise is calibrated for a 1/n share each), the reply's
# NUM_EXAMPLES for validation metrics (as without DP).
class Guarded(Strategy):
    """Wraps a Flower strategy (possibly inside Flower's DP wrapper): replies are screened first.

    The inner strategy's own methods run unchanged on what is kept, so Flower's central-DP
    wrapper and its accountant see a plain FedAvg/FedProx aggregation.
    """

    def __init__(self, inner: Strategy, base: FedAvg, min_replies: int = 1, uniform_weights: bool = False):
        super().__init__()
        self.inner, self.base = inner, base        # base: the FedAvg-family strategy at the core
        self.min_replies = min_replies
        self.uniform_weights = uniform_weights
        self.round_log = RoundLog()
        self.expected_shapes: dict[str, tuple] | None = None
        self.current: dict[str, np.ndarray] = {}
        self.round_offset = 0

    def __repr__(self) -> str:
        return f"Guarded({self.inner!r})"

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):
        self.expected_shapes = {k: tuple(a.shape) for k, a in arrays.items()}
        if isinstance(self.inner, DifferentialPrivacyServerSideFixedClipping):
            self.current = {k: a.numpy() for k, a in arrays.items()}
        try:
            return list(self.inner.configure_train(server_round, arrays, config, grid))
        except PrivacyBudgetExhausted as exc:
            raise CentralBudgetSpent(str(exc)) from exc

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def _screen(self, server_round: int, replies: Iterable[Message], stage: str) -> list[Message]:
        kept, metrics = [], {}
        for msg in replies:
            name = site_name(msg)
            if msg.has_error():
                reason = f"the site's app crashed: {msg.error.reason.splitlines()[0][:200]}"
            else:
                error = msg.content.get(SITE, {}).get(SITE_ERROR) if SITE in msg.content else None
                reason = str(error) if error else (check_update(msg, self.expected_shapes, self.current)
                                                   if stage == "train" else None)
            if reason:
                entry = {"round": server_round + self.round_offset, "site": name, "stage": stage,
                         "reason": reason}
                self.round_log.rejected.append(entry)
                log.warning("round %d %s: site %s left out: %s", entry["round"], stage, name, reason)
                continue
            kept.append(msg)
            metrics[name] = _metrics(msg)
        setattr(self.round_log, stage, metrics)
        return kept

    def aggregate_train(self, server_round, replies):
        kept = self._screen(server_round, list(replies), "train")
        if len(kept) < self.min_replies:
            log.warning("round %d: %d valid update(s), fewer than the %d required: the global model "
                        "is kept as it was", server_round + self.round_offset, len(kept), self.min_replies)
            kept = []       # Flower's DP wrapper still closes the round's pending privacy event
        if self.uniform_weights:
            for msg in kept:
                msg.content[METRICS][WEIGHT] = 1
        if not kept and not isinstance(self.inner, DifferentialPrivacyFixedClippingBase):
            return None, None
        return self.inner.aggregate_train(server_round, kept)

    def aggregate_evaluate(self, server_round, replies):
        kept = self._screen(server_round, list(replies), "evaluate")
        kept = [m for m in kept if _metrics(m).get(NUM_EXAMPLES, 0) > 0]
        if self.uniform_weights:
            for msg in kept:
                msg.content[METRICS][WEIGHT] = msg.content[METRICS][NUM_EXAMPLES]
        return self.inner.aggregate_evaluate(server_round, kept) if kept else None


def central_accountant(cfg: CentralDPConfig, sites: int):
    """Flower's RDP accountant for one release per round over `sites` sites, none sampled out."""
    from flwr.serverapp import RdpAccountant          # needs flwr[dp] (Google's dp-accounting)
    return RdpAccountant(PrivacyConfig(target_delta=cfg.delta, population_size=sites,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION,
                                       max_epsilon=cfg.max_epsilon))


def make_strategy(cfg: StrategyConfig, evaluate: bool = True, central_dp: CentralDPConfig | None = None,
                  sites: int = 0, accountant=None) -> Guarded:
    """The configured strategy, inside Flower's central-DP wrapper if asked, inside the guard.

    Under central DP the noise is calibrated for `sites` replies a round: a round with fewer
    valid replies is not released (Flower's wrapper skips it; the global model stays as it was).
    """
    dp = central_dp is not None and central_dp.enabled
    common = dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate if evaluate else 0.0,
                  min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes if evaluate else 0,
                  min_available_nodes=cfg.min_nodes)
    if dp:
        # exactly `sites` sites a round (FedAvg samples max(int(fraction * connected), min_train_nodes)):
        # the noise is calibrated for that many, even if another site connects mid-run
        common.update(weighted_by_key=WEIGHT, fraction_train=1e-9, min_train_nodes=sites,
                      min_available_nodes=sites)
    if cfg.name == "fedprox":
        base = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.name == "fedadam":
        base = FedAdam(eta=cfg.eta, eta_l=cfg.eta_l, beta_1=cfg.beta_1, beta_2=cfg.beta_2, tau=cfg.tau, **common)
    else:
        base = FedAvg(**common)
    inner: Strategy = base
    if dp:
        wrapper = (DifferentialPrivacyServerSideFixedClipping if central_dp.clipping == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        inner = wrapper(base, central_dp.noise_multiplier, central_dp.clipping_norm, sites, accountant=accountant)
    return Guarded(inner, base, min_replies=sites if dp else cfg.min_nodes, uniform_weights=dp)


STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t")


def strategy_state(strategy: Guarded) -> dict:
    """The strategy's own state between rounds (FedAdam's moments), for checkpoints."""
    return {k: getattr(strategy.base, k) for k in STATE_ATTRIBUTES if getattr(strategy.base, k, None) is not None}


def restore_strategy_state(strategy: Guarded, state: dict) -> None:
    for key, value in state.items():
        setattr(strategy.base, key, value)
