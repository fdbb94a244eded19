"""Secure aggregation with Flower's SecAgg+ (legacy workflow, driven round by round from the
Message-API ServerApp): the aggregate equals plain FedAvg up to SecAgg+'s quantization, a site
that drops out is named with its reason and the round goes on, and the sites refuse to mask
what SecAgg+ would clip or wrap silently. Real Flower simulations, real site folders."""
import json
import shutil

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

import test_federated as tf
from cmvim.client.secagg import SecAggDropout, check_maskable, secagg_mod
from cmvim.run_config import run_config
from cmvim.protocol import ARRAYS, CONFIG, SECAGG_MASKED
from cmvim.weights import initial_state


def _secagg_config(cohort_path, **overrides):
    return tf.tiny_config(cohort_path, pretrain={"rounds": 1}, finetune={"rounds": 1, "local_epochs": 1},
                          secure_aggregation={"enabled": True}, **overrides)


def test_secure_aggregate_is_plain_fedavg_up_to_quantization(easy_cohort, tmp_path):
    secure_cfg = _secagg_config(easy_cohort)
    plain_cfg = json.loads(json.dumps(secure_cfg))
    plain_cfg["secure_aggregation"]["enabled"] = False
    secure, plain = tmp_path / "secure", tmp_path / "plain"
    proc = tf.run_sim(tmp_path, secure_cfg, secure)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "strategy fedavg with secure aggregation (SecAgg+)" in proc.stdout
    assert "stage 2 completed" not in proc.stdout + proc.stderr          # Flower's per-stage DEBUG lines muted
    proc = tf.run_sim(tmp_path, plain_cfg, plain)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    metrics = json.loads((secure / "metrics.json").read_text())
    first = metrics["rounds"][0]
    assert first["phase"] == "pretrain" and set(first["train"]) == {"A", "B", "C"}   # per-site metrics still shown
    assert set(metrics["sites"]) == {"A", "B", "C"}
    assert "secure aggregation (Flower SecAgg+)" in (secure / "summary.md").read_text()

    # the same sites, seeds and data: after pretraining round 1 the two global models differ by
    # SecAgg+'s quantization only. Each site's weights x n_i / max_weight are quantized with step
    # 2 clip / Q, and the sum is divided by sum(n_i) / max_weight.
    sa = run_config(secure_cfg).secure_aggregation
    total_ratio = sum(m["num-examples"] for m in first["train"].values()) / sa.max_weight
    bound = 4 * len(first["train"]) * (2 * sa.clipping_range / sa.quantization_range) / total_ratio
    ours = torch.load(secure / "checkpoints" / "pretrain_round001.pt", weights_only=False)["arrays"]
    reference = torch.load(plain / "checkpoints" / "pretrain_round001.pt", weights_only=False)["arrays"]
    assert ours.keys() == reference.keys()
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in ours)
    assert worst < bound, (worst, bound)


