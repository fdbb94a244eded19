"""The federated run end to end on Flower's simulation engine (real Ray workers, real site folders),
its resume path, the baselines, and the server's handling of failed sites and NaN updates."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from cmvim.run_config import StrategyConfig
from cmvim.protocol import ARRAYS, METRICS, SITE
from cmvim.server.strategy import make_strategy

pytest.importorskip("nilearn")

def tiny_config(cohort_path: Path, **overrides) -> dict:
    cfg = {
        "seed": 0,
        "cohort": {"path": str(cohort_path)},
        "model": {"preset": "tiny"},
        "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
        "split_fractions": [0.6, 0.0, 0.4],
        "pretrain": {"rounds": 2, "local_epochs": 1, "batch_size": 6, "lr": 0.001},
        "finetune": {"rounds": 5, "local_epochs": 3, "batch_size": 4, "lr": 0.002},
        "modality_dropout": 0.0,
        "strategy": {"name": "fedavg", "min_nodes": 2},
        "evaluation": {"bootstrap": 200, "every_round": False},
    }
    for key, value in overrides.items():
        cfg[key] = value if not isinstance(value, dict) else {**cfg.get(key, {}), **value}
    return cfg


def run_sim(tmp_path: Path, cfg: dict, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "cmvim.simulations.cli", "--config", str(config), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_three_site_run_pretrain_finetune_evaluate(easy_cohort, tmp_path):
    out = tmp_path / "run"
    proc = run_sim(tmp_path, tiny_config(easy_cohort), out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[pretrain] round 2/2 | sites 3/3" in proc.stdout and "[finetune] round 5/5" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"sites", "pooled", "rounds", "config"}
    assert set(metrics["sites"]) == {"A", "B", "C"}
    for site, m in metrics["sites"].items():
        assert set(m) >= {"auc", "acc", "n_test", "auc_ci", "sensitivity", "specificity"}
        assert m["n_test"] >= 10
    assert [(r["phase"], r["round"]) for r in metrics["rounds"]] == [
        ("pretrain", 1), ("pretrain", 2), ("finetune", 1), ("finetune", 2), ("finetune", 3), ("finetune", 4), ("finetune", 5)]
    assert all(set(r["train"]) == {"A", "B", "C"} for r in metrics["rounds"])
    pretrain_losses = [np.mean([m["loss"] for m in r["train"].values()]) for r in metrics["rounds"][:2]]
    assert pretrain_losses[1] < pretrain_losses[0]
    aucs = [m["auc"] for m in metrics["sites"].values() if m["auc"] is not None]
    assert len(aucs) >= 2 and np.mean(aucs) > 0.65, metrics["sites"]
    assert metrics["pooled"]["auc"] > 0.65
    assert metrics["pooled"]["n_test"] == sum(m["n_test"] for m in metrics["sites"].values())
    # calibration of the reported scores, from the same histograms as the ROC: Brier and ECE
    # per site and pooled, a reliability diagram, a table in summary.md
    for entry in (*metrics["sites"].values(), metrics["pooled"]):
        assert 0 <= entry["brier"] <= 1 and 0 <= entry["ece"] <= 1, entry
    assert "## Calibration of the reported scores" in (out / "summary.md").read_text()
    for name in ("roc_A.png", "roc_B.png", "roc_C.png", "roc_pooled.png", "reliability.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    for site, m in metrics["sites"].items():
        assert f"| {site:<6} | {m['auc']:.3f} |" in summary
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [   # checkpoints.keep_last: 2 a phase
        "evaluate_round000.pt", "finetune_round004.pt", "finetune_round005.pt", "pretrain_round001.pt",
        "pretrain_round002.pt"]
    # every round's time split into the sites' work and the rest (process starts, transport): with
    # fewer cores than sites, the simulation runs `cores` sites at once and the queue counts as work
    at_once = min(3, os.cpu_count() or 1)
    for r in metrics["rounds"]:
        assert 0 < r["site_work_seconds"] <= r["seconds"] and r["overhead_seconds"] >= 0
        assert all(m["work-seconds"] > 0 for m in r["train"].values())
        assert r.get("sites_at_once", 3) == at_once
    assert "s/round (site work" in proc.stdout
    assert (f"{at_once} sites at a time, overhead" in proc.stdout) == (at_once < 3)
    # what left the sites: aggregate numbers only, no subject ids in the run's record
    subject_ids = [line.split(",")[0] for site in "ABC" for line in
                   (Path(easy_cohort) / site / "manifest.csv").read_text().splitlines()[1:]]
    text = (out / "metrics.json").read_text() + proc.stdout
    assert not [s for s in subject_ids if s in text]


def test_stopped_run_resumes_from_its_last_checkpoint(easy_cohort, tmp_path):
    out = tmp_path / "stopped"
    cfg = tiny_config(easy_cohort, pretrain={"rounds": 3}, finetune={"rounds": 2, "local_epochs": 1})
    config = tmp_path / "stopped.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cmvim.simulations.cli", "--config", str(config), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "pretrain_round002.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before round 2"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)              # the whole process group: driver and Ray workers
        proc.wait()
    assert not (out / "metrics.json").exists()
    resumed = run_sim(tmp_path, cfg, out, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from pretrain round" in resumed.stdout
    assert "[pretrain] round 1/3" not in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["phase"], r["round"]) for r in metrics["rounds"]] == [
        ("pretrain", 1), ("pretrain", 2), ("pretrain", 3), ("finetune", 1), ("finetune", 2)]


def test_baselines_run_beside_the_federated_model(easy_cohort, tmp_path):
    out = tmp_path / "baselines"
    cfg = tiny_config(easy_cohort, pretrain={"rounds": 1}, finetune={"rounds": 2, "local_epochs": 2},
                      baselines=["local", "centralized"])
    proc = run_sim(tmp_path, cfg, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("local", "centralized"):
        baseline = metrics["baselines"][name]
        assert set(baseline["sites"]) == {"A", "B", "C"}
        assert baseline["pooled"]["n_test"] == metrics["pooled"]["n_test"]      # same test splits
    assert "AUC local" in proc.stdout and "AUC centralized" in proc.stdout


@pytest.mark.parametrize("min_nodes", [2, 3])
def test_a_failing_site_is_named_and_the_run_goes_on(easy_cohort, tmp_path, min_nodes):
    """min_nodes 2: A and B carry the rounds. min_nodes 3: no round can aggregate, the global
    model stays as it was, and the final evaluation still scores it (Flower's Result then holds
    an empty ArrayRecord: a regression from a deployment run)."""
    cohort = tmp_path / "cohort"
    shutil.copytree(easy_cohort, cohort)
    (cohort / "C" / "manifest.csv").write_text("subject_id,mri\nC-1,missing.nii.gz\n")   # nothing usable at C
    out = tmp_path / "faulty"
    cfg = tiny_config(cohort, pretrain={"rounds": 1}, finetune={"rounds": 1, "local_epochs": 1},
                      cohort={"path": str(cohort), "site_names": ["A", "B", "C"]}, strategy={"min_nodes": min_nodes})
    config = tmp_path / "faulty.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code = ("from pathlib import Path; from cmvim.server.assembly import PreparedRun, RunRequest; "
            "from cmvim.simulations.cli import run_federated; "
            f"request = RunRequest(Path({str(config)!r}), out_dir=Path({str(out)!r})); "
            "run_federated(request, PreparedRun(request.config()), 3, verbose=False)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "site C left out (train): data problem at the site: no usable subjects" in proc.stdout
    assert "C-1" not in proc.stdout                                    # the subject id stayed at the site
    assert "Traceback" not in proc.stdout + proc.stderr                # a site's data problem is a line, not a trace
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"A", "B"}
    assert {f["site"] for f in metrics["failures"]} == {"C"}
    # pretrain round 1 and finetune round 1 are two rejections (they were once merged as equal)
    assert [(f["phase"], f["round"]) for f in metrics["failures"] if f["stage"] == "train"] == [
        ("pretrain", 1), ("finetune", 1)]
    assert set(metrics["rounds"][0]["train"]) == {"A", "B"}
    if min_nodes == 3:
        # no round aggregated: nothing trained the classifier, so no model/ and metrics.json says why
        assert "the global model is kept as it was" in proc.stdout + proc.stderr
        assert metrics["model"]["training"]["finetune_rounds_aggregated"] == 0 and not (out / "model").exists()
        assert "no fine-tuning round aggregated" in metrics["model"]["note"]
        assert "no model/ written" in (out / "summary.md").read_text()
    else:
        assert metrics["model"]["training"]["finetune_rounds_aggregated"] == 1 and (out / "model").is_dir()
        assert metrics["model"]["training"]["finetune_sites"] == ["A", "B"]


def test_a_cohort_with_too_few_trainable_sites_stops_before_any_round(easy_cohort, tmp_path):
    """No usable visit at B and C, min_nodes 2: one line per site says why, the run stops before
    Flower starts (no rounds, no traceback, no model/), exit status 1."""
    cohort = tmp_path / "cohort"
    shutil.copytree(easy_cohort, cohort, ignore=shutil.ignore_patterns(".cmvim_cache"))
    for site in "BC":
        (cohort / site / "manifest.csv").write_text("subject_id,mri,label\nX-1,missing.nii.gz,AD\n")
    out = tmp_path / "empty"
    proc = run_sim(tmp_path, tiny_config(cohort), out, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    for site in "BC":
        assert f"! site {site} cannot train: no usable subject-visit" in proc.stdout
    assert "stopped before any round: 1 of 3 sites have data to train on and strategy.min_nodes is 2" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr and "round 1" not in proc.stdout
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def _pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds key=value: how the test finds what `flwr run` detached."""
    pids, needle = [], f"{key}={value}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


