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

    def do_POST(self):  # noqa: N802 - http.server's name
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
    from flwr.superlink.servicer.fleet import fleet_handlers
    original = fleet_handlers.push_messages
    try:
        install()                                   # what cmvim.server.superlink's main does (twice: still once)
        wrapped = fleet_handlers.push_messages
        install()
        assert fleet_handlers.push_messages is wrapped and wrapped is not original
        with pytest.raises(FlowerError, match="accepts replies only"):
            fleet_handlers.push_messages(request=_pushed(reply_to=""), state=None)
    finally:
        fleet_handlers.push_messages = original
