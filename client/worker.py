"""The warm site worker: one long-lived process that runs every message of a site's SuperNode.

Flower 1.42's SuperNode hands each message to a fresh `flwr-clientapp` process (through its
SuperExec): interpreter start, FAB install, `import torch, flwr, cmvim`, the numba kernel's cache,
the site's data read and checked again, then one message and exit - most of a deployed round
(docs/benchmarks/deploy.md). `cmvim-client` instead starts the SuperNode in Flower's `process`
isolation mode, where the SuperNode launches nothing and an outside SuperExec takes its tasks,
and runs this worker as that SuperExec: it asks the SuperNode for the next task (Flower's Runtime
API on 127.0.0.1, AcquireTask signed with a secret only this site's processes can read) and runs
it here, in this process, with everything already imported and the site's data already loaded.

What a message runs is unchanged: the app bundle is checked against the site policy exactly as
the `flwr-clientapp` guard checks it (cmvim.client.approved_app: a bundle that carries no code and
names cmvim's ClientApp, or an approved hash), then the ClientApp this site installed,
`cmvim.client.app`, handles it with the same policy check, privacy ledger and release counts, and
its context (the site's personalised state) goes back to the SuperNode as Flower's own runner
sends it. A task that fails here is answered with Flower's error reply, as a crashed
`flwr-clientapp` would be; if the worker itself dies, `cmvim-client` starts it again and the
SuperNode's next task finds it (the lost message is a failed site-round for the server, which goes
on with the other sites).

    python -m cmvim.client.worker --runtime-api-address 127.0.0.1:PORT --auth-secret-file FILE [--policy FILE]
        [--site A --data DIR --state-dir DIR [--device D]]

It talks only to a Runtime API whose listening socket is this site's user's, and runs every task
under the settings it was started with (cmvim.client.local_guard): another local user who takes
the port, or hands it a task naming another policy or folder, gets nothing.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("cmvim.client.worker")

POLL_FAST, POLL_SLOW = 0.02, 0.2   # asking the local API for the next task: 20 ms after a task, growing to 0.2 s
OWNER_CHECK_EVERY = 1.0    # s between checks of who listens on the Runtime API port while polling (always before a task)
STOP_GRACE = 10.0           # a stop during a task: this long to finish and reply, then the process ends
READY = "cmvim site worker: ready"


def _runtime_client(address: str, interceptors: list):
    from cmvim.flower_internals import RuntimeHttpClient, make_simple_http_retry_invoker
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str, policy_file: str | None, own: dict | None = None) -> str:
    """One task, as Flower's `flwr-clientapp` runs it, in this process: pull the message and context,
    check the bundle, run the installed ClientApp under this worker's own node config (`own`: its
    start-up settings, cmvim.client.local_guard), push the reply and the context. Returns the status."""
    from flwr.app import Error, Message

    from cmvim.flower_internals import (ErrorCode, HeartbeatSender, RuntimeTokenHttpInterceptor,
                                        RuntimeVersionHttpInterceptor, SubStatus, make_task_heartbeat_fn_http,
                                        pull_task_input, push_message, push_task_output)

    from .app import app as client_app
    from .approved_app import check_bundle
    from .local_guard import own_node_config
    from .policy import load_policy

    client = _runtime_client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                       RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        heartbeat.start()
        message, context, _run, fab = pull_task_input(client)
        if own is not None:                  # the site's settings, never the task's (refused if it names others)
            context.node_config = own_node_config(dict(context.node_config), own)
        check_bundle(fab.content, load_policy(policy_file))       # the same rule as the flwr-clientapp guard
        reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # answered as Flower answers a failed ClientApp; the worker goes on
        log.error("task failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        finally:
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return status


_busy = threading.Event()          # set while a task runs: a stop request then waits for its reply


def warm_up() -> str:
    """Load the selective-scan kernel before the first task: one forward and backward of a small
    Vim mixer (the call the model makes) on the device a run with `device: auto` uses. On the CPU
    that is numba's compiled kernel, from its disk cache in ~1 s, compiled in ~20 s on a site's
    very first start; on a GPU the CUDA context and mamba-ssm's kernels. Without it the first
    message of a run paid this inside its round. A failure is logged and left to the first task,
    which reports it to the server in its own words. Returns what was done, for the log."""
    import torch

    from cmvim.device import resolve_device
    from cmvim.model.vim import BiMamba
    started = time.perf_counter()
    try:
        device = resolve_device("auto")
        mixer = BiMamba(d_model=16, d_state=4).to(device)
        mixer(torch.randn(1, 8, 16, device=device)).sum().backward()
    except Exception as exc:  # noqa: BLE001 - the first task meets the same problem and reports it
        log.warning("scan kernel warm-up failed (%s: %s); the first task will load it", type(exc).__name__, exc)
        return "scan kernel warm-up failed"
    return f"scan kernel ready on {device.type} in {time.perf_counter() - started:.1f} s"


def serve(address: str, secret: bytes, policy_file: str | None, stop: threading.Event | None = None,
          own: dict | None = None) -> None:
    """Take the SuperNode's tasks one at a time until `stop` is set (or the process is stopped).
    Before each request for a task and before reading one, the Runtime API's listening socket
    must be this site's user's (ForeignRuntime otherwise: cmvim.client.local_guard)."""
    import cmvim.client.app  # noqa: F401 - torch, flwr and cmvim imported once, before the first task

    from cmvim.flower_internals import (AcquireTaskRequest, RuntimeVersionHttpInterceptor,
                                        SuperExecAuthHttpInterceptor, TaskType)
    from cmvim.flower_polls import Backoff, shorten_object_backoff

    from .local_guard import check_runtime_owner
    log.info(warm_up())
    shorten_object_backoff(0.02, 0.2)              # the message's objects, from this machine's SuperNode: 20 ms, not 1 s
    stop = stop or threading.Event()
    idle = Backoff(POLL_FAST, POLL_SLOW)           # the next message of a round comes soon after a reply
    client = _runtime_client(address, [
        RuntimeVersionHttpInterceptor(component_name="SuperExec"),
        SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset(
            {"/flwr.proto.Runtime/AcquireTask"}))])
    port = int(address.rsplit(":", 1)[1])
    checked = -OWNER_CHECK_EVERY                   # the socket table costs ~ms to read: not at every 20 ms poll
    print(READY, flush=True)
    try:
        while not stop.is_set():
            if time.monotonic() - checked >= OWNER_CHECK_EVERY:
                check_runtime_owner(port)
                checked = time.monotonic()
            answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                           agentapp_fab_hashes=[]))
            if answer.HasField("task") and answer.token:
                log.info("task %d started", answer.task.task_id)
                started = time.perf_counter()
                _busy.set()
                try:
                    check_runtime_owner(port)      # the port may have changed hands while the task was handed over
                    status = run_task(address, answer.token, policy_file, own)
                finally:
                    _busy.clear()
                    idle.mark()
                log.info("task %d %s in %.1f s", answer.task.task_id, status, time.perf_counter() - started)
            else:
                stop.wait(idle.interval())
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmvim.client.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, 127.0.0.1:PORT")
    parser.add_argument("--auth-secret-file", required=True, type=Path,
                        help="the SuperExec secret the SuperNode was started with (0600, in the site's state folder)")
    parser.add_argument("--policy", help="the site policy (default: CMVIM_SITE_POLICY, else the default policy)")
    parser.add_argument("--site", help="the site's name: with --data and --state-dir, the settings every task runs "
                                       "under (a task naming others is refused); cmvim-client sets them")
    parser.add_argument("--data", help="the site folder")
    parser.add_argument("--state-dir", help="the site's state folder (ledger, release log)")
    parser.add_argument("--device", help="the site's --device, if it set one")
    parser.add_argument("--coordinator-key", help="the coordinator's public key: only instructions it signed run")
    args = parser.parse_args(argv)
    host = args.runtime_api_address.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        print(f"cmvim site worker: the Runtime API must be on this machine's loopback, not {host}", file=sys.stderr)
        return 2
    secret = args.auth_secret_file.read_bytes()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)        # a line per poll otherwise
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        if not _busy.is_set():          # idle (or retrying a SuperNode that is gone): leave now
            raise SystemExit(0)
        # in a task: let it reply, but never outlive the stop by more than STOP_GRACE (when
        # cmvim-client was killed, the SuperNode is gone too and the task's retries would not end)
        timer = threading.Timer(STOP_GRACE, os._exit, args=(0,))
        timer.daemon = True
        timer.start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from .approved_app import POLICY_ENV
    from .local_guard import ForeignRuntime
    policy = args.policy or os.environ.get(POLICY_ENV) or None
    own = None if args.site is None else {"site": args.site, "data-dir": args.data, "state-dir": args.state_dir,
                                          "policy": policy, "device": args.device,
                                          "coordinator-key": args.coordinator_key}
    try:
        serve(args.runtime_api_address, secret, policy, stop, own)
    except ForeignRuntime as err:
        print(f"cmvim site worker: {err}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
