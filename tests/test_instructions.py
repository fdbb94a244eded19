"""Instructions only the coordinator can give (issue #30, finding 1): a registered site could push
a message addressed to another site's node and have it run there. Every message the coordinator
sends is now signed (cmvim.instructions) and a deployed site runs nothing else. Here: each way a
message can be wrong, and site C's injected evaluations at site A, refused with nothing spent."""
from __future__ import annotations

import json
import time

import torch
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from cmvim.client import app as client_app
from cmvim.instructions import (SIGNATURE, InstructionRefused, NonceLog, load_private_key, load_public_key, sign,
                                signing_grid, verify, write_keys)
from cmvim.protocol import ARRAYS, CONFIG, PHASE, ROUND, RUN_CONFIG, RUN_KEY, SITE, SPLIT
from cmvim.run_config import run_config
from cmvim.simulations.cohort import CohortConfig, cached_cohort
from cmvim.weights import initial_state

NODE_A, NODE_C = 1111, 3333


def message(dst: int = NODE_A, kind: str = MessageType.EVALUATE, weights=None, run_key: str = "run") -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({"w": torch.arange(4.0)} if weights is None else weights),
                          CONFIG: ConfigRecord({RUN_KEY: run_key, PHASE: "finetune", ROUND: 0})})
    metadata = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=1, dst_node_id=dst,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)
    return Message(content=content, metadata=metadata)


@pytest.fixture()
def keys(tmp_path):
    private, public = write_keys(tmp_path)
    return load_private_key(private), load_public_key(public)


def test_a_signed_instruction_runs_once_at_its_own_node_only(keys, tmp_path):
    key, public = keys
    nonces = NonceLog(tmp_path / "instructions.json")
    signed = sign(message(), key)
    verify(signed, NODE_A, public, nonces)
    with pytest.raises(InstructionRefused, match="already run here"):
        verify(signed, NODE_A, public, nonces)                   # replayed (by anyone who saw it)
    with pytest.raises(InstructionRefused, match="signed for another site"):
        verify(sign(message(), key), NODE_C, public, None)       # A's instruction pushed to C


def test_every_other_instruction_is_refused_naming_why(keys):
    key, public = keys
    with pytest.raises(InstructionRefused, match="not signed by the coordinator"):
        verify(message(), NODE_A, public, None)
    with pytest.raises(InstructionRefused, match="does not verify"):
        verify(sign(message(), Ed25519PrivateKey.generate()), NODE_A, public, None)   # site C's own key
    altered = sign(message(), key)
    altered.content[CONFIG][RUN_KEY] = "another-run"                # the run key changed on the way
    with pytest.raises(InstructionRefused, match="does not verify"):
        verify(altered, NODE_A, public, None)
    swapped = sign(message(), key)
    swapped.content[ARRAYS] = ArrayRecord({"w": torch.zeros(4)})       # other weights
    with pytest.raises(InstructionRefused, match="does not verify"):
        verify(swapped, NODE_A, public, None)
    redirected = sign(message(dst=NODE_C), key)
    redirected.metadata.__dict__["_dst_node_id"] = NODE_A             # C's instruction re-addressed to A
    with pytest.raises(InstructionRefused, match="does not verify"):
        verify(redirected, NODE_A, public, None)
    retyped = sign(message(kind=MessageType.EVALUATE), key)
    retyped.metadata.__dict__["_message_type"] = MessageType.TRAIN
    with pytest.raises(InstructionRefused, match="does not verify"):
        verify(retyped, NODE_A, public, None)
    old = sign(message(), key, ttl=60, now=time.time() - 3600)
    with pytest.raises(InstructionRefused, match="expired"):
        verify(old, NODE_A, public, None)
    malformed = message()
    malformed.content[SIGNATURE] = ConfigRecord({"signature": "x"})
    with pytest.raises(InstructionRefused, match="malformed"):
        verify(malformed, NODE_A, public, None)


def test_the_coordinators_grid_signs_everything_it_pushes(keys):
    key, public = keys

    class Grid:                                   # stands in for Flower's: send_and_receive pushes through push_messages
        pushed: list = []

        def push_messages(self, messages):
            self.pushed.extend(messages)
            return [str(i) for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            return []

        def send_and_receive(self, messages, timeout=None):
            self.push_messages(messages)
            return self.pull_messages(None)

    grid = signing_grid(Grid(), key)
    shared = message()                      # a strategy's way: one content for every site's message
    to_c = Message(content=shared.content, metadata=Metadata(
        run_id=1, message_id="m2", src_node_id=1, dst_node_id=NODE_C, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=600.0, message_type=MessageType.EVALUATE))
    grid.send_and_receive([shared, to_c])
    grid.push_messages([message()])
    assert len(Grid.pushed) == 3
    verify(Grid.pushed[0], NODE_A, public, None)
    verify(Grid.pushed[1], NODE_C, public, None)
    verify(Grid.pushed[2], NODE_A, public, None)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = cached_cohort(CohortConfig(sites=1, subjects=24, shape=32, seed=9, effect_scale=3.0, pet_missing=0.0),
                         root=tmp_path_factory.mktemp("instructions-cohort"))
    return root / "A"


def test_site_cs_injected_evaluations_are_refused_at_a_with_nothing_spent(site, keys, tmp_path):
    """The finding: site C pushed evaluations under the real run's key, addressed to A's node,
    until A's max_evaluations was spent. Now A answers each with the failed check and counts
    nothing; the coordinator's own signed evaluation then runs."""
    key, _ = keys
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_cell_count: 0\nmax_evaluations: 2\n")
    state = tmp_path / "state"
    context = Context(run_id=1, node_id=NODE_A, node_config={
        "site": "A", "data-dir": str(site), "policy": str(policy), "state-dir": str(state),
        "coordinator-key": str(tmp_path / "coordinator.pub")}, state=RecordDict(), run_config={})
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32},
                      "split_fractions": [0.5, 0.25, 0.25]})
    weights = initial_state(cfg, "finetune")

    def evaluation() -> Message:
        request = message(weights=weights, run_key="the-real-run")
        request.content[CONFIG] = ConfigRecord({RUN_CONFIG: cfg.to_json(), PHASE: "finetune", ROUND: 0,
                                                "server-round": 1, RUN_KEY: "the-real-run", SPLIT: "val"})
        return request

    def run(msg: Message) -> Message:             # the ClientApp as Flower (and the site worker) calls it: mods first
        return client_app.app(message=msg, context=context)

    c_key = Ed25519PrivateKey.generate()
    answers = [run(evaluation()),                                      # unsigned
               run(sign(evaluation(), c_key))]                         # signed by C
    for_c = evaluation()
    for_c.metadata.__dict__["_dst_node_id"] = NODE_C
    answers.append(run(sign(for_c, key)))                             # the coordinator's, for C
    reasons = [a.content[SITE]["error"] for a in answers]
    assert ["not signed" in reasons[0], "does not verify" in reasons[1], "another site" in reasons[2]] == [True] * 3
    assert not (state / "releases.json").exists(), "nothing counted against A's max_evaluations"
    signed = sign(evaluation(), key)
    copied = evaluation()                          # what C would push again: the same content and signature
    copied.content[SIGNATURE] = ConfigRecord(dict(signed.content[SIGNATURE].items()))
    genuine = run(signed)
    assert "error" not in genuine.content[SITE], genuine.content[SITE]
    assert json.loads((state / "releases.json").read_text())["total"] == 1
    replay = run(copied)
    assert "already run here" in replay.content[SITE]["error"]
    assert json.loads((state / "releases.json").read_text())["total"] == 1
