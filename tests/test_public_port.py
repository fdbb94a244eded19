"""Limits at the public port (issue #30, finding 3): Caddy answers a request larger than
`cmvim-server --max-request-mb` with 413 and passes no more than the limit of it on (the
SuperLink never holds a whole oversize message), and passes the Fleet API's normal requests. A real Caddy in front of a stand-in upstream that
records what reaches it; and the SuperLink's Fleet API taking replies only."""
from __future__ import annotations

import argparse
import http.server
import threading
import urllib.error
import urllib.request

import pytest

from cmvim.cli_util import free_port
from cmvim.server.deploy import Coordinator, DeployError


class Upstream(http.server.BaseHTTPRequestHandler):
    seen: list[int] = []

    def do_POST(self):  # http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Upstream.seen.append(len(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):      # the proxy cut the oversize request
            pass


def post(url: str, size: int) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"x" * size, method="POST"), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_public_port_refuses_a_request_over_the_limit(tmp_path):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    args = argparse.Namespace(state_dir=tmp_path / "state", out=tmp_path, address=f"127.0.0.1:{port}",
                              superlink=f"127.0.0.1:{upstream.server_address[1]}", control_port=None, insecure=True,
                              max_request_mb=1.0)
    coordinator = Coordinator(args)
    try:
        coordinator.start_proxy()
    except DeployError as err:
        pytest.skip(f"Caddy is not installed here ({err})")
    try:
        url = f"http://127.0.0.1:{port}/v1/fleet/push-object"
        assert post(url, 200_000) == 200
        assert post(url, 3 * 1024 * 1024) == 413                   # 3 MB against a 1 MB limit
        assert post(f"http://127.0.0.1:{port}/v1/control/list-runs", 10) == 403     # not the Fleet API
        # Caddy streams: the oversize request is cut at the limit (the SuperLink's side never holds more, and
        # never a whole message), and its sender gets 413
        assert Upstream.seen[0] == 200_000 and all(n <= 1024 * 1024 for n in Upstream.seen[1:]), Upstream.seen
    finally:
        coordinator.proxy.stop()
        upstream.shutdown()


def _pushed(reply_to: str, sender: int = 3333, authenticated: int = 3333):
    import time

    from flwr.app import ConfigRecord, Message, Metadata, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=E0611
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    metadata = Metadata(run_id=1, message_id="", src_node_id=sender, dst_node_id=1111 if not reply_to else 0,
                        reply_to_message_id=reply_to, group_id="", created_at=time.time(),
                        ttl=10 * 365 * 24 * 3600.0, message_type="train")
    msg = Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), metadata=metadata)
    return PushMessagesRequest(node=Node(node_id=authenticated), messages_list=[message_to_proto(msg)])


def test_the_superlink_takes_only_replies_from_sites():
    """Site C's attack of issue #30 at the coordinator: a pushed message with no reply_to (an
    instruction for site A, or a ten-year message to itself) is refused before Flower stores it;
    a reply goes on to Flower's own checks (the instruction it answers, its node, its TTL)."""
    from flwr.supercore.error import FlowerError

    from cmvim.server.superlink import install, only_replies
    stored = []
    push = only_replies(lambda request, state: stored.append(request) or "stored")
    with pytest.raises(FlowerError, match="accepts replies only"):
        push(_pushed(reply_to=""), state=None)
    assert stored == []
    assert push(_pushed(reply_to="a" * 64), state=None) == "stored" and len(stored) == 1
    with pytest.raises(FlowerError, match="only its own replies"):      # C answering in A's name
        push(_pushed(reply_to="a" * 64, sender=1111, authenticated=3333), state=None)
    assert len(stored) == 1
    from flwr.superlink.routers.fleet import node_auth
    from flwr.superlink.servicer.fleet import fleet_handlers
    original, authenticate = fleet_handlers.push_messages, node_auth.authenticate_node
    try:
        install()                                   # what cmvim.server.superlink's main does (twice: still once)
        wrapped = fleet_handlers.push_messages
        install()
        assert fleet_handlers.push_messages is wrapped and wrapped is not original
        with pytest.raises(FlowerError, match="accepts replies only"):
            fleet_handlers.push_messages(request=_pushed(reply_to=""), state=None)
    finally:
        fleet_handlers.push_messages, node_auth.authenticate_node = original, authenticate


