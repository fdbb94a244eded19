"""evaluation.carry_validation: round r's validation travels in round r+1's training message.

The federated run is driven in this process through a grid that hands every message to the real
ClientApp handlers (cmvim.client.app) of three sites on real site folders, so the same run can
be made with and without carrying and compared number for number, and the exchanges counted.
"""
import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from cmvim.client import app as client_app
from cmvim.protocol import NUM_EXAMPLES, SITE, SITE_NAME, VAL_ERROR, VAL_METRICS, VALIDATE
from cmvim.run_config import run_config
from cmvim.server.runner import FederatedRun
from cmvim.server.strategy import make_strategy, training_reply
from cmvim.run_config import StrategyConfig

pytest.importorskip("nilearn")


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's process-wide task identity, set here as a ServerApp/ClientApp process has it."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1          # the ServerApp's
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LocalGrid:
    """A Flower grid whose nodes are ClientApp handlers in this process (node i: the cohort's
    i-th site folder, as in simulation); it records every exchange it carries."""

    def __init__(self, sites: int = 3, refuse_validation: str | None = None):
        self.nodes = list(range(1, sites + 1))
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1}, state=RecordDict(),
                                    run_config={}) for n in self.nodes}
        self.exchanges: list[tuple[str, int, bool]] = []      # (message type, messages, validate first)
        self.refuse_validation = refuse_validation           # a site whose validation fails
        self._ids = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        kinds = {m.metadata.message_type for m in messages}
        validate = any(bool(m.content[client_app.CONFIG].get(VALIDATE, 0)) for m in messages
                       if client_app.CONFIG in m.content)
        self.exchanges.append((kinds.pop(), len(messages), validate))
        replies = []
        for msg in messages:
            self._ids += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._ids}"
            training = msg.metadata.message_type == MessageType.TRAIN
            context = self.contexts[msg.metadata.dst_node_id]
            TaskIdentity.node_id = msg.metadata.dst_node_id          # the replying node, as in a ClientApp process
            reply = client_app._handle(msg, context, training)
            TaskIdentity.node_id = 0
            if self.refuse_validation and VAL_METRICS in reply.content and \
                    reply.content[SITE][SITE_NAME] == self.refuse_validation:
                del reply.content[VAL_METRICS]
                reply.content[SITE][VAL_ERROR] = "refused: site policy (test)"
            replies.append(reply)
        return replies


def _cfg(cohort, carry: bool, **extra) -> object:
    return run_config({
        "seed": 0, "cohort": {"path": str(cohort)}, "model": {"preset": "tiny"},
        "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25}, "split_fractions": [0.5, 0.2, 0.3],
        "pretrain": {"rounds": 0}, "finetune": {"rounds": 3, "local_epochs": 1, "batch_size": 4, "lr": 0.002,
                                                "select": "best_val"},
        "finetune_init": "fresh", "modality_dropout": 0.0, "strategy": {"name": "fedavg", "min_nodes": 3},
        "evaluation": {"bootstrap": 50, "every_round": True, "carry_validation": carry}, **extra})