# the connection docs/federated.md tells users to add to $FLWR_HOME/config.toml
FLWR_LOCAL_CONNECTION = """[superlink]
default = "cmvim-local"

[superlink.cmvim-local]
address = ":local:"
options.num-supernodes = 3
options.backend.client-resources.num-cpus = 1
"""


def test_flwr_run_runs_the_same_app(easy_cohort, tmp_path):
    """`flwr run .` packages the app from pyproject's [tool.flwr.app] and runs it on a local
    simulation SuperLink; its results are the same files cmvim-sim writes."""
    config, out, home = tmp_path / "flwr.yaml", tmp_path / "flwr-out", tmp_path / "flwr-home"
    config.write_text(yaml.safe_dump(tiny_config(easy_cohort, pretrain={"rounds": 1},
                                                 finetune={"rounds": 1, "local_epochs": 1})))
    home.mkdir()
    (home / "config.toml").write_text(FLWR_LOCAL_CONNECTION)
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    flwr = Path(sys.executable).with_name("flwr")
    repo = Path(__file__).resolve().parent.parent
    pyproject = (repo / "pyproject.toml").read_text()
    try:
        proc = subprocess.run([str(flwr), "run", ".", "cmvim-local", "--stream", "--run-config",
                               f'config-file="{config}" out-dir="{out}"'], capture_output=True, text=True,
                              timeout=600, env=env, cwd=repo)
    finally:
        for pid in _pids_with_env("FLWR_HOME", str(home)):     # the detached local SuperLink and its children
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (repo / "pyproject.toml").read_text() == pyproject          # Flower left our file alone
    assert "== pretrain: rounds 1-1, strategy fedavg, 3 sites connected ==" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())      # `flwr run` exits 0 on failure: check results
    assert set(metrics["sites"]) == {"A", "B", "C"}
    assert [(r["phase"], r["round"]) for r in metrics["rounds"]] == [("pretrain", 1), ("finetune", 1)]
    assert "| pooled |" in proc.stdout


