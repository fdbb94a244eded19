"""Flower's own strategies (FedAvg, FedProx, FedAdam, and the robust FedMedian, FedTrimmedAvg,
Krum, MultiKrum, Bulyan), optionally under Flower's central-DP wrappers, guarded.

The guard wraps the strategy and looks at every reply before it aggregates. Left out, each
reported by site name with the reason: a site that failed (its reply says why); an update with
NaN/inf values, missing or misshapen parameters; a reply whose num-examples is not a positive
count; a reply whose metric keys differ from the other sites' (Flower would abort the whole
round on it); an update farther from the global model than `norm_bound` times the round's median
distance (or scaled back to it: `norm_action: clip`). What a site weighs is bounded: its
num-examples, capped at what it reported in its first round of the phase and at
`max_examples`, or equal weights. The strategy's own aggregation (and DP clipping, noise and
accounting) then runs on the rest, unchanged. It also keeps the per-site metrics of the last
round for progress lines.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import (Bulyan, DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedMedian, FedProx,
                                     FedTrimmedAvg, Krum, MultiKrum, Strategy)

from cmvim.flower_internals import DifferentialPrivacyFixedClippingBase, PrivacyBudgetExhausted
from cmvim.run_config import CentralDPConfig, StrategyConfig
from cmvim.protocol import (ARRAYS, METRICS, NUM_EXAMPLES, SITE, SITE_ERROR, SITE_NAME, VAL_ERROR, VAL_METRICS, VALIDATE,
                            WEIGHT)

log = logging.getLogger("cmvim.server")


@dataclass
class RoundLog:
    """What the guard saw in the last train and evaluate rounds."""
    train: dict[str, dict] = field(default_factory=dict)        # site -> metrics
    evaluate: dict[str, dict] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)          # {"round", "site", "stage", "reason"}
    carried: dict[str, dict] | None = None     # the previous round's validation, carried in this round's training
    aggregated: list[str] = field(default_factory=list)        # the sites whose updates made the new global model


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
    wrapper and its accountant see a plain FedAvg/FedProx aggregation. Every kept reply carries
    protocol.WEIGHT, the weight the strategy averages by (set here, never by a site).

    `round_offset`: the phase's rounds done before this strategy's first (a resumed phase), added
    to Flower's round counter wherever a round is named. `carry_validation`
    (evaluation.carry_validation): a training round's messages ask the sites to validate the model
    they carry first (when it is an earlier round's: absolute round > 1); only the phase's last
    round (`last_round`, Flower's round counter) sends validation messages of its own.
    """

    def __init__(self, inner: Strategy, base: FedAvg, min_replies: int = 1, uniform_weights: bool = False,
                 cfg: StrategyConfig | None = None, round_offset: int = 0, carry_validation: bool = False,
                 last_round: int = 0):
        super().__init__()
        self.inner, self.base = inner, base        # base: the FedAvg-family strategy at the core
        self.min_replies = min_replies
        self.cfg = cfg or StrategyConfig()
        self.uniform_weights = uniform_weights or self.cfg.weighting == "equal"
        self.round_log = RoundLog()
        self.expected_shapes: dict[str, tuple] | None = None
        self.current: dict[str, np.ndarray] = {}           # the global model, for DP's zero-update check
        self.global_arrays: dict[str, np.ndarray] = {}     # the global model the round started from
        self.declared: dict[str, float] = {}               # site -> num-examples of its first round here
        self.round_offset, self.carry_validation, self.last_round = round_offset, carry_validation, last_round

    def __repr__(self) -> str:
        return f"Guarded({self.inner!r})"

    def summary(self) -> None:
        self.inner.summary()

    def start_round(self, arrays: ArrayRecord) -> None:
        """Record the global model a training round starts from (what replies are checked against)."""
        self.expected_shapes = {k: tuple(a.shape) for k, a in arrays.items()}
        self.global_arrays = {k: a.numpy() for k, a in arrays.items()}
        if isinstance(self.inner, DifferentialPrivacyServerSideFixedClipping):
            self.current = self.global_arrays

    def carries(self, server_round: int) -> bool:
        """Whether this round's training messages carry the previous round's validation."""
        return self.carry_validation and server_round + self.round_offset > 1

    def configure_train(self, server_round, arrays, config, grid):
        self.start_round(arrays)
        if self.carries(server_round):
            config = ConfigRecord({**config, VALIDATE: 1})       # a copy: Flower reuses the phase's record
        try:
            return list(self.inner.configure_train(server_round, arrays, config, grid))
        except PrivacyBudgetExhausted as exc:
            raise CentralBudgetSpent(str(exc)) from exc

    def configure_evaluate(self, server_round, arrays, config, grid):
        if self.carry_validation and server_round < self.last_round:
            return []                   # validated by the sites at the start of the next round's training
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def _reject(self, server_round: int, name: str, stage: str, reason: str) -> None:
        entry = {"round": server_round + self.round_offset, "site": name, "stage": stage, "reason": reason}
        self.round_log.rejected.append(entry)
        log.warning("round %d %s: site %s left out: %s", entry["round"], stage, name, reason)

    def _screen(self, server_round: int, replies: Iterable[Message], stage: str) -> list[Message]:
        """Each reply on its own: failures, unusable updates, weights that are not counts."""
        kept = []
        for msg in replies:
            name = site_name(msg)
            if msg.has_error():
                reason = f"the site's app crashed: {msg.error.reason.splitlines()[0][:200]}"
            else:
                error = msg.content.get(SITE, {}).get(SITE_ERROR) if SITE in msg.content else None
                reason = str(error) if error else (check_update(msg, self.expected_shapes, self.current)
                                                   if stage == "train" else None)
                if not reason:
                    count = _metrics(msg).get(NUM_EXAMPLES)
                    if not isinstance(count, (int, float)) or not math.isfinite(count) or count < 0 or \
                            (stage == "train" and count == 0):
                        reason = f"num-examples {count!r} is not a positive count"
            if reason:
                self._reject(server_round, name, stage, reason)
                continue
            kept.append(msg)
        return kept

    def _same_metric_keys(self, server_round: int, kept: list[Message], stage: str) -> list[Message]:
        """Flower aggregates metrics key by key and aborts on replies that disagree: the replies
        whose keys differ from the most common set (ties: the smaller set) are left out."""
        keys = [frozenset(_metrics(m)) - {WEIGHT} for m in kept]       # WEIGHT: the guard's to set
        if len(set(keys)) <= 1:
            return kept
        counts = Counter(keys)
        reference = max(counts, key=lambda k: (counts[k], -len(k)))
        out = []
        for msg, own in zip(kept, keys):
            if own == reference:
                out.append(msg)
                continue
            extra, missing = sorted(own - reference), sorted(reference - own)
            self._reject(server_round, site_name(msg), stage,
                         "its metrics differ from the other sites' ("
                         + ", ".join(f"{what} {[k[:40] for k in names[:3]]}" for what, names in
                                     (("extra", extra), ("missing", missing)) if names) + ")")
        return out

    def _weigh(self, kept: list[Message], server_round: int) -> None:
        """protocol.WEIGHT on every kept training reply: 1 (equal weights), or its num-examples
        capped at its first round's and at max_examples."""
        for msg in kept:
            name, count = site_name(msg), float(_metrics(msg)[NUM_EXAMPLES])
            cap = min(self.declared.setdefault(name, min(count, self.cfg.max_examples)), self.cfg.max_examples)
            if count > cap:
                log.warning("round %d: site %s reports %g examples, more than the %g it started with: weighed as %g",
                            server_round + self.round_offset, name, count, cap, cap)
            msg.content[METRICS][WEIGHT] = 1 if self.uniform_weights else min(count, cap)

    def _bounded(self, server_round: int, kept: list[Message]) -> list[Message]:
        """Updates far larger than the round's typical one: rejected, or scaled back to the bound."""
        if self.cfg.norm_bound is None or len(kept) < 2 or not self.global_arrays or \
                isinstance(self.inner, DifferentialPrivacyFixedClippingBase):       # DP's clipping bounds them
            return kept
        norms = [update_norm(m, self.global_arrays) for m in kept]
        median = sorted(norms)[(len(norms) - 1) // 2]            # the lower median: with two sites, the smaller
        if median <= 0:
            return kept
        bound = self.cfg.norm_bound * median
        out = []
        for msg, norm in zip(kept, norms):
            if norm <= bound:
                out.append(msg)
                continue
            why = (f"update norm {norm:.3g} is {norm / median:.1f}x the round's median {median:.3g} "
                   f"(norm_bound {self.cfg.norm_bound:g}x)")
            if self.cfg.norm_action == "clip":
                scale = bound / norm
                arrays = msg.content[ARRAYS]
                msg.content[ARRAYS] = ArrayRecord({
                    k: torch.from_numpy((self.global_arrays[k] + scale * (a.numpy() - self.global_arrays[k]))
                                        .astype(a.numpy().dtype)) for k, a in arrays.items()})
                self._reject(server_round, site_name(msg), "train", f"clipped to the bound and kept: {why}")
                out.append(msg)
            else:
                self._reject(server_round, site_name(msg), "train", why)
        return out

    def _log_metrics(self, kept: list[Message], stage: str) -> None:
        setattr(self.round_log, stage, {site_name(m): _metrics(m) for m in kept})

    def _carried(self, server_round: int, replies: list[Message]) -> None:
        """round_log.carried: the validation of the previous round that the training replies carry
        (taken out of them: Flower's aggregation wants one MetricRecord a reply), screened like
        validation replies of their own; a site whose validation failed is named with why."""
        self.round_log.carried = None
        if not self.carries(server_round):
            return
        earlier, carried = server_round - 1, []
        for msg in replies:
            if msg.has_error():
                continue                     # the training's failure is reported by the training's screen
            record = msg.content.get(VAL_METRICS) if VAL_METRICS in msg.content else None
            if record is not None:
                del msg.content[VAL_METRICS]
                carried.append(_carrier(msg, record))
                continue
            site = msg.content.get(SITE) if SITE in msg.content else None
            error = site.get(VAL_ERROR) if site is not None else None
            if not (site is not None and SITE_ERROR in site):        # a failed training is reported as such
                self._reject(earlier, site_name(msg), "evaluate",
                             str(error) if error else "the training reply carries no validation")
        self.round_log.carried = {site_name(m): _metrics(m) for m in self._validations(earlier, carried)}

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self._carried(server_round, replies)
        kept = self._screen(server_round, replies, "train")
        kept = self._bounded(server_round, self._same_metric_keys(server_round, kept, "train"))
        self._log_metrics(kept, "train")
        if len(kept) < self.min_replies:
            log.warning("round %d: %d valid update(s), fewer than the %d required: the global model "
                        "is kept as it was", server_round + self.round_offset, len(kept), self.min_replies)
            kept = []       # Flower's DP wrapper still closes the round's pending privacy event
        self.round_log.aggregated = sorted(site_name(m) for m in kept)
        self._weigh(kept, server_round)
        if not kept and not isinstance(self.inner, DifferentialPrivacyFixedClippingBase):
            return None, None
        return self.inner.aggregate_train(server_round, kept)

    def _validations(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The validation replies that count: not failed, not suppressed, the common metric keys."""
        kept = self._screen(server_round, replies, "evaluate")
        kept = [m for m in kept if _metrics(m).get(NUM_EXAMPLES, 0) > 0]     # suppressed small cells say 0
        return self._same_metric_keys(server_round, kept, "evaluate")

    def aggregate_evaluate(self, server_round, replies):
        kept = self._validations(server_round, list(replies))
        self._log_metrics(kept, "evaluate")
        for msg in kept:
            msg.content[METRICS][WEIGHT] = msg.content[METRICS][NUM_EXAMPLES]
        return self.inner.aggregate_evaluate(server_round, kept) if kept else None


def _carrier(msg: Message, record: MetricRecord) -> Message:
    """A training reply's carried validation as a validation reply of its own (same sender)."""
    content = RecordDict({METRICS: record, SITE: ConfigRecord({SITE_NAME: site_name(msg)})})
    metadata = Metadata(run_id=msg.metadata.run_id, message_id=msg.metadata.message_id,
                        src_node_id=msg.metadata.src_node_id, dst_node_id=msg.metadata.dst_node_id,
                        reply_to_message_id=msg.metadata.reply_to_message_id, group_id=msg.metadata.group_id,
                        created_at=msg.metadata.created_at, ttl=msg.metadata.ttl, message_type=MessageType.EVALUATE)
    return Message(content=content, metadata=metadata)


def training_reply(site: str, node: int, arrays: dict, metrics: dict) -> Message:
    """A training reply as a site sends it (for the server's aggregation path run in-process:
    benchmarks and tests that play the sites, honest or not)."""
    content = RecordDict({ARRAYS: ArrayRecord(arrays),
                          METRICS: MetricRecord({k: v for k, v in metrics.items() if isinstance(v, (int, float))}),
                          SITE: ConfigRecord({SITE_NAME: site})})
    metadata = Metadata(run_id=0, message_id=f"{site}-{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=metadata)


def update_norm(msg: Message, global_arrays: dict[str, np.ndarray]) -> float:
    """The L2 distance of a reply's parameters from the global model, over every array."""
    total = 0.0
    for key, array in msg.content[ARRAYS].items():
        diff = array.numpy().astype(np.float64) - global_arrays[key]
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def central_accountant(cfg: CentralDPConfig, sites: int):
    """Flower's RDP accountant for one release per round over `sites` sites, none sampled out."""
    if importlib.util.find_spec("dp_accounting") is None:
        raise ImportError("central DP's accountant needs Google's dp-accounting, which the coordinator's install "
                          "carries: pip install 'cmvim[server]'")
    from flwr.serverapp import RdpAccountant          # needs flwr[dp] (Google's dp-accounting)
    return RdpAccountant(PrivacyConfig(target_delta=cfg.delta, population_size=sites,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION,
                                       max_epsilon=cfg.max_epsilon))


def make_strategy(cfg: StrategyConfig, evaluate: bool = True, central_dp: CentralDPConfig | None = None,
                  sites: int = 0, accountant=None, round_offset: int = 0, carry_validation: bool = False,
                  last_round: int = 0) -> Guarded:
    """The configured strategy, inside Flower's central-DP wrapper if asked, inside the guard
    (`round_offset`, `carry_validation`, `last_round`: the guard's, see Guarded).

    Under central DP the noise is calibrated for `sites` replies a round: a round with fewer
    valid replies is not released (Flower's wrapper skips it; the global model stays as it was).
    """
    dp = central_dp is not None and central_dp.enabled
    common = dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate if evaluate else 0.0,
                  min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes if evaluate else 0,
                  min_available_nodes=cfg.min_nodes, weighted_by_key=WEIGHT)     # the guard sets WEIGHT
    if dp:
        # exactly `sites` sites a round (FedAvg samples max(int(fraction * connected), min_train_nodes)):
        # the noise is calibrated for that many, even if another site connects mid-run
        common.update(fraction_train=1e-9, min_train_nodes=sites, min_available_nodes=sites)
    robust = {"fedmedian": lambda: FedMedian(**common),
              "fedtrimmedavg": lambda: FedTrimmedAvg(beta=cfg.trim_beta, **common),
              "krum": lambda: Krum(num_malicious_nodes=cfg.num_malicious, **common),
              "multikrum": lambda: MultiKrum(num_malicious_nodes=cfg.num_malicious,
                                             num_nodes_to_select=cfg.multikrum_select, **common),
              "bulyan": lambda: Bulyan(num_malicious_nodes=cfg.num_malicious, **common)}
    if cfg.name == "fedprox":
        base = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.name == "fedadam":
        base = FedAdam(eta=cfg.eta, eta_l=cfg.eta_l, beta_1=cfg.beta_1, beta_2=cfg.beta_2, tau=cfg.tau, **common)
    elif cfg.name in robust:
        base = robust[cfg.name]()
    else:
        base = FedAvg(**common)
    inner: Strategy = base
    if dp:
        wrapper = (DifferentialPrivacyServerSideFixedClipping if central_dp.clipping == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        inner = wrapper(base, central_dp.noise_multiplier, central_dp.clipping_norm, sites, accountant=accountant)
    return Guarded(inner, base, min_replies=sites if dp else cfg.min_nodes, uniform_weights=dp, cfg=cfg,
                   round_offset=round_offset, carry_validation=carry_validation, last_round=last_round)


STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t")


def strategy_state(strategy: Guarded) -> dict:
    """The strategy's own state between rounds (FedAdam's moments), for checkpoints."""
    return {k: getattr(strategy.base, k) for k in STATE_ATTRIBUTES if getattr(strategy.base, k, None) is not None}


def restore_strategy_state(strategy: Guarded, state: dict) -> None:
    for key, value in state.items():
        setattr(strategy.base, key, value)
