"""Checkpoints that survive a failed write, a corrupt pointer, a truncated file and a planted
pickle: resume falls back to the newest checkpoint it can read, and never runs code from one."""
import errno
import json
import logging
import os

import numpy as np
import pytest
import torch

from cmvim.run_config import run_config
from cmvim.server.checkpoints import Checkpoint, CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _save(folder, phase, round_, value, keep_last=None):
    return Checkpoint(phase, round_, {"w": torch.full((3,), float(value))}, {"m_t": {"w": np.ones(3)}},
                      [{"round": round_}], [], {}).save(folder, keep_last)


def test_a_full_disk_mid_write_leaves_the_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    _save(tmp_path, "pretrain", 1, 1.0)
    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(100)                                   # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, "pretrain", 2, 2.0)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "pretrain_round001.pt"]   # no debris
    loaded = Checkpoint.latest(tmp_path)
    assert (loaded.phase, loaded.round) == ("pretrain", 1) and loaded.arrays["w"][0] == 1.0
    np.testing.assert_array_equal(loaded.strategy["m_t"]["w"], np.ones(3))
    assert loaded.history == [{"round": 1}]


def test_resume_falls_back_past_a_corrupt_pointer_and_a_truncated_checkpoint(tmp_path, caplog):
    for r in (1, 2, 3):
        _save(tmp_path, "finetune", r, r)
    path = tmp_path / "finetune_round003.pt"
    path.write_bytes(path.read_bytes()[:200])                 # the newest is truncated (a crash outside our writes)
    caplog.set_level(logging.WARNING, "cmvim.server")
    loaded = Checkpoint.latest(tmp_path)
    assert loaded.round == 2
    assert "skipping finetune_round003.pt: unreadable" in caplog.text
    (tmp_path / "latest.json").write_text('{"file": "finetune_rou')  # a torn pointer
    assert Checkpoint.latest(tmp_path).round == 2
    assert "latest.json unreadable" in caplog.text
    (tmp_path / "latest.json").write_text(json.dumps({"file": "../../etc/passwd"}))   # names something else
    assert Checkpoint.latest(tmp_path).round == 2
    for p in tmp_path.glob("*.pt"):
        p.write_bytes(b"garbage")
    assert Checkpoint.latest(tmp_path) is None                # nothing readable: start over, said by the runner


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-by-checkpoint",))


def test_a_checkpoint_carrying_a_pickled_object_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save(tmp_path, "pretrain", 1, 1.0)
    torch.save({"format": 2, "phase": "pretrain", "round": 2, "arrays": {"w": torch.zeros(3)}, "strategy": {},
                "state": Planted()}, tmp_path / "pretrain_round002.pt")
    (tmp_path / "latest.json").write_text(json.dumps({"file": "pretrain_round002.pt"}))
    with pytest.raises(CheckpointError, match="pretrain_round002.pt: unreadable"):
        Checkpoint.load(tmp_path / "pretrain_round002.pt")
    assert Checkpoint.latest(tmp_path).round == 1
    assert not (tmp_path / "planted-by-checkpoint").exists()


def test_keep_last_keeps_the_newest_of_each_phase(tmp_path):
    for r in range(1, 6):
        _save(tmp_path, "pretrain", r, r, keep_last=2)
    for r in range(1, 4):
        _save(tmp_path, "finetune", r, r, keep_last=2)
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["finetune_round002.pt", "finetune_round003.pt", "pretrain_round004.pt", "pretrain_round005.pt"]
    assert run_config({}).checkpoints.keep_last == 2
    with pytest.raises(ValueError, match="keep_last"):
        run_config({"checkpoints": {"keep_last": 0}})


