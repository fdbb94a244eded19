"""The warm site worker's channel: a real SuperNode in process isolation (as cmvim-client starts it)
hands tasks only to a caller that signs with the site's secret. The attack: another local process
(another user on the hospital's machine) asks the SuperNode's Runtime API for the site's work."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import flwr  # noqa: F401 - a core dependency, run here only as processes: a broken install fails at import

from cmvim.cli_util import free_port
from cmvim.flower_process import Child, flower_env


ACQUIRE = """
import sys
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from cmvim.client.worker import _runtime_client
client = _runtime_client(sys.argv[1], [RuntimeVersionHttpInterceptor(component_name="SuperExec"),
    SuperExecAuthHttpInterceptor(master_secret=open(sys.argv[2], "rb").read(),
                                 protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))])
answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
print("ANSWERED", "task" if answer.HasField("task") else "no task")
"""


def _acquire(port: int, secret_file: Path) -> subprocess.CompletedProcess:
    """Ask for the site's next task as a separate local process would (Flower's client ends its own
    process with SIGINT when the server answers 401, so the asking runs in its own process)."""
    return subprocess.run([sys.executable, "-c", ACQUIRE, f"127.0.0.1:{port}", str(secret_file)],
                          capture_output=True, text=True, timeout=60)


def test_only_the_sites_secret_takes_its_tasks(tmp_path):
    from cmvim.client.join import worker_secret
    state = tmp_path / "node"
    state.mkdir(mode=0o700)
    secret_file = worker_secret(state)
    assert oct(secret_file.stat().st_mode & 0o777) == "0o600" and len(secret_file.read_bytes()) == 32
    port = free_port()
    node = Child([sys.executable, "-m", "cmvim.client.supernode", "--insecure", "--superlink",
                  f"127.0.0.1:{free_port()}", "--isolation", "process", "--superexec-auth-secret-file",
                  str(secret_file), "--host", "127.0.0.1", "--port", str(port), "--max-retries", "1000"],
                 env=flower_env(tmp_path / "home"), echo=False, log_path=tmp_path / "supernode.log")
    try:
        deadline = time.time() + 90
        answer = _acquire(port, secret_file)
        while "ANSWERED" not in answer.stdout and time.time() < deadline:     # the Runtime API is starting
            time.sleep(1)
            answer = _acquire(port, secret_file)
        assert "ANSWERED no task" in answer.stdout, answer.stderr[-2000:] + "\n".join(node.lines[-20:])
        for wrong in (os.urandom(32), b"x"):
            forged = tmp_path / "forged.secret"
            forged.write_bytes(wrong)
            refused = _acquire(port, forged)
            assert refused.returncode != 0 and "ANSWERED" not in refused.stdout
            assert "401 Unauthorized" in refused.stderr, refused.stderr[-2000:]
    finally:
        node.stop()
    assert node.poll() is not None


def test_a_fresh_secret_at_every_start(tmp_path):
    from cmvim.client.join import worker_secret
    first = worker_secret(tmp_path).read_bytes()
    assert worker_secret(tmp_path).read_bytes() != first


def _site(tmp_path: Path, n: int = 4) -> Path:
    import nibabel as nib
    import numpy as np
    site = tmp_path / "A"
    site.mkdir()
    rows = ["subject_id,mri,label"]
    rng = np.random.default_rng(0)
    for i in range(n):
        nib.save(nib.Nifti1Image(rng.random((32, 32, 32)).astype(np.float32), np.diag([6.0, 6.0, 6.0, 1.0])),
                 site / f"s{i}.nii.gz")
        rows.append(f"s{i},s{i}.nii.gz,{'AD' if i % 2 else 'CN'}")
    (site / "manifest.csv").write_text("\n".join(rows) + "\n")
    return site


def test_a_warm_process_keeps_the_sites_data_until_a_file_it_read_changes(tmp_path):
    """The warm worker (and a simulation's worker) keeps the loaded site between messages; a scan
    replaced or damaged mid-run is read again, and a damaged one is reported, not trained on."""
    from cmvim.client.app import site_data
    from cmvim.run_config import run_config
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32}})
    site_dir = _site(tmp_path)
    first = site_data(cfg, site_dir)
    assert site_data(cfg, site_dir) is first and len(first.records) == 4
    other = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32}, "seed": 7})
    assert site_data(other, site_dir) is not first                       # another run's splits
    (site_dir / "s1.nii.gz").write_bytes(b"not a nifti any more")
    again = site_data(cfg, site_dir)
    assert again is not first and len(again.records) == 3
    assert [e.row for e in again.summary.skipped] == [3]


STUCK = """
import sys, time
import cmvim.client.worker as worker
worker.STOP_GRACE = 2.0

def stuck(address, secret, policy_file, stop, own=None):   # a task whose SuperNode is gone: its retries never end
    worker._busy.set()
    print("busy", flush=True)
    while True:
        time.sleep(0.1)

worker.serve = stuck
sys.exit(worker.main(["--runtime-api-address", "127.0.0.1:1", "--auth-secret-file", sys.argv[1]]))
"""


def test_a_stopped_worker_does_not_outlive_its_task_by_more_than_the_grace(tmp_path):
    """cmvim-client killed mid-task: the worker gets SIGTERM (its parent's death signal) while its
    task retries a SuperNode that is gone. It must end, not linger as an orphan."""
    import signal
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(secret)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "busy"
        started = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert 1.5 < time.time() - started < 10                      # it waited for the task, then left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


WARM_UP = """
import json
from cmvim.ssm import cpu_kernel
kernels = (cpu_kernel._forward_kernel, cpu_kernel._backward_kernel)
before = [len(k.signatures) for k in kernels]
from cmvim.client.worker import warm_up
said = warm_up()
after = [len(k.signatures) for k in kernels]
# what a task then runs: pretraining and the classifier, forward and backward, on the tiny model
from cmvim.model import CMViM, CMViMClassifier, model_config
from cmvim.simulations.toy import synthetic_batch
mc = model_config("tiny")
CMViM(mc)(synthetic_batch(mc, 2, seed=0)).loss.backward()
CMViMClassifier(mc)(synthetic_batch(mc, 2, seed=1)).sum().backward()
print(json.dumps({"said": said, "before": before, "after": after,
                  "task": [len(k.signatures) for k in kernels]}))
"""


def test_the_worker_loads_the_scan_kernel_before_its_first_task():
    """The warm-up (run before the worker takes tasks) loads every scan kernel signature a task's
    model then calls: the first message of a run no longer pays numba's cache load (or compile)."""
    proc = subprocess.run([sys.executable, "-c", WARM_UP], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["said"].startswith("scan kernel ready on cpu in ")
    assert out["before"] == [0, 0] and out["after"][0] >= 1 and out["after"][1] >= 1
    assert out["task"] == out["after"]            # the model's calls needed nothing the warm-up had not loaded
