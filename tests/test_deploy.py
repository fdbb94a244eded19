"""Deployment with real processes on 127.0.0.1: certificates from cmvim-certs, a SuperLink
with TLS and SuperNode authentication started by `cmvim-server`, three hospitals joining with
`cmvim-client` (before the server is up: they wait and reconnect), a tiny pretrain -> finetune ->
evaluate. Also: an unregistered key is turned away, a client killed mid-run rejoins, and a
request outside a site's policy is refused with the reason sent back. Every process is stopped
by its PID. These are the commands of docs/deploy.md."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flwr  # noqa: F401 - a core dependency, run here only as processes: a broken install fails at import
import pytest
import yaml

from cmvim.cli_util import free_port
from cmvim.simulations.cohort import CohortConfig, cached_cohort

pytest.importorskip("nilearn")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.time() + timeout
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"{what}: a process ended early (status {p.returncode})"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def client_cmd(site: str, data: Path, port: int, certs: Path, key: Path, state: Path, *extra: str) -> list[str]:
    return [str(BIN / "cmvim-client"), "--site", site, "--data", str(data), "--server", f"127.0.0.1:{port}",
            "--root-cert", str(certs / "ca.crt"), "--auth-key", str(key), "--coordinator-key",
            str(certs / "coordinator.pub"), "--state-dir", str(state), *extra]


def run_yaml(tmp_path: Path, pretrain_rounds: int, finetune_epochs: int, min_nodes: int, round_timeout: int,
             **extra) -> Path:
    """The coordinator's run config: the tiny model, one fine-tuning round."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25},
        "split_fractions": [0.6, 0.0, 0.4], "modality_dropout": 0.0,
        "pretrain": {"rounds": pretrain_rounds, "local_epochs": 1, "batch_size": 6},
        "finetune": {"rounds": 1, "local_epochs": finetune_epochs, "batch_size": 4, "lr": 0.002},
        "strategy": {"min_nodes": min_nodes, "round_timeout": round_timeout},
        "evaluation": {"bootstrap": 100, "every_round": False}, **extra,
    }))
    return config


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    spec = CohortConfig(sites=3, subjects=30, shape=32, seed=3, effect_scale=5.0, pet_missing=0.0)
    return cached_cohort(spec, root=tmp_path_factory.mktemp("deploy-cache"))


def outsider(tmp_path: Path, port: int, ca: Path, key: Path) -> None:
    """Register a node, list nodes and runs, submit and stop a run, as someone who is not the
    coordinator: each must fail with 403 from the public address."""
    from cmvim.server.flower_app import write_project
    home = tmp_path / "outsider"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "target"\n\n[superlink.target]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n')
    app = write_project(tmp_path / "outsider-app", "0.1.0")
    env = dict(os.environ, FLWR_HOME=str(home))
    for command in (["supernode", "register", str(key), "target"], ["supernode", "list", "target"],
                    ["list", "target"], ["run", str(app), "target"], ["stop", "1", "target"]):
        proc = subprocess.run([str(BIN / "flwr"), *command, "--format", "json"], capture_output=True, text=True,
                              env=env, cwd=app, timeout=120)
        answer = json.loads(proc.stdout[proc.stdout.find("{"):])
        assert answer.get("success") is False and "403 Forbidden" in answer.get("error-message", ""), (command, answer)


PRETRAIN_ROUNDS = 40


