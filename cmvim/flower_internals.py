"""Every piece of Flower's internals that cmvim uses, named once, with where Flower 1.42 keeps it.

Flower's public API is what its public packages export (their `__all__`): `flwr.app`,
`flwr.serverapp` (and `.strategy`), `flwr.clientapp` (and `.mod`), `flwr.common` and
`flwr.simulation`. Everything else is an internal: a name taken from a module below those
(`flwr.common.constant`, `flwr.app.error`, `flwr.serverapp.strategy.dp_fixed_clipping`) or from
any other package (`flwr.server`, `flwr.client` and `flwr.compat`, the legacy API SecAgg+ still
runs on; `flwr.supernode`, `flwr.superlink`, `flwr.supercore`, `flwr.proto`). Internals move
between releases without notice, so only this module, cmvim.flower_polls (the shorter waits) and
cmvim.flower_process (Flower's processes) reach them (tests/test_layers.py); a Flower upgrade
reads these three and runs tests/test_flower_internals.py and tests/test_polls.py.

A name here is imported when first asked for (`from cmvim.flower_internals import FlowerError`
inside a function stays as lazy as the import it replaces); the guards put cmvim's checks in
front of a Flower function, once per process, where the process starts.
"""
from __future__ import annotations

import importlib

# name: (Flower 1.42 module, attribute; None: the module itself)
INTERNALS: dict[str, tuple[str, str | None]] = {
    # the SuperLink's Fleet API takes only replies, each signed header once (cmvim.server.superlink)
    "ApiErrorCode": ("flwr.supercore.error", "ApiErrorCode"),
    "FlowerError": ("flwr.supercore.error", "FlowerError"),
    "SYSTEM_TIME_TOLERANCE": ("flwr.common.constant", "SYSTEM_TIME_TOLERANCE"),
    "TIMESTAMP_TOLERANCE": ("flwr.common.constant", "TIMESTAMP_TOLERANCE"),
    "TIMESTAMP_HEADER": ("flwr.common.constant", "TIMESTAMP_HEADER"),
    "FLEET_HTTP_PUBLIC_KEY_HEADER": ("flwr.supercore.constant", "FLEET_HTTP_PUBLIC_KEY_HEADER"),
    "FLEET_HTTP_SIGNATURE_HEADER": ("flwr.supercore.constant", "FLEET_HTTP_SIGNATURE_HEADER"),
    # Flower's commands, run in our processes after the guards and waits are in place
    "flower_superlink": ("flwr.superlink.cli", "flower_superlink"),
    "flower_supernode": ("flwr.supernode.cli.flower_supernode", "flower_supernode"),
    "flwr_clientapp": ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
    # the warm site worker runs a task as flwr-clientapp does, through the SuperNode's Runtime API
    # (cmvim.client.worker)
    "AcquireTaskRequest": ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    "ErrorCode": ("flwr.common.constant", "ErrorCode"),
    "HeartbeatSender": ("flwr.supercore.heartbeat", "HeartbeatSender"),
    "RuntimeHttpClient": ("flwr.supercore.runtime", "RuntimeHttpClient"),
    "RuntimeTokenHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    "RuntimeVersionHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    "SubStatus": ("flwr.common.constant", "SubStatus"),
    "SuperExecAuthHttpInterceptor": ("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor"),
    "TaskType": ("flwr.supercore.constant", "TaskType"),
    "make_simple_http_retry_invoker": ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    "make_task_heartbeat_fn_http": ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http"),
    "pull_task_input": ("flwr.supernode.runtime.run_clientapp", "pull_task_input"),
    "push_message": ("flwr.supernode.runtime.run_clientapp", "push_message"),
    "push_task_output": ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
    # SecAgg+, which Flower 1.42 ships for its legacy records and strategies only
    # (cmvim.server.secagg, cmvim.client.secagg)
    "LegacyContext": ("flwr.server", "LegacyContext"),
    "LegacyFedAvg": ("flwr.server.strategy", "FedAvg"),
    "RECORD_KEY_CONFIGS": ("flwr.common.secure_aggregation.secaggplus_constants", "RECORD_KEY_CONFIGS"),
    "RECORD_KEY_STATE": ("flwr.common.secure_aggregation.secaggplus_constants", "RECORD_KEY_STATE"),
    "SecAggPlusWorkflow": ("flwr.server.workflow", "SecAggPlusWorkflow"),
    "ServerConfig": ("flwr.server", "ServerConfig"),
    "recorddict_compat": ("flwr.compat.common.recorddict_compat", None),
    "secaggplus_mod": ("flwr.client.mod", "secaggplus_mod"),
    "start_update_client_manager_thread": ("flwr.server.compat.app_utils", "start_update_client_manager_thread"),
    # how many objects a model's weights travel as (benchmarks/deploy_overhead.py)
    "get_all_nested_objects": ("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects"),
    # central DP's record key and strategy base, budget exhaustion (client/app.py and server/strategy.py
    # still import these from Flower directly: tests/test_layers.py's PENDING)
    "KEY_CLIPPING_NORM": ("flwr.supercore.differential_privacy", "KEY_CLIPPING_NORM"),
    "DifferentialPrivacyFixedClippingBase": ("flwr.serverapp.strategy.dp_fixed_clipping",
                                             "DifferentialPrivacyFixedClippingBase"),
    "PrivacyBudgetExhausted": ("flwr.serverapp.exception", "PrivacyBudgetExhausted"),
}

# the Flower functions cmvim puts a check in front of: guard name -> (module, function)
GUARDED = {
    # every message a site pushes (the gRPC and HTTP servicers look it up on its module per request)
    "fleet push": ("flwr.superlink.servicer.fleet.fleet_handlers", "push_messages"),
    # every Fleet HTTP request's node authentication (the middleware looks it up the same way)
    "fleet authentication": ("flwr.superlink.routers.fleet.node_auth", "authenticate_node"),
    # flwr-clientapp's installation of the app bundle (FAB), before any of it is imported
    "fab install": ("flwr.supernode.runtime.run_clientapp", "install_from_fab"),
}


def __getattr__(name: str):
    try:
        module, attribute = INTERNALS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (Flower internals cmvim uses are "
                             "listed in its INTERNALS)") from None
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(INTERNALS))


def guard(name: str, wrap) -> bool:
    """Flower's function GUARDED[name] replaced by `wrap(function)` in its module, once per process:
    False (and nothing changed) when a guard is in front of it already."""
    module_name, attribute = GUARDED[name]
    module = importlib.import_module(module_name)
    function = getattr(module, attribute)
    if getattr(function, "_cmvim_guard", None) is not None:
        return False
    guarded = wrap(function)
    guarded._cmvim_guard = name
    setattr(module, attribute, guarded)
    return True
