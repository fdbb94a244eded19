"""Training rounds through Flower's SecAgg+: the server learns the weighted average of the
sites' models and nothing about any one of them.

Flower 1.42's `SecAggPlusWorkflow` runs on its legacy machinery: a `LegacyContext`, a legacy
strategy (`flwr.server.strategy.FedAvg`: configure_fit/aggregate_fit) and a client manager
fed from the Grid. `SecureAggregator` drives it one round at a time from cmvim's ServerApp,
so evaluation, checkpoints and progress stay on the Message API (cmvim.server.runner). The sites'
side is `cmvim.client.secagg.secagg_mod`.

What the server can still say per site: its aggregate metrics (loss, num-examples, epsilon,
sent in the clear as without SecAgg+) and which sites dropped out of a round and, when one
site dropped, why. It cannot screen an update for NaN/inf: the sites do that before masking.
"""
from __future__ import annotations

import logging
import re
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.serverapp import Grid

from cmvim.flower_internals import (LegacyContext, LegacyFedAvg, SecAggPlusWorkflow, ServerConfig,
                                    start_update_client_manager_thread)
from cmvim.flower_internals import recorddict_compat as compat
from cmvim.run_config import SecureAggregationConfig
from cmvim.protocol import NUM_EXAMPLES, SECAGG_NAMES, SECAGG_SITE, SERVER_ROUND

log = logging.getLogger("cmvim.server")

PARAMETERS, ROUND_CONFIG = "parameters", "config"   # the LegacyContext state records the workflow reads and writes


def dropout_reason(error) -> tuple[str | None, str]:
    """(site, reason) from a site's error reply: the public text of its SecAggDropout, found in
    Flower's "<class ...>:<'...'>" wrapping (deployment) or in Ray's traceback (simulation)."""
    text = str(getattr(error, "reason", error))
    for line in text.splitlines():
        match = re.search(r"SecAggDropout\W+site ([\w.-]+): (.*?)(?:'>)?\s*$", line)
        if match:
            return match.group(1), match.group(2)[:200]
    return None, "the site's app failed during the protocol (details in its log)"


class RecordingFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg that remembers, per round, whom it asked and what they reported."""

    def __init__(self, fit_config, **kwargs):
        super().__init__(on_fit_config_fn=fit_config, **kwargs)
        self.sampled: list[int] = []
        self.answered: list[int] | None = None      # None: the round never reached aggregation
        self.sites: dict[str, dict] = {}
        self.node_names: dict[int, str] = {}
        self.failures: list[tuple[str | None, str]] = []

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = [proxy.node_id for proxy, _ in instructions]
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        self.sites, self.answered = {}, [proxy.node_id for proxy, _ in results]
        for proxy, fit in results:
            metrics = dict(fit.metrics)
            name = str(metrics.pop(SECAGG_SITE, "")) or f"node {proxy.node_id}"
            self.node_names[proxy.node_id] = name
            self.sites[name] = {**metrics, NUM_EXAMPLES: fit.num_examples}
        self.failures = sorted({dropout_reason(f.args[0] if isinstance(f, Exception) and f.args else f)
                                for f in failures}, key=str)
        return super().aggregate_fit(server_round, results, failures)


class SecureAggregator:
    def __init__(self, grid: Grid, context: Context, cfg: SecureAggregationConfig, min_nodes: int, timeout: float):
        self.grid = grid
        self.round_config: dict = {}
        self.strategy = RecordingFedAvg(lambda _round: dict(self.round_config), fraction_fit=1.0,
                                        fraction_evaluate=0.0, min_fit_clients=min_nodes,
                                        min_available_clients=min_nodes, min_evaluate_clients=0,
                                        fit_metrics_aggregation_fn=lambda _metrics: {})   # kept per site instead
        self.workflow = SecAggPlusWorkflow(**cfg.flower_args(), timeout=cfg.timeout or timeout)
        self.context = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=self.strategy)
        self._thread, self._stop, ready = start_update_client_manager_thread(grid, self.context.client_manager)
        ready.wait()

    def round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
              ) -> tuple[ArrayRecord | None, dict[str, dict], list[dict]]:
        """One SecAgg+ training round: (the new global model or None, per-site metrics, dropouts)."""
        names = list(arrays.keys())
        dtypes = [a.dtype for a in arrays.to_numpy_ndarrays()]
        self.round_config = {**dict(config), SERVER_ROUND: server_round, SECAGG_NAMES: ",".join(names)}
        self.strategy.sampled, self.strategy.sites, self.strategy.failures = [], {}, []
        self.strategy.answered = None
        state = self.context.state
        state.config_records[ROUND_CONFIG] = ConfigRecord({"current_round": server_round, "start_time": time.time()})
        sent = compat.parameters_to_arrayrecord(ndarrays_to_parameters(arrays.to_numpy_ndarrays()), keep_input=True)
        state.array_records[PARAMETERS] = sent
        self.workflow(self.grid, self.context)
        got = state.array_records[PARAMETERS]
        dropouts = self._dropouts()
        if got is sent:            # the protocol stopped (too few sites) or nothing was aggregated
            return None, self.strategy.sites, dropouts
        weights = parameters_to_ndarrays(compat.arrayrecord_to_parameters(got, keep_input=True))
        return (ArrayRecord({n: Array(w.astype(d)) for n, w, d in zip(names, weights, dtypes, strict=True)}),
                self.strategy.sites, dropouts)

    def _dropouts(self) -> list[dict]:
        """Who dropped out of the round and why: a site's own reason ("site C: ...") where its
        error reply arrived, else its node (named from earlier rounds)."""
        strategy = self.strategy
        names = [strategy.node_names.get(node, f"node {node}") for node in strategy.sampled]
        if strategy.answered is None:           # Flower stopped the protocol: nobody's update counted
            return [{"site": name, "reason": "the secure aggregation round stopped before aggregating: fewer "
                                             "sites than its reconstruction threshold completed it"} for name in names]
        out = [{"site": site or "(unnamed)", "reason": reason} for site, reason in strategy.failures]
        dropped = [name for node, name in zip(strategy.sampled, names) if node not in strategy.answered]
        silent = [name for name in dropped if name not in {entry["site"] for entry in out}]
        for name in silent[:max(0, len(dropped) - len(out))]:       # dropped without an error reply
            out.append({"site": name, "reason": "no masked update arrived within the round"})
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