def test_a_sites_personalised_weights_survive_a_restart_of_its_node(easy_cohort, tmp_path, monkeypatch):
    """personalize: head keeps the head at the site. Flower's context (where it lived) dies with
    the SuperNode; the weights come back from the site's disk (0600) in the next round."""
    import shutil
    import time
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
    from cmvim.client import app as client_app
    from cmvim.protocol import ARRAYS, CONFIG, PHASE, ROUND, RUN_CONFIG, RUN_KEY
    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state

    site = tmp_path / "A"
    shutil.copytree(easy_cohort / "A", site)
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
                      "personalize": "head", "finetune": {"rounds": 2, "local_epochs": 1, "max_steps": 2}})
    seen = []
    real_train = SiteTask.train

    def spy(self, phase, round_, shared, local=None, proximal_mu=0.0):
        seen.append({k: v.clone() for k, v in (local or {}).items()})
        return real_train(self, phase, round_, shared, local, proximal_mu)
    monkeypatch.setattr(SiteTask, "train", spy)

    def round_(context, number):
        config = ConfigRecord({RUN_CONFIG: cfg.to_json(), PHASE: "finetune", ROUND: 0, "server-round": number,
                               RUN_KEY: "run-1"})
        metadata = Metadata(run_id=1, message_id=f"m{number}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                            group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
        shared = {k: v for k, v in initial_state(cfg, "finetune").items() if not k.startswith("head.")}
        msg = Message(content=RecordDict({ARRAYS: ArrayRecord(shared), CONFIG: config}), metadata=metadata)
        reply = client_app._handle(msg, context, training=True)
        assert "error" not in reply.content.get("site", {}), reply.content["site"]

    def node():
        return Context(run_id=1, node_id=7, node_config={"site": "A", "data-dir": str(site), "state-dir": str(tmp_path / "state")},
                       state=RecordDict(), run_config={})
    round_(node(), 1)
    stored = client_app.personal_path(tmp_path / "state" / "ledger.json", "run-1")
    assert stored.exists() and stored.stat().st_mode & 0o777 == 0o600
    saved = torch.load(stored, weights_only=True)
    assert set(saved) == {"head.weight", "head.bias"} and seen[0] == {}
    round_(node(), 2)                                   # a new context: the SuperNode restarted
    assert set(seen[1]) == {"head.weight", "head.bias"}
    assert all(torch.equal(seen[1][k], saved[k]) for k in saved)
    stored.write_bytes(b"damaged")                      # a damaged file: one warning, the round goes on
    round_(node(), 3)
    assert seen[2] == {}


def test_best_val_keeps_the_latest_of_the_best_rounds_and_survives_a_resume(tmp_path):
    from cmvim.server.checkpoints import BestModel
    best = BestModel(tmp_path)
    assert best.arrays() is None
    for round_, score in ((1, 0.7), (2, 0.9), (3, 0.8), (4, 0.9), (5, float("nan"))):
        best.offer(round_, score, {"w": torch.full((2,), float(round_))})
    assert (best.round, best.score) == (4, 0.9)                  # ties: the later round; NaN never wins
    resumed = BestModel(tmp_path)                                 # a resumed run reads it back
    assert (resumed.round, resumed.score) == (4, 0.9) and resumed.arrays()["w"][0] == 4.0
    assert not resumed.offer(6, 0.85, {"w": torch.zeros(2)})
    resumed.clear()
    assert BestModel(tmp_path).arrays() is None
    with pytest.raises(ValueError, match="best_val needs evaluation.every_round"):
        run_config({"finetune": {"select": "best_val"}, "evaluation": {"every_round": False}})


def test_in_process_rounds_select_the_best_validation_round(easy_cohort, monkeypatch):
    """The baselines and benchmarks select as the federated run does."""
    from cmvim.simulations import baselines
    cfg = run_config({"finetune": {"rounds": 3, "select": "best_val"}})
    scores = iter([0.6, 0.8, 0.7])
    monkeypatch.setattr(baselines, "validation_auc", lambda tasks, shared, local: next(scores))

    class Task:
        name = "A"

        def train(self, phase, round_, shared, local):
            from cmvim.site_task import RoundResult
            return RoundResult({"w": torch.full((1,), float(round_))}, {}, {"num-examples": 1})
    shared, _ = baselines.train_rounds(cfg, [Task()], "finetune", {"w": torch.zeros(1)})
    assert shared["w"][0] == 2.0


def test_in_process_rounds_aggregate_through_the_servers_own_path():
    """Several tasks are combined by the run's strategy behind the server's guard, not by a
    FedAvg of their own: a site whose update is far beyond the round's median is rejected as
    the server rejects it (norm_bound), the others averaged by their examples."""
    from cmvim.simulations import baselines
    from cmvim.site_task import RoundResult

    class Task:
        def __init__(self, name, value, examples):
            self.name, self.value, self.examples = name, value, examples

        def train(self, phase, round_, shared, local):
            return RoundResult({"w": shared["w"] + self.value}, {}, {"num-examples": self.examples})

    tasks = [Task("A", 1.0, 1), Task("B", 4.0, 3), Task("C", 1000.0, 2)]
    cfg = run_config({"finetune": {"rounds": 1}})
    shared, _ = baselines.train_rounds(cfg, tasks, "finetune", {"w": torch.zeros(2)})
    torch.testing.assert_close(shared["w"], torch.full((2,), (1.0 * 1 + 4.0 * 3) / 4))    # C rejected
    unbounded = run_config({"finetune": {"rounds": 1}, "strategy": {"norm_bound": None}})
    shared, _ = baselines.train_rounds(unbounded, tasks, "finetune", {"w": torch.zeros(2)})
    torch.testing.assert_close(shared["w"], torch.full((2,), (1.0 + 12.0 + 2000.0) / 6))