@pytest.mark.slow          # ~5 min on 2 cores (40 short rounds: a restarted site is back after ~7); .ci/run runs it
def test_deployment_with_tls_node_auth_policy_and_a_restarted_site(cohort, tmp_path):
    certs, other = tmp_path / "certs", tmp_path / "other-keys"
    made = subprocess.run([sys.executable, "-m", "cmvim.deploy.certs", "--out", str(certs), "--server-name", "localhost",
                           "--sites", "A", "B", "C"], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    subprocess.run([sys.executable, "-m", "cmvim.deploy.certs", "--out", str(other), "--keys-only", "--sites", "D"],
                   cwd=REPO, check=True, capture_output=True)
    assert oct((certs / "sites" / "A.key").stat().st_mode & 0o777) == "0o600"

    # long enough that site B can die after round 1 and come back while the run goes on: the warm
    # site worker makes a tiny round a few seconds, and the SuperLink lets the restarted B in only
    # once the old B has missed its heartbeats (about a minute)
    # (site C's policy allows one local epoch: it trains in pretraining and refuses fine-tuning's two)
    config = run_yaml(tmp_path, pretrain_rounds=PRETRAIN_ROUNDS, finetune_epochs=2, min_nodes=2, round_timeout=180)
    policy_c = tmp_path / "policy-C.yaml"             # site C allows one local epoch: fine-tuning asks for 2
    policy_c.write_text("allowed_phases: [pretrain, finetune, evaluate]\nmax_local_epochs: 1\n")
    port, out = free_port(), tmp_path / "results"
    logs = {name: tmp_path / f"{name}.log" for name in ("A", "B", "B2", "C", "D", "server")}
    procs: list[subprocess.Popen] = []
    try:
        # hospitals first: the server is not up yet, so their SuperNodes retry with backoff
        for site in "ABC":
            extra = ("--policy", str(policy_c)) if site == "C" else ()
            procs.append(start(client_cmd(site, cohort / site, port, certs, certs / "sites" / f"{site}.key",
                                          tmp_path / f"node-{site}", *extra), logs[site]))
        clients = dict(zip("ABC", procs))
        time.sleep(3)
        server = start([str(BIN / "cmvim-server"), "--config", str(config), "--out", str(out),
                        "--certs", str(certs), "--site-keys", str(certs / "sites"),
                        "--address", f"127.0.0.1:{port}", "--wait-sites", "3"], logs["server"])
        procs.append(server)
        wait_for(lambda: "sites online: 3/3" in logs["server"].read_text(), 180, "three sites online",
                 [server, *clients.values()])

        # site B dies after the first round (SIGKILL: no clean-up of its own) and is started again
        wait_for(lambda: any((out / "checkpoints").glob("pretrain_round*.pt")), 300, "pretrain round 1", [server])
        clients["B"].kill()
        clients["B"].wait()
        time.sleep(2)
        procs.append(start(client_cmd("B", cohort / "B", port, certs, certs / "sites" / "B.key",
                                      tmp_path / "node-B"), logs["B2"]))
        # (while it rejoins, the checks below run against the same server)

        # an outsider with the public ca.crt and a fresh key, using Flower's own CLI against the
        # address the sites use: every control-plane request is refused (the proxy serves the Fleet
        # API only), while the coordinator registered the sites and submits the run on loopback
        outsider(tmp_path, port, certs / "ca.crt", other / "sites" / "D.pub")

        # a CA that did not sign the server's certificate: named, not retried
        subprocess.run([sys.executable, "-m", "cmvim.deploy.certs", "--out", str(tmp_path / "wrong-ca")], cwd=REPO,
                       check=True, capture_output=True)
        wrong_ca = subprocess.run(client_cmd("A", cohort / "A", port, tmp_path / "wrong-ca", certs / "sites" / "A.key",
                                             tmp_path / "node-A2"), capture_output=True, text=True, timeout=120)
        assert wrong_ca.returncode == 3, wrong_ca.stdout[-2000:] + wrong_ca.stderr[-2000:]
        assert "not signed by the CA in --root-cert" in wrong_ca.stderr

        # a site whose key the coordinator never registered is turned away, with the reason
        intruder = subprocess.run(client_cmd("D", cohort / "A", port, certs, other / "sites" / "D.key",
                                             tmp_path / "node-D", "--auth-retries", "0"),
                                  capture_output=True, text=True, timeout=120)
        assert intruder.returncode == 4, intruder.stdout[-2000:] + intruder.stderr[-2000:]
        assert "the server refused this site's key" in intruder.stderr

        server.wait(900)
        server_log = logs["server"].read_text()
        assert server.returncode == 0, server_log[-4000:]
    finally:
        for proc in procs:
            stop(proc)

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"A", "B", "C"}
    # every site answered the final evaluation; this small cohort's test splits hold fewer than
    # the default policy's min_cell_count (10) subjects of a class, so each released nothing
    assert all(m.get("suppressed") == 1 and m["n_test"] == 0 and "auc" not in m for m in metrics["sites"].values())
    rounds = metrics["rounds"]
    assert [(r["phase"], r["round"]) for r in rounds] == [("pretrain", i) for i in range(1, PRETRAIN_ROUNDS + 1)] + [
        ("finetune", 1)]
    assert set(rounds[0]["train"]) == {"A", "B", "C"}
    # the restarted B is let in once the SuperLink has seen the old one miss its heartbeats; it
    # then works for the same run (its own log) and is scored in the final evaluation
    assert "cmvim: site B:" in logs["B2"].read_text(), "the restarted site B did no work"
    # C trained in pretraining, and refused fine-tuning with its policy's reason sent back
    assert "C" in rounds[0]["train"] and "C" not in rounds[-1]["train"]
    refusals = [f for f in metrics["failures"] if f["site"] == "C"]
    assert refusals and all("site policy allows at most 1 local epochs; the run asks for 2" in f["reason"]
                            for f in refusals)
    assert "run" in server_log and "completed; results:" in server_log
    assert "site policy" in logs["C"].read_text()
    # every process we started is gone, and so are their SuperNodes / SuperLink
    for proc in procs:
        assert proc.poll() is not None


