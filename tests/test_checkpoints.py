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
