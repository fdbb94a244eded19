"""Replies only the coordinator can read (issue #30, finding 2): another site that pulls a site's
reply object by its id (Flower's pull_object checks only that the run is running) gets a nonce,
an ephemeral key and ciphertext. Here the reply of a real evaluation at site A travels through
the coordinator's signing grid; what the SuperLink would store is searched for what it carries."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict

from cmvim.client import app as client_app
from cmvim.instructions import load_private_key, signing_grid, write_keys
from cmvim.protocol import ARRAYS, CONFIG, METRICS, PHASE, ROUND, RUN_CONFIG, RUN_KEY, SITE, SITE_NAME, SPLIT
from cmvim.run_config import run_config
from cmvim.sealed import SEALED, SealError, from_bytes, label_of, raw_public, seal, to_bytes, unseal
from cmvim.simulations.cohort import CohortConfig, cached_cohort
from cmvim.weights import initial_state


def content() -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"w": torch.randn(3, 4), "steps": torch.arange(5)}),
                       "metrics": MetricRecord({"num-examples": 12, "auc": 0.875, "hist_pos": [1.0, 0.0, 3.0]}),
                       "site": ConfigRecord({"name": "A", "blob": b"\x00\x01", "list": [1, 2]})})


def test_a_reply_round_trips_exactly_and_opens_only_with_its_key():
    original = content()
    assert from_bytes(to_bytes(original)).object_id == original.object_id
    mine = X25519PrivateKey.generate()
    sealed = seal(original, raw_public(mine.public_key()), "nonce-1")
    assert list(sealed.keys()) == [SEALED] and label_of(sealed) == "nonce-1"
    assert unseal(sealed, mine).object_id == original.object_id
    with pytest.raises(SealError, match="did not open"):
        unseal(sealed, X25519PrivateKey.generate())               # another party's key
    blob = sealed[SEALED]["blob"].numpy().copy()
    blob[-5] ^= 1                                                 # one bit changed on the way
    with pytest.raises(SealError, match="did not open"):
        unseal(RecordDict({SEALED: ArrayRecord({"blob": Array(blob)})}), mine)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = cached_cohort(CohortConfig(sites=1, subjects=24, shape=32, seed=9, effect_scale=3.0, pet_missing=0.0),
                         root=tmp_path_factory.mktemp("sealed-cohort"))
    return root / "A"


def test_another_site_pulling_a_reply_object_reads_nothing(site, tmp_path):
    private, public = write_keys(tmp_path)
    context = Context(run_id=1, node_id=1111, node_config={
        "site": "A", "data-dir": str(site), "state-dir": str(tmp_path / "state"), "coordinator-key": str(public),
        "policy": ""}, state=RecordDict(), run_config={})
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32}})
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_cell_count: 0\n")
    context.node_config["policy"] = str(policy)
    stored: list[Message] = []                 # what the SuperLink holds: the objects pull_object serves

    class Grid:                                # delivers each message to site A's ClientApp, as Flower would
        def push_messages(self, messages):
            for msg in messages:
                stored.append(client_app.app(message=msg, context=context))
            return [str(i) for i in range(len(messages))]

        def pull_messages(self, ids):
            return [Message(content=RecordDict(dict(r.content.items())), metadata=r.metadata) for r in stored]

        def send_and_receive(self, messages, timeout=None):
            self.push_messages(messages)
            return self.pull_messages(None)

    grid = signing_grid(Grid(), load_private_key(private))
    config = ConfigRecord({RUN_CONFIG: cfg.to_json(), PHASE: "finetune", ROUND: 0, "server-round": 1,
                           RUN_KEY: "r", SPLIT: "val"})
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=1111, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.EVALUATE)
    request = Message(content=RecordDict({ARRAYS: ArrayRecord(initial_state(cfg, "finetune")), CONFIG: config}),
                      metadata=metadata)
    [reply] = grid.send_and_receive([request])
    opened = dict(reply.content[METRICS].items())
    assert "error" not in reply.content[SITE] and reply.content[SITE][SITE_NAME] == "A"
    assert opened["num-examples"] > 0 and 0 <= opened["auc"] <= 1          # the coordinator reads the evaluation
    # what another site would pull: one record, ciphertext, no metric name, no site name, no number
    [held] = stored
    assert list(held.content.keys()) == [SEALED]
    raw = held.content[SEALED]["blob"].numpy().tobytes()
    for plain in (b"auc", b"num-examples", b"hist_pos", SITE_NAME.encode(), np.float64(opened["auc"]).tobytes()):
        assert plain not in raw
    with pytest.raises(SealError):
        unseal(held.content, X25519PrivateKey.generate())
