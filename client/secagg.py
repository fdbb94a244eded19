"""Flower's SecAgg+ at a site, in front of cmvim's Message-API train handler.

Flower 1.42 ships SecAgg+ for its legacy records only: the server's `SecAggPlusWorkflow` sends
four stages of TRAIN messages, and the client's `secaggplus_mod` calls the app in the third
with a legacy fit request ("fitins.parameters", "fitins.config") and expects a legacy fit
reply ("fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status"). It also
reads its config record unconditionally, so ordinary messages would raise KeyError there.

`secagg_mod` applies `secaggplus_mod` to SecAgg+ messages only, and translates that one call
to and from the keys cmvim's handler speaks. Because the server can no longer look at a
single update, the checks it would do happen here, before masking: an update with NaN/inf, or
with a weight outside what SecAgg+'s quantization can carry (it would be clipped silently),
is not sent: the site drops out of the round with the reason, and the round goes on without
it if enough sites remain.
"""
from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from cmvim.flower_internals import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, secaggplus_mod
from cmvim.flower_internals import recorddict_compat as compat
from cmvim.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SECAGG_MASKED, SECAGG_NAMES, SECAGG_SITE, SITE, SITE_ERROR, SITE_NAME


class SecAggDropout(Exception):
    """The site sends no masked update this round. The message ("site A: why") is public: it
    crosses the network in Flower's error reply, so it carries no site data."""


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """`secaggplus_mod` for SecAgg+ messages; every other message passes untouched."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if CONFIG in msg.content and SECAGG_MASKED in msg.content[CONFIG]:
            del msg.content[CONFIG][SECAGG_MASKED]       # only this module may say a reply will be masked
        return call_next(msg, context)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(max(level, logging.INFO))         # the protocol logs every stage at DEBUG
    try:
        return secaggplus_mod(msg, context, lambda m, c: _fit_through_handler(m, c, call_next))
    finally:
        flwr_log.setLevel(level)


def _fit_through_handler(msg: Message, context: Context, call_next) -> Message:
    legacy = msg.content
    weights = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy["fitins.parameters"], keep_input=True))
    config = ConfigRecord(dict(legacy["fitins.config"]))
    names = str(config.pop(SECAGG_NAMES, "")).split(",")
    config[SECAGG_MASKED] = True
    if len(names) != len(weights):
        raise SecAggDropout(f"malformed secure aggregation request: {len(names)} names for {len(weights)} arrays")
    msg.content = RecordDict({ARRAYS: ArrayRecord({n: Array(np.asarray(w)) for n, w in zip(names, weights)}),
                              CONFIG: config})
    reply = call_next(msg, context)
    content = reply.content if not reply.has_error() else RecordDict()
    site = str(content[SITE][SITE_NAME]) if SITE in content else str(context.node_config.get("site", "?"))
    if ARRAYS not in content:
        error = content[SITE].get(SITE_ERROR) if SITE in content else None
        raise SecAggDropout(f"site {site}: {error or 'its app failed (details in the site log)'}")
    metrics = dict(content[METRICS]) if METRICS in content else {}
    num_examples = int(metrics.pop(NUM_EXAMPLES, 0))
    arrays = content[ARRAYS].to_numpy_ndarrays()
    try:
        check_maskable(arrays, num_examples, context)
    except SecAggDropout as exc:
        raise SecAggDropout(f"site {site}: {exc}") from None
    return Message(RecordDict({
        "fitres.parameters": compat.parameters_to_arrayrecord(ndarrays_to_parameters(arrays), keep_input=True),
        "fitres.num_examples": MetricRecord({"num_examples": num_examples}),
        # aggregate metrics (loss, counts, epsilon) travel in the clear, as without SecAgg+
        "fitres.metrics": ConfigRecord({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                        SECAGG_SITE: site}),
        "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
    }), reply_to=msg)


def check_maskable(arrays: list[np.ndarray], num_examples: int, context: Context) -> None:
    """Refuse (drop out) rather than let SecAgg+ clip or wrap an update silently."""
    state = context.state.config_records[RECORD_KEY_STATE]
    max_weight, clipping_range = float(state["max_weight"]), float(state["clipping_range"])
    if num_examples <= 0:
        raise SecAggDropout("the site trained on no subjects this round")
    if num_examples > max_weight:
        raise SecAggDropout(f"num-examples {num_examples} exceeds secure_aggregation.max_weight {max_weight:g}")
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise SecAggDropout("non-finite update (NaN/inf): not sent")
    largest = max(float(np.max(np.abs(a))) for a in arrays if a.size) * num_examples / max_weight
    if largest > clipping_range:
        raise SecAggDropout(f"a weight x num-examples / max_weight reaches {largest:.3g}, outside "
                            f"secure_aggregation.clipping_range {clipping_range:g}")