@pytest.mark.slow          # ~2 min: each SecAgg+ round is four message exchanges
def test_deployment_with_secure_aggregation(cohort, tmp_path):
    """SecAgg+ across real SuperNodes: its keys live in the ClientApp's context, which the
    SuperNode must carry from one message (and one ClientApp process) to the next. Site C's
    policy requires secure aggregation: it trains, because its requests arrive masked."""
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "cmvim.deploy.certs", "--out", str(certs), "--server-name", "localhost",
                    "--sites", "A", "B", "C"], cwd=REPO, check=True, capture_output=True)
    config = run_yaml(tmp_path, pretrain_rounds=1, finetune_epochs=1, min_nodes=3, round_timeout=300,
                      secure_aggregation={"enabled": True})
    policy_c = tmp_path / "policy-C.yaml"              # C sends weights only through SecAgg+
    policy_c.write_text("secure_aggregation_required: true\n")
    port, out = free_port(), tmp_path / "results"
    procs: list[subprocess.Popen] = []
    try:
        for site in "ABC":
            extra = ("--policy", str(policy_c)) if site == "C" else ()
            procs.append(start(client_cmd(site, cohort / site, port, certs, certs / "sites" / f"{site}.key",
                                          tmp_path / f"node-{site}", *extra), tmp_path / f"{site}.log"))
        server = start([str(BIN / "cmvim-server"), "--config", str(config), "--out", str(out), "--certs", str(certs),
                        "--site-keys", str(certs / "sites"), "--address", f"127.0.0.1:{port}", "--wait-sites", "3"],
                       tmp_path / "server.log")
        procs.append(server)
        server.wait(900)
        server_log = (tmp_path / "server.log").read_text()
        assert server.returncode == 0, server_log[-4000:]
    finally:
        for proc in procs:
            stop(proc)
    assert "with secure aggregation (SecAgg+)" in server_log
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["phase"], set(r["train"])) for r in metrics["rounds"]] == [("pretrain", {"A", "B", "C"}),
                                                                          ("finetune", {"A", "B", "C"})]
    assert not metrics.get("failures") and set(metrics["sites"]) == {"A", "B", "C"}


@pytest.mark.slow          # ~1-2 min each: a SuperLink, one site, one refused run
@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_a_site_refuses_an_app_bundle_that_ships_code(cohort, tmp_path, mode):
    """The attack: whoever can submit a run ships a ClientApp with the site policy's check removed
    (a `cmvim` package inside the bundle, which Flower would put first on the import path). The
    site refuses the bundle before anything of it is installed or imported - the warm site worker
    (the default) and the `flwr-clientapp` guard (--cold) alike: the shipped code never runs (it
    would leave a marker file), and the refusal names the bundle's hash."""
    from argparse import Namespace

    from cmvim.server.deploy import CONNECTION, Coordinator
    from cmvim.server.flower_app import write_project

    marker = tmp_path / "shipped-code-ran"
    evil = write_project(tmp_path / "evil-app", "0.1.0")
    (evil / "cmvim" / "client").mkdir(parents=True)
    (evil / "cmvim" / "__init__.py").write_text("")
    (evil / "cmvim" / "client" / "__init__.py").write_text("")
    (evil / "cmvim" / "client" / "app.py").write_text(            # only a site's ClientApp imports this
        f"open({str(marker)!r}, 'w').write('ran')\nfrom flwr.clientapp import ClientApp\napp = ClientApp()\n")
    port = free_port()
    args = Namespace(config=run_yaml(tmp_path, 1, 1, 1, 60), out=tmp_path / "out", certs=None, site_keys=None,
                     address=f"127.0.0.1:{port}", superlink=None, wait_sites=1, wait_timeout=120.0,
                     state_dir=tmp_path / "link", resume=False, insecure=True, keep_running=False, control_port=None)
    coordinator = Coordinator(args)
    site_log = tmp_path / "A.log"
    site = None
    try:
        coordinator.write_connection()
        coordinator.start_superlink()
        site = start([str(BIN / "cmvim-client"), "--site", "A", "--data", str(cohort / "A"), "--server",
                      f"127.0.0.1:{port}", "--insecure", "--state-dir", str(tmp_path / "node-A"),
                      *(["--cold"] if mode == "cold" else [])], site_log)
        coordinator.wait_for_sites(1)
        answer = coordinator.flwr("run", str(evil), CONNECTION, "--run-config",
                                  f'config-file="{args.config}" out-dir="{tmp_path / "evil-out"}"')
        run_id = str(answer["run-id"])
        wait_for(lambda: "site refused app bundle sha256" in site_log.read_text(), 240, "the site's refusal", [site])
        coordinator.flwr("run", "stop", run_id, CONNECTION, check=False)
    finally:
        if site is not None:
            stop(site)
        coordinator.stop()
    text = (tmp_path / "node-A" / ("worker.log" if mode == "warm" else "supernode.log")).read_text()
    assert "it carries files (cmvim/__init__.py" in text
    assert not marker.exists()                       # the shipped code never ran
    assert oct((tmp_path / "node-A" / "supernode.log").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "node-A").stat().st_mode & 0o777) == "0o700"