def test_carried_validation_gives_the_same_run_in_fewer_exchanges(easy_cohort, tmp_path):
    runs = {}
    for carry in (False, True):
        grid = LocalGrid()
        results = FederatedRun(_cfg(easy_cohort, carry), tmp_path / str(carry), grid).run()
        runs[carry] = (grid, results, json.loads((tmp_path / str(carry) / "metrics.json").read_text()))
    (plain, _, before), (carried, _, after) = runs[False], runs[True]
    # the same numbers: every round's training and validation, the selected round, the test scores.
    # Equal to float rounding, not bit for bit: the same training after a different sequence of
    # work in the process can differ in the 8th digit (seen after other tests ran: MKL's kernels
    # depend on how the tensors lie in memory), far below anything a recipe change moves
    for old, new in zip(before["rounds"], after["rounds"], strict=True):
        assert (old["phase"], old["round"]) == (new["phase"], new["round"])
        for site in old["train"]:
            assert new["train"][site]["loss"] == pytest.approx(old["train"][site]["loss"], rel=1e-5)
        assert set(new["evaluate"]) == set(old["evaluate"]) == {"A", "B", "C"}
        for site, metrics in old["evaluate"].items():
            assert new["evaluate"][site]["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
        assert new.get("selected") == old.get("selected")
    for site, metrics in before["sites"].items():
        assert after["sites"][site]["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
        assert after["sites"][site]["n_test"] == metrics["n_test"]
    assert after["pooled"]["auc"] == pytest.approx(before["pooled"]["auc"], abs=1e-6)
    # the exchanges: 3 training + 3 validation + calibration + test before; 3 training (the 2nd and
    # 3rd carrying the validation of the round before) + the last round's validation + 2 after
    assert [(k, v) for k, _, v in plain.exchanges] == [
        ("train", False), ("evaluate", False)] * 3 + [("evaluate", False)] * 2
    assert [(k, v) for k, _, v in carried.exchanges] == [
        ("train", False), ("train", True), ("train", True), ("evaluate", False), ("evaluate", False),
        ("evaluate", False)]
    # the round timing: a carried round's work is its training message's (validation included)
    assert all(r["site_work_seconds"] > 0 for r in after["rounds"])


def test_a_site_whose_carried_validation_fails_is_named_and_still_trains(easy_cohort, tmp_path):
    grid = LocalGrid(refuse_validation="B")
    FederatedRun(_cfg(easy_cohort, True), tmp_path, grid).run()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert all(set(r["train"]) == {"A", "B", "C"} for r in rounds)              # B trained every round
    assert [sorted(r["evaluate"]) for r in rounds] == [["A", "C"], ["A", "C"], ["A", "B", "C"]]   # last: own exchange
    named = [r for r in metrics["failures"] if r["site"] == "B"]
    assert [(r["round"], r["stage"]) for r in named] == [(1, "evaluate"), (2, "evaluate")]
    assert all("refused: site policy (test)" in r["reason"] for r in named)


def _reply(site: str, node: int, val: dict | None = None, error: str | None = None) -> Message:
    msg = training_reply(site, node, {"w": torch.ones(2)}, {NUM_EXAMPLES: 10, "loss": 0.5})
    if val is not None:
        msg.content[VAL_METRICS] = MetricRecord(val)
    if error is not None:
        msg.content[SITE][VAL_ERROR] = error
    return msg


def test_the_guard_takes_the_carried_validation_out_and_screens_it():
    """Flower's FedAvg aggregates a reply with one MetricRecord only: the carried one is taken out
    first; a validation without examples (suppressed) or with odd keys is left out by name."""
    strategy = make_strategy(StrategyConfig(min_nodes=1), carry_validation=True, last_round=3)
    strategy.start_round(ArrayRecord({"w": torch.zeros(2)}))
    ok = {NUM_EXAMPLES: 8, "auc": 0.75}
    replies = [_reply("A", 1, ok), _reply("B", 2, {NUM_EXAMPLES: 0}), _reply("C", 3, error="refused: no"),
               _reply("D", 4, {**ok, "odd": 1.0}), _reply("E", 5, dict(ok))]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None and set(strategy.round_log.train) == {"A", "B", "C", "D", "E"}
    assert all(VAL_METRICS not in r.content for r in replies)
    assert strategy.round_log.carried == {"A": ok, "E": ok}
    reasons = {r["site"]: r for r in strategy.round_log.rejected}
    assert reasons["C"]["reason"] == "refused: no" and reasons["C"]["round"] == 1
    assert "metrics differ" in reasons["D"]["reason"] and reasons["D"]["stage"] == "evaluate"
    assert "B" not in reasons               # a suppressed validation says nothing, as a validation message
    # round 1 of a phase carries nothing (its model is the phase's start); the last round validates alone
    strategy.aggregate_train(1, [_reply("A", 1)])
    assert strategy.round_log.carried is None
    assert strategy.configure_evaluate(2, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), None) == []