def test_a_site_that_drops_out_is_named_and_the_round_aggregates_the_rest(easy_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(easy_cohort, cohort)
    (cohort / "C" / "manifest.csv").write_text("subject_id,mri\nC-1,missing.nii.gz\n")   # nothing usable at C
    cfg = _secagg_config(cohort, cohort={"path": str(cohort), "site_names": ["A", "B", "C"]})
    out = tmp_path / "dropout"
    proc = tf.run_sim(tmp_path, cfg, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "site C left out (train): data problem at the site: no usable subjects" in proc.stdout
    federated = proc.stdout[proc.stdout.index("== pretrain"):] + proc.stderr   # (cmvim-sim lists the folders first)
    assert "C-1" not in federated                                       # the subject id stayed at the site
    metrics = json.loads((out / "metrics.json").read_text())
    assert [set(r["train"]) for r in metrics["rounds"]] == [{"A", "B"}, {"A", "B"}]
    assert {f["site"] for f in metrics["failures"]} == {"C"}
    assert [(f["phase"], f["round"]) for f in metrics["failures"] if f["stage"] == "train"] == [
        ("pretrain", 1), ("finetune", 1)]                    # each phase's dropout is kept
    assert set(metrics["sites"]) == {"A", "B"}
    # A and B's round was aggregated: the global model moved from the initial one
    after = torch.load(out / "checkpoints" / "pretrain_round001.pt", weights_only=False)["arrays"]
    before = initial_state(run_config(cfg), "pretrain")
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-3


def _context(max_weight=100.0, clipping_range=8.0):
    state = RecordDict({RECORD_KEY_STATE: ConfigRecord({"max_weight": max_weight, "clipping_range": clipping_range})})
    return Context(run_id=1, node_id=1, node_config={}, state=state, run_config={})


def test_secagg_quantization_turns_nan_and_out_of_range_weights_into_plausible_numbers():
    """Why the site checks before masking: Flower's quantizer gives no error for either."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    with np.errstate(invalid="ignore"):
        back = dequantize(quantize([np.array([np.nan, 0.5, 100.0], np.float32)], 8.0, 2 ** 22), 8.0, 2 ** 22)[0]
    assert np.all(np.isfinite(back))                    # the NaN became a finite number
    assert back[1] == pytest.approx(0.5, abs=1e-5) and back[2] == pytest.approx(8.0)   # 100 became 8


def test_a_site_refuses_to_mask_what_secagg_would_clip_or_wrap():
    fine = [np.full(4, 7.0, np.float32)]
    check_maskable(fine, 100, _context())                               # 7 x 100/100 within +-8
    with pytest.raises(SecAggDropout, match="clipping_range 8"):
        check_maskable([np.full(4, 9.0, np.float32)], 100, _context())
    check_maskable([np.full(4, 9.0, np.float32)], 50, _context())        # scaled by 50/100: 4.5
    with pytest.raises(SecAggDropout, match="NaN"):
        check_maskable([np.array([0.0, np.nan], np.float32)], 10, _context())
    with pytest.raises(SecAggDropout, match="max_weight"):
        check_maskable(fine, 101, _context())
    with pytest.raises(SecAggDropout, match="no subjects"):
        check_maskable(fine, 0, _context())


def test_ordinary_messages_pass_the_secagg_mod_untouched(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)
    msg = Message(RecordDict({ARRAYS: ArrayRecord({"w": torch.ones(2)}), CONFIG: ConfigRecord({"phase": "x"})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    seen = []
    secagg_mod(msg, _context(), lambda m, c: seen.append(m) or m)
    assert seen == [msg]                   # Flower's secaggplus_mod alone raises KeyError on this message
    # a server cannot claim that an unmasked request is masked (site policy secure_aggregation_required)
    forged = Message(RecordDict({ARRAYS: ArrayRecord({"w": torch.ones(2)}), CONFIG: ConfigRecord({SECAGG_MASKED: True})}),
                     dst_node_id=1, message_type=MessageType.TRAIN)
    secagg_mod(forged, _context(), lambda m, c: seen.append(m) or m)
    assert SECAGG_MASKED not in seen[-1].content[CONFIG]


def test_secure_aggregation_config_is_checked():
    with pytest.raises(ValueError, match="fedavg"):
        run_config(tf.tiny_config("x", secure_aggregation={"enabled": True}, strategy={"name": "fedprox"}))
    with pytest.raises(ValueError, match="central_dp"):
        run_config(tf.tiny_config("x", secure_aggregation={"enabled": True}, central_dp={"clipping": "server"}))
    with pytest.raises(ValueError, match="num_shares"):
        run_config(tf.tiny_config("x", secure_aggregation={"enabled": True, "num_shares": 2}))
    args = run_config(tf.tiny_config("x", secure_aggregation={"num_shares": 5, "reconstruction_threshold": 3}
                                     )).secure_aggregation.flower_args()
    assert (args["num_shares"], args["reconstruction_threshold"]) == (5, 3) and isinstance(args["num_shares"], int)