def _worker_pids(state: Path) -> list[int]:
    """PIDs of the site worker that reads `state`'s secret: found by its command line, killed by PID."""
    secret = str(state / "worker.secret")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cmvim.client.worker" in cmdline and secret.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow          # ~2 min: a SuperLink, two sites, four short rounds
def test_a_killed_site_worker_is_started_again_and_the_site_goes_on(cohort, tmp_path):
    """The warm site worker dies in the middle of a task (SIGKILL: no clean-up). cmvim-client
    starts it again; that round goes on without the site (or with it, if the reply made it), and
    the site trains in the rounds after it, from the same SuperNode, in the same run."""
    config = run_yaml(tmp_path, pretrain_rounds=4, finetune_epochs=1, min_nodes=1, round_timeout=60)
    data = yaml.safe_load(config.read_text())
    data["pretrain"]["local_epochs"] = 4                  # a task long enough to be killed in
    config.write_text(yaml.safe_dump(data))
    port, out = free_port(), tmp_path / "results"
    logs = {name: tmp_path / f"{name}.log" for name in ("A", "B", "server")}
    procs: list[subprocess.Popen] = []
    try:
        for site in "AB":
            procs.append(start([str(BIN / "cmvim-client"), "--site", site, "--data", str(cohort / site), "--server",
                                f"127.0.0.1:{port}", "--insecure", "--state-dir", str(tmp_path / f"node-{site}")],
                               logs[site]))
        server = start([str(BIN / "cmvim-server"), "--config", str(config), "--out", str(out), "--insecure",
                        "--address", f"127.0.0.1:{port}", "--wait-sites", "2"], logs["server"])
        procs.append(server)
        worker_log = tmp_path / "node-A" / "worker.log"
        # the second task A starts is pretraining round 2: kill the worker while it runs
        wait_for(lambda: worker_log.exists() and worker_log.read_text().count(" started") >= 2, 300,
                 "site A's second task", procs)
        killed = _worker_pids(tmp_path / "node-A")
        assert len(killed) == 1
        os.kill(killed[0], signal.SIGKILL)
        wait_for(lambda: "worker exited" in logs["A"].read_text(), 60, "cmvim-client noticing", procs)
        wait_for(lambda: len(_worker_pids(tmp_path / "node-A")) == 1, 60, "a new site worker", procs)
        assert _worker_pids(tmp_path / "node-A") != killed
        server.wait(600)
        assert server.returncode == 0, logs["server"].read_text()[-4000:]
    finally:
        for proc in procs:
            stop(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [(r["phase"], r["round"]) for r in rounds][:4] == [("pretrain", i) for i in range(1, 5)]
    assert "A" in rounds[0]["train"]                               # before the kill
    assert "A" in rounds[3]["train"] and "A" in rounds[4]["train"]   # after it: pretraining round 4, fine-tuning
    assert worker_log.read_text().count("cmvim site worker: ready") >= 2 or \
        logs["A"].read_text().count("cmvim site worker: ready") >= 2
    assert not _worker_pids(tmp_path / "node-A") and not _worker_pids(tmp_path / "node-B")


@pytest.mark.slow          # ~3 min: two sites, a coordinator stopped after round 2 and started again
def test_a_restarted_coordinator_gets_its_sites_back_and_resumes(cohort, tmp_path):
    """The SuperLink keeps its state in memory: a restarted coordinator knows no node. It registers
    the site keys again from --site-keys, the sites' SuperNodes (refused with their old node id, or
    cut off) reconnect with their key, and the run resumes from the checkpoint with both sites."""
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "cmvim.deploy.certs", "--out", str(certs), "--server-name", "localhost",
                    "--sites", "A", "B"], cwd=REPO, check=True, capture_output=True)
    config = run_yaml(tmp_path, pretrain_rounds=6, finetune_epochs=1, min_nodes=2, round_timeout=120)
    port, out = free_port(), tmp_path / "results"
    logs = {name: tmp_path / f"{name}.log" for name in ("A", "B", "server", "server2")}
    server_cmd = [str(BIN / "cmvim-server"), "--config", str(config), "--out", str(out), "--certs", str(certs),
                  "--site-keys", str(certs / "sites"), "--address", f"127.0.0.1:{port}", "--wait-sites", "2"]
    procs: list[subprocess.Popen] = []
    try:
        for site in "AB":
            procs.append(start(client_cmd(site, cohort / site, port, certs, certs / "sites" / f"{site}.key",
                                          tmp_path / f"node-{site}"), logs[site]))
        server = start(server_cmd, logs["server"])
        procs.append(server)
        wait_for(lambda: (out / "checkpoints" / "pretrain_round002.pt").exists(), 300, "pretrain round 2", procs)
        stop(server)                                           # SIGTERM: cmvim-server stops its SuperLink
        assert server.returncode is not None
        time.sleep(2)
        again = start([*server_cmd, "--resume"], logs["server2"])
        procs.append(again)
        again.wait(600)
        assert again.returncode == 0, logs["server2"].read_text()[-4000:]
    finally:
        for proc in procs:
            stop(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [(r["phase"], r["round"]) for r in rounds] == [("pretrain", i) for i in range(1, 7)] + [("finetune", 1)]
    assert set(rounds[-2]["train"]) == {"A", "B"} and set(rounds[-1]["train"]) == {"A", "B"}
    assert "registered site A" in logs["server2"].read_text()


class SiteKeyHeaders:
    """Flower's SuperNode request signing (NodeAuthHttpInterceptor's headers), for a site key
    held by the test: each request signed afresh, or the last request's headers sent again."""

    def __init__(self, key_file: Path):
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes
        self.key = load_ssh_private_key(key_file.read_bytes(), password=None)
        self.public = public_key_to_bytes(self.key.public_key())
        self.replay, self.last = False, None

    def intercept(self, context, call_next):
        from base64 import b64encode

        from flwr.common.constant import TIMESTAMP_HEADER
        from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
        from flwr.supercore.date import now
        from flwr.supercore.interceptors.http.utils import add_headers
        from flwr.supercore.primitives.asymmetric import sign_message
        if not (self.replay and self.last):
            stamp = now().isoformat()
            self.last = {FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(self.public).decode("ascii"), TIMESTAMP_HEADER: stamp,
                         FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(self.key, stamp.encode())).decode("ascii")}
        add_headers(context.request, dict(self.last))
        return call_next(context)


