"""`python -m cmvim.server.superlink [flower-superlink options]`: Flower's SuperLink, with its Fleet
API taking only replies from the sites, each signed header once, each site at a bounded rate
(issue #30, findings 1 and 3).

Flower 1.42 checks a reply thoroughly (the message it answers must exist, be addressed to the
sender's node and still be alive; one reply per instruction; its TTL no longer than the
instruction's), but a pushed message with no `reply_to` is stored as a new instruction for any
node, with any size and TTL: a site could instruct another site, or fill the coordinator's
memory with messages to itself. A site never has a reason to send anything but replies, so this
SuperLink refuses, before anything is stored, every pushed message that is not one, and every
one whose sender is not the node the request authenticated (Flower matches a reply's stated
sender, not the authenticated one, against the instruction's destination: another site could
otherwise answer in a site's name).

It also holds each site to a request rate and each signed request header to one use
(`FleetGate`). Flower's SuperNode signs only a timestamp, so whoever sees a request's headers
(only the TLS terminator does) could attach them to other requests for Flower's whole window
(~305 s); and nothing bounds how often a registered site may poll, heartbeat or pull objects.
Both are checked after Flower's own authentication, so nobody can spend a site's rate by
naming its key. Caddy's core has no rate limiter and cannot tell one site's request from
another's, so this lives here, beside Flower's node check. cmvim-server starts this module in
place of `flower-superlink`; everything else is Flower's own.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time

REFUSED = ("cmvim: the Fleet API accepts replies only (a message with reply_to); a site cannot send "
           "instructions")


NOT_YOURS = "cmvim: a site may push only its own replies (the message's sender is another node)"


def only_replies(push):
    """Flower's Fleet push handler, refusing any pushed message that is not a reply (403, with
    the reason in the answer's `extra`: Flower's own detail for the code is generic)."""
    from cmvim.flower_internals import ApiErrorCode, FlowerError

    def push_messages(request, state):
        if any(not m.metadata.reply_to_message_id for m in request.messages_list):
            raise FlowerError(ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED, REFUSED, public_details=REFUSED)
        # the request's node is the one its signature authenticated (Flower's node-auth middleware);
        # the reply's sender is what Flower matches against the instruction's destination
        if any(m.metadata.src_node_id != request.node.node_id for m in request.messages_list):
            raise FlowerError(ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED, NOT_YOURS, public_details=NOT_YOURS)
        return push(request, state)

    return push_messages


RATE_ENV, BURST_ENV = "CMVIM_FLEET_RATE", "CMVIM_FLEET_BURST"
DEFAULT_RATE, DEFAULT_BURST = 100.0, 2000
REPLAYED, BUSY = "replayed", "busy"
log = logging.getLogger("cmvim.superlink")


class FleetGate:
    """Per site (its authenticated public key): a token bucket of `burst` requests refilled at
    `rate` a second, and a memory of the signed headers seen within Flower's timestamp window,
    each admitted once. A header is its timestamp and the r of its ECDSA signature (r, s): r is
    fixed by the signer's secret nonce, while (r, n - s) verifies as well, so s cannot name it."""

    def __init__(self, rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST, window: float | None = None,
                 clock=time.monotonic):
        if window is None:
            from cmvim.flower_internals import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE
            window = TIMESTAMP_TOLERANCE + 2 * SYSTEM_TIME_TOLERANCE
        if rate <= 0 or burst < 1:
            raise ValueError(f"a Fleet rate limit needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate, self.burst, self.window, self.clock = rate, burst, window, clock
        self.lock = threading.Lock()
        self.buckets: dict[bytes, tuple[float, float]] = {}        # key -> (tokens, when)
        self.seen: set[tuple] = set()
        self.order: collections.deque = collections.deque()         # (expiry, header), oldest first
        self.refused: collections.Counter = collections.Counter()

    def admit(self, key: bytes, timestamp: str, signature: bytes) -> str | None:
        """None to let the request through, else REPLAYED or BUSY."""
        header = (key, timestamp, _signature_r(signature))
        with self.lock:
            now = self.clock()
            while self.order and self.order[0][0] < now:
                self.seen.discard(self.order.popleft()[1])
            if header in self.seen:
                self.refused[key, REPLAYED] += 1
                return REPLAYED
            tokens, when = self.buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            if tokens < 1.0:
                self.buckets[key] = (tokens, now)
                self.refused[key, BUSY] += 1
                return BUSY
            self.buckets[key] = (tokens - 1.0, now)
            self.seen.add(header)
            self.order.append((now + self.window, header))
            return None


def _signature_r(signature: bytes) -> int | bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    try:
        return decode_dss_signature(signature)[0]
    except ValueError:              # not DER: Flower's own check has refused it already
        return signature


def gated(authenticate, gate: FleetGate):
    """Flower's Fleet HTTP authentication, then the gate: a replayed header is refused like any
    bad signature (401); a site over its rate gets 503 with Retry-After, which Flower's SuperNode
    retries with backoff (a 429 would end it)."""
    from base64 import b64decode

    from fastapi import HTTPException

    from cmvim.flower_internals import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER, TIMESTAMP_HEADER

    def authenticate_node(request) -> None:
        authenticate(request)                       # signature, timestamp window, node id (Flower)
        key = b64decode(request.headers[FLEET_HTTP_PUBLIC_KEY_HEADER])
        verdict = gate.admit(key, request.headers[TIMESTAMP_HEADER],
                             b64decode(request.headers[FLEET_HTTP_SIGNATURE_HEADER]))
        if verdict is None:
            return
        node = _node_id(request)
        if verdict == REPLAYED:
            log.warning("cmvim: refused a replayed SuperNode header (node %s, %s)", node, request.url.path)
            raise HTTPException(status_code=401, detail="Invalid SuperNode authentication")
        if verdict == BUSY:
            if gate.refused[key, BUSY] in (1, 10, 100) or gate.refused[key, BUSY] % 1000 == 0:
                log.warning("cmvim: node %s is over %g requests/s (burst %d): %d requests refused (503)",
                            node, gate.rate, gate.burst, gate.refused[key, BUSY])
            raise HTTPException(status_code=503, detail="cmvim: too many requests from this site; retry later",
                                headers={"Retry-After": "1"})

    return authenticate_node


def _node_id(request) -> str:
    """The node a request named (Flower has just checked it against the key); '?' for
    registration requests, which name none."""
    named = getattr(request.state, "protobuf_request", None)
    node = getattr(named, "node", None)
    return str(getattr(node, "node_id", None) or getattr(named, "node_id", None) or "?")


def gate_from_env(environ=os.environ) -> FleetGate:
    return FleetGate(rate=float(environ.get(RATE_ENV, DEFAULT_RATE)), burst=int(environ.get(BURST_ENV, DEFAULT_BURST)))


def install(gate: FleetGate | None = None) -> None:
    """Put the checks in front of Flower's (its gRPC and HTTP servicers look the push handler up
    on its module at each request; its HTTP middleware looks up authenticate_node the same way),
    once per process."""
    from cmvim.flower_internals import guard
    guard("fleet push", only_replies)
    guard("fleet authentication", lambda authenticate: gated(authenticate, gate or gate_from_env()))


def main() -> None:
    handler = logging.StreamHandler()             # the SuperLink's log (Flower's own logger does not propagate)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    install()
    from cmvim.flower_internals import flower_superlink
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