def _reply(site: str, arrays: dict, node: int, num_examples: int = 10) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord({"num-examples": num_examples, "loss": 1.0}),
                          SITE: ConfigRecord({"name": site})})
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=metadata)


def test_server_rejects_a_nan_update_naming_the_site():
    strategy = make_strategy(StrategyConfig(name="fedavg", min_nodes=2))
    good = {"w": torch.ones(3, 2)}
    strategy.expected_shapes = {"w": (3, 2)}
    bad = {"w": torch.tensor([[1.0, float("nan")], [1.0, 1.0], [1.0, 1.0]])}
    replies = [_reply("A", good, 1), _reply("B", {"w": good["w"] * 3}, 2), _reply("C", bad, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.full((3, 2), 2.0))
    (rejected,) = strategy.round_log.rejected
    assert rejected["site"] == "C" and "1 NaN/inf values in 'w'" in rejected["reason"]
    assert set(strategy.round_log.train) == {"A", "B"}
    # below min_nodes valid updates the global model is kept
    arrays, _ = strategy.aggregate_train(2, [replies[0], replies[2]])
    assert arrays is None


def test_dp_sgd_run_reports_epsilon_and_a_spent_budget_stops_sites(easy_cohort, tmp_path):
    """DP-SGD at every site: epsilon per round and per site in the results; a budget that
    covers one pretraining round stops every site's training after it, and the run still
    fine-tunes nothing, keeps the global model and evaluates it."""
    from cmvim.data import SiteData
    from cmvim.run_config import run_config
    from cmvim.privacy import epsilon
    from cmvim.site_task import SiteTask

    cohort = tmp_path / "cohort"
    shutil.copytree(easy_cohort, cohort, ignore=shutil.ignore_patterns(".cmvim_privacy"))
    base = tiny_config(cohort, pretrain={"rounds": 2}, finetune={"rounds": 1, "local_epochs": 1},
                       privacy={"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0})
    cfg = run_config(base)
    one, two = [], []
    for site in "ABC":
        data = SiteData.load(cohort / site, cfg.preprocess, seed=cfg.seed, split_fractions=cfg.split_fractions)
        delta, plan = SiteTask(cfg, [data], site).privacy_plan()
        q, steps = plan["pretrain"]
        one.append(epsilon([(1.0, q, steps)], delta))
        two.append(epsilon([(1.0, q, 2 * steps)], delta))
    budget = max(one) * 1.01
    assert budget < min(two)
    base["privacy"]["epsilon_budget"] = budget
    out = tmp_path / "dp"
    proc = run_sim(tmp_path, base, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    first = metrics["rounds"][0]["train"]
    assert set(first) == {"A", "B", "C"} and all(0 < first[s]["epsilon"] <= budget for s in first)
    assert "epsilon A" in proc.stdout                              # in the round's progress line
    stopped = [f for f in metrics["failures"] if "privacy budget" in f["reason"]]
    assert {f["site"] for f in stopped} == {"A", "B", "C"}
    assert all("stops training for this run and still evaluates" in f["reason"] for f in stopped)
    assert set(metrics["sites"]) == {"A", "B", "C"}                # they still evaluated
    for site, m in metrics["sites"].items():
        assert m["epsilon"] == pytest.approx(first[site]["epsilon"])
    assert "differential privacy (DP-SGD at each site" in (out / "summary.md").read_text()
