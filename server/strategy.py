"""Flower's own strategies (FedAvg, FedProx, FedAdam), guarded.

The guard is a thin subclass that looks at every reply before the strategy aggregates it:
a site that failed (its reply names it and says why) or that sent a NaN/inf or misshapen
update is reported by name and left out; the strategy's own aggregation then runs on the
rest, unchanged. It also keeps the per-site metrics of the last round for progress lines.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from cmvim.federation import ARRAYS, METRICS, SITE, StrategyConfig

log = logging.getLogger("cmvim.server")

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


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
    return str(record["name"]) if record is not None and "name" in record else f"node {msg.metadata.src_node_id}"


def _metrics(msg: Message) -> dict:
    record = msg.content.get(METRICS)
    return {k: v for k, v in record.items()} if record is not None else {}


def check_update(msg: Message, expected: dict[str, tuple] | None) -> str | None:
    """Why an update must be rejected, or None."""
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
    return None


def guarded(strategy_cls):
    class Guarded(strategy_cls):
        """`strategy_cls`, with replies checked before its own aggregation runs."""

        def __init__(self, *args, min_replies: int = 1, **kwargs):
            super().__init__(*args, **kwargs)
            self.min_replies = min_replies
            self.round_log = RoundLog()
            self.expected_shapes: dict[str, tuple] | None = None
            self.round_offset = 0

        def configure_train(self, server_round, arrays, config, grid):
            self.expected_shapes = {k: tuple(a.shape) for k, a in arrays.items()}
            return super().configure_train(server_round, arrays, config, grid)

        def _screen(self, server_round: int, replies: Iterable[Message], stage: str) -> list[Message]:
            kept, metrics = [], {}
            for msg in replies:
                name = site_name(msg)
                if msg.has_error():
                    reason = f"the site's app crashed: {msg.error.reason.splitlines()[0][:200]}"
                else:
                    error = msg.content.get(SITE, {}).get("error") if SITE in msg.content else None
                    reason = str(error) if error else (check_update(msg, self.expected_shapes)
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
                return None, None
            return super().aggregate_train(server_round, kept)

        def aggregate_evaluate(self, server_round, replies):
            kept = self._screen(server_round, list(replies), "evaluate")
            kept = [m for m in kept if _metrics(m).get("num-examples", 0) > 0]
            return super().aggregate_evaluate(server_round, kept) if kept else None

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{strategy_cls.__name__}"
    return Guarded


def make_strategy(cfg: StrategyConfig, evaluate: bool = True):
    cls = guarded(STRATEGIES[cfg.name])
    common = dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate if evaluate else 0.0,
                  min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes if evaluate else 0,
                  min_available_nodes=cfg.min_nodes, min_replies=cfg.min_nodes)
    if cfg.name == "fedprox":
        return cls(proximal_mu=cfg.proximal_mu, **common)
    if cfg.name == "fedadam":
        return cls(eta=cfg.eta, eta_l=cfg.eta_l, beta_1=cfg.beta_1, beta_2=cfg.beta_2, tau=cfg.tau, **common)
    return cls(**common)


STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t")


def strategy_state(strategy) -> dict:
    """The strategy's own state between rounds (FedAdam's moments), for checkpoints."""
    return {k: getattr(strategy, k) for k in STATE_ATTRIBUTES if getattr(strategy, k, None) is not None}


def restore_strategy_state(strategy, state: dict) -> None:
    for key, value in state.items():
        setattr(strategy, key, value)