def fleet_status(call) -> int:
    """The HTTP status of one Fleet request (200 when it went through)."""
    import httpx
    try:
        call()
        return 200
    except httpx.HTTPStatusError as err:
        return err.response.status_code


@pytest.mark.slow          # ~1.5 min: a SuperLink, one hospital, one registered attacker key, a short run
def test_a_site_key_cannot_instruct_answer_for_replay_or_flood_through_the_fleet_api(cohort, tmp_path):
    """Issue #30 through the coordinator's real public port, as site C (its registered key, Flower's
    own HTTP client and request signing) while hospital A takes part in a run: C's instruction
    for A and C's reply in A's name are refused before they are stored; C's signed headers work
    once; C over --site-rate gets 503 and, after a pause, is served again; a request over
    --max-request-mb gets 413. A never sees any of it: it trains every round, spends nothing,
    refuses nothing."""
    import httpx
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PushMessagesRequest  # pylint: disable=E0611
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=E0611
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient

    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "cmvim.deploy.certs", "--out", str(certs), "--server-name", "localhost",
                    "--sites", "A", "C"], cwd=REPO, check=True, capture_output=True)
    config = run_yaml(tmp_path, pretrain_rounds=6, finetune_epochs=1, min_nodes=1, round_timeout=180)
    port, out, logs = free_port(), tmp_path / "results", {n: tmp_path / f"{n}.log" for n in ("A", "server")}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start(client_cmd("A", cohort / "A", port, certs, certs / "sites" / "A.key", tmp_path / "node-A"),
                           logs["A"]))
        server = start([str(BIN / "cmvim-server"), "--config", str(config), "--out", str(out), "--certs", str(certs),
                        "--site-keys", str(certs / "sites"), "--address", f"127.0.0.1:{port}", "--wait-sites", "1",
                        "--site-rate", "5", "--site-burst", "20", "--max-request-mb", "4"], logs["server"])
        procs.append(server)
        wait_for(lambda: " submitted;" in logs["server"].read_text(), 180, "the run submitted", procs)
        text = logs["server"].read_text()
        node = {site: int(text.split(f"registered site {site} (node ")[1].split(")")[0]) for site in "AC"}
        run_id = int(text.split("cmvim-server: run ")[1].split()[0])

        signer = SiteKeyHeaders(certs / "sites" / "C.key")
        fleet = FleetHttpClient.from_server_address(f"127.0.0.1:{port}", False, str(certs / "ca.crt"), interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperNode"), signer])
        as_c = Node(node_id=node["C"])

        def push(dst: int, src: int, reply_to: str) -> httpx.Response | int:
            meta = Metadata(run_id=run_id, message_id="", src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                            group_id="", created_at=time.time(), ttl=10 * 365 * 24 * 3600.0, message_type="evaluate")
            msg = Message(content=RecordDict({"config": ConfigRecord({"phase": "evaluate"})}), metadata=meta)
            try:
                fleet.PushMessages(PushMessagesRequest(node=as_c, messages_list=[message_to_proto(msg)]))
                return 200
            except httpx.HTTPStatusError as err:
                return err.response

        # an instruction for A, ten-year TTL: refused before it is stored, with the reason
        answer = push(dst=node["A"], src=node["C"], reply_to="")
        assert answer != 200 and "accepts replies only" in answer.text, answer
        # a "reply" in A's name: refused
        answer = push(dst=0, src=node["A"], reply_to="a" * 64)
        assert answer != 200 and "only its own replies" in answer.text, answer

        # C's signed headers, once each: a fresh request goes through, the same headers again do not
        poll = lambda: fleet.PullMessages(PullMessagesRequest(node=as_c))  # noqa: E731
        time.sleep(5)                                        # a full bucket for what follows
        assert fleet_status(poll) == 200
        signer.replay = True
        assert fleet_status(poll) == 401
        signer.replay = False

        # over 5 requests/s (bursts of 20): 503, then served again after a pause
        statuses = [fleet_status(poll) for _ in range(40)]
        assert statuses[:15] == [200] * 15 and 503 in statuses, statuses
        assert set(statuses) == {200, 503}
        time.sleep(2)
        assert fleet_status(poll) == 200

        # an object over --max-request-mb (6 MB against 4; A's sealed tiny-model replies are ~2 MB): cut by the proxy
        big = PushObjectRequest(node=as_c, run_id=run_id, object_id="0" * 64, object_content=b"x" * 6_000_000)
        assert fleet_status(lambda: fleet.PushObject(big)) == 413
        fleet.close()

        server.wait(900)
        assert server.returncode == 0, logs["server"].read_text()[-4000:]
    finally:
        for proc in procs:
            stop(proc)
    superlink_log = (out / ".superlink" / "superlink.log").read_text()
    assert f"node {node['C']} is over 5 requests/s" in superlink_log and "replayed SuperNode header" in superlink_log
    # A took part in every round and was asked for nothing it did not run: no refusal, no failure
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(set(r["train"]) == {"A"} for r in metrics["rounds"]) and len(metrics["rounds"]) == 7
    assert not metrics.get("failures"), metrics.get("failures")
    site_a = logs["A"].read_text()
    for refusal in ("refused an instruction", "release limit", "site policy allows"):
        assert refusal not in site_a
    assert site_a.count("completed in") >= 7            # the worker's tasks: 6 pretraining rounds, fine-tuning, ...