def test_the_fleet_gate_admits_each_signed_header_once_and_holds_a_site_to_its_rate():
    """A site's signed header (timestamp + ECDSA signature) works once, however its signature is
    re-encoded ((r, n - s) verifies too); each site has its own bucket; the memory of headers
    lasts Flower's timestamp window and no longer."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    from cmvim.server.superlink import BUSY, REPLAYED, FleetGate
    now = [0.0]
    gate = FleetGate(rate=2.0, burst=3, window=300.0, clock=lambda: now[0])
    key = ec.generate_private_key(ec.SECP384R1())
    order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973

    def signed(stamp: str) -> bytes:
        return key.sign(stamp.encode(), ec.ECDSA(hashes.SHA256()))

    first = signed("t0")
    assert gate.admit(b"A", "t0", first) is None
    assert gate.admit(b"A", "t0", first) == REPLAYED
    r, s = decode_dss_signature(first)
    malleated = encode_dss_signature(r, order - s)
    key.public_key().verify(malleated, b"t0", ec.ECDSA(hashes.SHA256()))      # a valid signature, re-encoded
    assert gate.admit(b"A", "t0", malleated) == REPLAYED
    assert gate.admit(b"A", "t0", signed("t0")) is None          # the same instant, signed again: a new header
    assert gate.admit(b"A", "t1", signed("t1")) is None          # 3 of the burst of 3
    assert gate.admit(b"A", "t2", signed("t2")) == BUSY
    assert gate.admit(b"C", "t2", signed("t2")) is None          # another site's bucket is its own
    now[0] = 0.5                                                 # +1 request at 2/s
    assert gate.admit(b"A", "t3", signed("t3")) is None
    assert gate.admit(b"A", "t4", signed("t4")) == BUSY
    now[0] = 301.0                                               # past the window: Flower refuses "t0" itself
    assert gate.admit(b"A", "t0", first) is None and len(gate.seen) == 1
    assert gate.refused[b"A", REPLAYED] == 2 and gate.refused[b"A", BUSY] == 2
    with pytest.raises(ValueError, match="rate > 0"):
        FleetGate(rate=0, burst=1)


def test_the_gate_sits_behind_flowers_own_authentication():
    """The gate runs after Flower's check passes (a stranger naming a site's key cannot spend its
    rate), answers a replay 401 and a busy site 503 with Retry-After (Flower's SuperNode retries a
    503 and ends on a 429), and is installed once."""
    from base64 import b64encode
    from types import SimpleNamespace

    from fastapi import HTTPException
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.superlink.routers.fleet import node_auth
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER

    from cmvim.server.superlink import FleetGate, gated, install
    calls = []

    def flower(request):
        calls.append(request)
        if request.headers["bad"]:
            raise HTTPException(status_code=401, detail="Invalid SuperNode authentication")

    def request(stamp: str, bad: bool = False):
        headers = {FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(b"A").decode(), TIMESTAMP_HEADER: stamp,
                   FLEET_HTTP_SIGNATURE_HEADER: b64encode(b"sig" + stamp.encode()).decode(), "bad": bad}
        named = SimpleNamespace(node=SimpleNamespace(node_id=42))
        return SimpleNamespace(headers=headers, url=SimpleNamespace(path="/v1/fleet/pull-messages"),
                               state=SimpleNamespace(protobuf_request=named))

    gate = FleetGate(rate=1.0, burst=2, window=300.0, clock=lambda: 0.0)
    check = gated(flower, gate)
    for _ in range(5):                                     # strangers: refused by Flower, nothing spent
        with pytest.raises(HTTPException) as err:
            check(request("t9", bad=True))
        assert err.value.status_code == 401
    assert not gate.buckets and not gate.seen
    check(request("t0"))
    with pytest.raises(HTTPException) as err:
        check(request("t0"))
    assert err.value.status_code == 401
    check(request("t1"))
    with pytest.raises(HTTPException) as err:
        check(request("t2"))
    assert err.value.status_code == 503 and err.value.headers == {"Retry-After": "1"}
    assert len(calls) == 9

    original = node_auth.authenticate_node
    try:
        install(FleetGate())
        wrapped = node_auth.authenticate_node
        install(FleetGate())
        assert node_auth.authenticate_node is wrapped and wrapped is not original
    finally:
        node_auth.authenticate_node = original
