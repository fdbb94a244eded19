"""Where a deployed round's time goes: a real loopback deployment, round wall time vs site work.

Runs what docs/deploy.md describes, on 127.0.0.1 (the commands tests/test_deploy.py runs):
cmvim-certs, cmvim-server (a SuperLink with TLS and SuperNode authentication behind Caddy) and
three cmvim-client SuperNodes, on a small synthetic cohort (cached_cohort), for a few pretraining
and fine-tuning rounds, then prints

  per round    wall time (metrics.json "seconds"), the slowest site's work (the ClientApp's
               "cmvim: site X: ... done in S s": message receipt to reply, data load included),
               overhead = wall - slowest work, and where the round's time went along its critical
               path: the sites' side from the SuperNode logs (every line timestamped on arrival),
               the coordinator's from the SuperLink's log (its request lines, Flower's timestamps);
               everything runs with FLWR_LOG_LEVEL=DEBUG for that (Flower's ClientApp then also
               logs its FAB install and app loading)
  per message  the fixed costs measured separately, each in a fresh subprocess: interpreter start,
               importing torch / flwr / flwr-clientapp's own modules / cmvim.client.app (and which
               heavy packages that imports), SiteData.load warm and cold, building the model, the
               numba scan kernel's first call (compile vs cache load)

Before the last line, a table by kind of round (pretraining, the probe rounds, the other
fine-tuning rounds, all): the median round's overhead and the kind's overhead as a share of its
whole round time. The last line is `overhead: N% of round time` (N: the median round of all). A
deployment whose run fails (with its state in a SQLite file, as cmvim-server kept it until
2026-12-01, the SuperLink's database could stay locked under load and fail the run) is reported
with its cause and tried again (--attempts). Every process is started in its own session with a
marker in its environment, stopped by its PID (its process group when it does not stop), and
looked for afterwards: a survivor is reported and killed by PID. Results: docs/benchmarks/deploy.md.

    PYTHONPATH=. python benchmarks/deploy_overhead.py                       # tiny, 3 x 24 subjects, 32^3
    PYTHONPATH=. python benchmarks/deploy_overhead.py --preset small --shape 48   # quick.yaml's rounds

Run one at a time (it uses every core it can get; results are noisy on a busy machine).
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow ssl
import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from cmvim.flower_process import Child

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TAG_ENV = "CMVIM_DEPLOY_BENCH"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
FLOWER_TS = re.compile(r"(?:^|\] )(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")
DONE = re.compile(r"cmvim: site (\S+): (\S+) (train|evaluate) round (\d+) done in ([\d.]+) s")
WATCH = ("opacus", "sklearn", "matplotlib", "ray", "scipy", "pandas", "nilearn", "numba", "sympy", "grpc")
# Flower 1.42's fixed waits on a message's path (read from its source)
POLLS = [("SuperNode: pull from the SuperLink when idle", "flwr/supernode/start_client_internal.py", "3"),
         ("SuperExec: look for a new task (a ClientApp to start)", "flwr/supercore/superexec/run_superexec.py", "1"),
         ("SuperNode: look for the ClientApp's reply", "flwr/supernode/start_client_internal.py", "0.5"),
         ("ServerApp (Grid.send_and_receive): pull replies", "flwr/superlink/grid/http_grid.py", "3"),
         ("an object pulled before it was pushed: retry backoff (SuperNode, ClientApp, ServerApp)",
          "flwr/supercore/constant.py: PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP", "1, doubling to 10"),
         ("objects in flight per transfer (one HTTP request each)",
          "flwr/supercore/constant.py: FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS / _PUSHES", "min(2, cores)")]


# -- processes -----------------------------------------------------------------------------------
def base_env(tag: str, **extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    env[TAG_ENV] = tag
    return env


def start(cmd: list[str], log: Path, env: dict) -> Child:
    """A command in its own session (cmvim's supervisor of Flower's processes); every output line
    kept with its arrival time, and logged with it."""
    return Child(cmd, env=env, log_path=log, echo=False, cwd=REPO, stamped=True)


def stop(child: Child) -> None:
    """SIGTERM to its PID (cmvim-client and cmvim-server stop their own children), then its group."""
    child.stop(grace=40, leader_first=True)


def tagged(tag: str) -> list[tuple[int, str]]:
    """Processes of this user whose environment carries this run's marker (ours and their children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if f"{TAG_ENV}={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]))
        except OSError:
            continue
    return found


def reap(tag: str) -> list[str]:
    """Survivors of the deployment, each stopped by its PID; what was found."""
    left = tagged(tag)
    for pid, _ in left:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
                time.sleep(1)
            except ProcessLookupError:
                break
    return [f"{pid} {cmd}" for pid, cmd in left]


# -- micro-measurements, each in a fresh interpreter --------------------------------------------
def timed_python(code: str, env: dict, repeat: int) -> float:
    """Median wall seconds of `python -c code` in a fresh process."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_profile(code: str, env: dict) -> tuple[dict[str, float], int]:
    """`python -X importtime`: self time summed per top-level package (seconds), modules imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, check=True)
    per: dict[str, float] = {}
    count = 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cum, name = [p.strip() for p in line[len("import time:"):].split("|")]
        count += 1
        top = name.split(".")[0]
        per[top] = per.get(top, 0.0) + int(self_us) / 1e6
    return per, count


SITE_WORK = r"""
import json, sys, time
t = time.perf_counter(); import cmvim.client.app as app; t_import = time.perf_counter() - t
from cmvim.data import SiteData
from cmvim.run_config import run_config
from cmvim.weights import build_model
cfg = run_config(sys.argv[1])
def load(site):
    t = time.perf_counter()
    SiteData.for_run(site, cfg)
    return time.perf_counter() - t
import torch; torch.set_num_threads(max(1, cfg.threads_per_site))
first = {s: load(s) for s in sys.argv[3:]}            # warms every site's cache for the deployment
cold = load(sys.argv[2])                              # a copy of site A without its cache
warm = sorted(load(sys.argv[3]) for _ in range(3))[1]
before = set(sys.modules)
t = time.perf_counter(); task = app.load_task(cfg, "A", __import__("pathlib").Path(sys.argv[3])); t_task = time.perf_counter() - t
t = time.perf_counter(); build_model(cfg, "pretrain"); t_model = time.perf_counter() - t
t = time.perf_counter(); build_model(cfg, "finetune"); t_model_ft = time.perf_counter() - t
heavy = sorted({m.split(".")[0] for m in set(sys.modules) - before})
modules = sorted({m.split(".")[0] for m in sys.modules})
from flwr.app import ArrayRecord
from cmvim.flower_internals import get_all_nested_objects
from cmvim.weights import initial_state
pre = initial_state(cfg, "pretrain"); fine = initial_state(cfg, "finetune", pre)
def count(state):        # identical tensors (fresh zeros, ones) share an object; trained ones rarely do
    return len(get_all_nested_objects(ArrayRecord(state)))
def trained(state):
    return {k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
objects = {ph: (len(x), count(x), count(trained(x)), sum(v.numel() * v.element_size() for v in x.values()) / 1e6)
           for ph, x in (("pretrain", pre), ("finetune", fine))}
print(json.dumps({"objects": objects, "import_app": t_import, "first": first, "cold": cold, "warm": warm, "load_task": t_task,
                  "model_pretrain": t_model, "model_finetune": t_model_ft, "new_modules": heavy,
                  "modules": modules}))
"""

KERNEL = r"""
import json, time
t = time.perf_counter()
import torch
from cmvim.ssm import selective_scan
t_import = time.perf_counter() - t
torch.manual_seed(0); torch.set_num_threads(1)
def call():
    b, d, n, L = 4, 128, 16, 64
    u, dl, z = (torch.randn(b, d, L, requires_grad=True) for _ in range(3))
    A = (-torch.rand(d, n)).requires_grad_(); B, C = (torch.randn(b, n, L, requires_grad=True) for _ in range(2))
    D, bias = torch.randn(d, requires_grad=True), torch.randn(d, requires_grad=True)
    t = time.perf_counter()
    selective_scan(u, dl, A, B, C, D, z, bias, True, backend="cpu").sum().backward()
    return time.perf_counter() - t
first = call(); second = call()
print(json.dumps({"import": t_import, "first": first, "second": second}))
"""


def micro(cfg_path: Path, site_dirs: dict[str, Path], work: Path, env: dict, repeat: int, compile_: bool) -> dict:
    out: dict = {}
    say("micro-measurements (fresh interpreter each) ...")
    out["python"] = timed_python("pass", env, repeat)
    out["torch"] = timed_python("import torch", env, repeat)
    out["flwr"] = timed_python("import flwr", env, repeat)
    guard = ("from cmvim.client.approved_app import main; from flwr.supernode.cli.flwr_clientapp import "
             "flwr_clientapp; from flwr.supernode.runtime import run_clientapp")
    out["clientapp_proc"] = timed_python(guard, env, repeat)
    out["client_app"] = timed_python("import cmvim.client.app", env, repeat)
    out["profile"], out["profile_modules"] = import_profile(f"{guard}; import cmvim.client.app", env)
    # SiteData.load: a cold copy of site A, then warm (this also warms every site for the deployment)
    cold = work / "cold-site-A"
    shutil.copytree(site_dirs["A"], cold, ignore=shutil.ignore_patterns(".cmvim_cache", ".cmvim_privacy"))
    proc = subprocess.run([sys.executable, "-c", SITE_WORK, str(cfg_path), str(cold), *map(str, site_dirs.values())],
                          env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"site-work measurement failed:\n{proc.stderr[-3000:]}")
    out["site"] = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(cold, ignore_errors=True)
    # the scan kernel: a fresh numba cache (compile), the same cache again (load), the default cache
    kernel = {}
    runs = ([("compile", {"NUMBA_CACHE_DIR": str(work / "numba")}), ("cache load", {"NUMBA_CACHE_DIR": str(work / "numba")})]
            if compile_ else [])
    runs.append(("default cache (what sites use)", {}))
    for label, extra in runs:
        proc = subprocess.run([sys.executable, "-c", KERNEL], env=dict(env, **extra), cwd=REPO, capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"kernel measurement failed:\n{proc.stderr[-3000:]}")
        kernel[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["kernel"] = kernel
    return out


# -- the deployment ------------------------------------------------------------------------------
def run_yaml(path: Path, args) -> dict:
    if args.preset == "small":           # the default run's round (simulations/configs/quick.yaml)
        quick = yaml.safe_load((REPO / "simulations" / "configs" / "quick.yaml").read_text())
        cfg = {k: quick[k] for k in ("seed", "model", "preprocess", "split_fractions", "pretrain", "finetune",
                                     "finetune_init", "evaluation", "modality_dropout", "personalize", "use_reports",
                                     "threads_per_site") if k in quick}
        cfg["preprocess"] = dict(cfg["preprocess"], shape=args.shape)
    else:                                # tests/test_deploy.py's run
        cfg = {"seed": 0, "model": {"preset": "tiny"}, "preprocess": {"shape": args.shape, "voxel_size": 6.25},
               "split_fractions": [0.6, 0.0, 0.4], "modality_dropout": 0.0,
               "pretrain": {"local_epochs": 1, "batch_size": 6},
               "finetune": {"local_epochs": 1, "batch_size": 4, "lr": 0.002},
               "evaluation": {"bootstrap": 100, "every_round": False}}
    cfg["pretrain"] = dict(cfg["pretrain"], rounds=args.pretrain_rounds)
    cfg["finetune"] = dict(cfg["finetune"], rounds=args.finetune_rounds)
    if "probe_rounds" in cfg["finetune"]:      # LP-FT: half the rounds (at most quick.yaml's) fit the head first
        cfg["finetune"]["probe_rounds"] = min(cfg["finetune"]["probe_rounds"], args.finetune_rounds // 2)
    cfg["strategy"] = {"min_nodes": 3, "round_timeout": 600}
    cfg["checkpoints"] = {"keep_last": None}          # every round's checkpoint: its mtime is the round's end
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


class RunFailed(Exception):
    """The deployment's run did not complete; the message says why (and where the logs are)."""


def deploy(cohort: Path, cfg_path: Path, work: Path, tag: str, timeout: float, server_debug: bool,
           cold: bool = False) -> tuple[dict, float]:
    work.mkdir(parents=True, exist_ok=True)
    certs, out = work / "certs", work / "results"
    subprocess.run([sys.executable, "-m", "cmvim.deploy.certs", "--out", str(certs), "--server-name", "localhost",
                    "--sites", "A", "B", "C"], cwd=REPO, check=True, capture_output=True, env=base_env(tag))
    from cmvim.cli_util import free_port
    port = free_port()
    procs: dict[str, Child] = {}
    say(f"deployment: cmvim-server + 3 x cmvim-client on 127.0.0.1:{port} (logs in {work}) ...")
    debug = {"FLWR_LOG_LEVEL": "DEBUG"}      # Flower's timestamps, and its per-request lines (SuperLink, SuperNode)
    link_log = out / ".superlink" / "superlink.log"
    t0 = time.time()
    try:
        procs["server"] = start([str(BIN / "cmvim-server"), "--config", str(cfg_path), "--out", str(out),
                                 "--certs", str(certs), "--site-keys", str(certs / "sites"),
                                 "--address", f"127.0.0.1:{port}", "--wait-sites", "3"],
                                work / "server.log", base_env(tag, **(debug if server_debug else {})))
        server = procs["server"]
        deadline = time.time() + 180
        while server.seen("sites online: 0/3") is None:       # keys registered: sites get in at once
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("cmvim-server did not come up:\n" + "\n".join(server.lines[-30:]))
            time.sleep(0.5)
        for site in "ABC":
            procs[site] = start([str(BIN / "cmvim-client"), "--site", site, "--data", str(cohort / site),
                                 "--server", f"127.0.0.1:{port}", "--root-cert", str(certs / "ca.crt"),
                                 "--auth-key", str(certs / "sites" / f"{site}.key"),
                                 "--coordinator-key", str(certs / "coordinator.pub"),
                                 "--state-dir", str(work / f"node-{site}"), *(["--cold"] if cold else [])],
                                work / f"{site}.log", base_env(tag, **debug))
        deadline = time.time() + 240
        while server.seen("sites online: 3/3") is None:
            if server.poll() is not None:
                break
            if time.time() > deadline:
                proxy = out / ".superlink" / "proxy.log"
                errors = [x for x in (proxy.read_text(errors="replace").splitlines() if proxy.exists() else [])
                          if '"level":"error"' in x]
                raise RunFailed("the sites were not online within 240 s" +
                                (f"; Caddy: {errors[-1][-200:]}" if errors else "") + f"; logs in {work}")
            time.sleep(1)
        try:
            code = server.wait(max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            raise RunFailed(f"the run did not finish within {timeout:.0f} s (--timeout); logs in {work}") from None
        if code != 0:
            text = link_log.read_text(errors="replace") if link_log.exists() else ""
            locked = re.findall(r"\[(/v1/[\w/-]+)\]\[UnexpectedError:OperationalError\] \(sqlite3.OperationalError\) "
                                r"database is locked", text)
            why = (f"; the SuperLink's SQLite database was locked {len(locked)} time(s) "
                   f"({', '.join(sorted(set(locked)))}: HTTP 500)" if locked else "")
            raise RunFailed(f"cmvim-server exited {code}{why}; logs in {work}:\n" +
                            "\n".join(server.lines[-6:]))
    finally:
        for child in procs.values():
            stop(child)
    total = time.time() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    events = {"server start": t0, "SuperLink and Caddy up, site keys registered": server.seen("sites online: 0/3"),
              "3 sites online": server.seen("sites online: 3/3"),
              "run submitted": server.seen("submitted; results will be in")}
    ckpts = {p.name: p.stat().st_mtime for p in (out / "checkpoints").glob("*.pt")}
    link = link_log.read_text(errors="replace").splitlines() if link_log.exists() else []
    return {"metrics": metrics, "events": events, "ckpts": ckpts, "link": superlink_events(link),
            "sites": {s: [(t, ANSI.sub("", line)) for t, line in procs[s].history] for s in "ABC"}}, total


def flower_time(line: str) -> float | None:
    match = FLOWER_TS.search(line)
    if not match:
        return None
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1e3


LINK_EVENTS = {"push": "Runtime.PushMessages", "push_object": "Runtime.PushObject", "pull_object": "Runtime.PullObject",
               "fleet_pull_object": "[Fleet.PullObject]", "fleet_push_object": "[Fleet.PushObject]"}


def superlink_events(lines: list[str]) -> dict[str, list[float]]:
    """The SuperLink's DEBUG lines by kind, as times: the ServerApp's Runtime API calls (push the
    round's messages and their objects, pull the replies' objects) and the sites' Fleet API calls."""
    out: dict[str, list[float]] = {k: [] for k in LINK_EVENTS}
    for line in lines:
        line = ANSI.sub("", line)
        for key, text in LINK_EVENTS.items():
            if text in line:
                t = flower_time(line)
                if t is not None:
                    out[key].append(t)
                break
    return out


MARKERS = [("receiving", re.compile(r"Receiving: (\w+) message")), ("received", re.compile(r"Received successfully")),
           ("process", re.compile(r"Start `flwr-clientapp` process")),
           ("confirm", re.compile(r"Runtime\.ConfirmMessageReceived")),
           ("fab", re.compile(r"\[flwr-clientapp\] Start FAB installation")),
           ("fab_done", re.compile(r"\[flwr-clientapp\] (Runtime dependency installation is disabled|Installing app)")),
           ("loading", re.compile(r"\[flwr-clientapp\] Start `ClientApp` Loading")),
           ("sending", re.compile(r"Sending: \w+ message")), ("sent", re.compile(r"Sent successfully"))]


def messages(lines: list[tuple[float, str]]) -> tuple[list[dict], list[float]]:
    """One site's messages, in order (a SuperNode handles one at a time): each marker's arrival
    time, the work line's phase/round/S; and how far arrival trails Flower's own timestamp."""
    out, current, lags = [], None, []
    for t, line in lines:
        flower = flower_time(line)
        if flower is not None:
            lags.append(t - flower)
        for key, pattern in MARKERS:
            found = pattern.search(line)
            if found:
                if key == "receiving":
                    current = {"type": found.group(1)}
                    out.append(current)
                if current is not None and key not in current:
                    current[key] = t
        done = DONE.search(line)
        if done and current is not None:
            current.update(phase=done.group(2), kind=done.group(3), round=int(done.group(4)),
                           work=float(done.group(5)), done=t)
    return [m for m in out if "work" in m and "sent" in m], lags


def span(m: dict, a: str, b: str) -> float | None:
    return m[b] - m[a] if a in m and b in m else None


# per message, at the site (its SuperNode log); "hidden" ones overlap the download
SITE_SEGMENTS = [("download: the SuperNode pulls the message's objects from the SuperLink", "receiving", "received"),
                 ("(hidden) ClientApp process up: SuperExec's 1 s poll, spawn, interpreter, flwr imports",
                  "receiving", "process"),
                 ("ClientApp gets the message from its SuperNode (pull backoff 1-10 s while the download ran)",
                  "ready", "confirm"),
                 ("FAB install", "fab", "fab_done"),
                 ("load the ClientApp: import cmvim.client.app (torch, ...)", "fab_done", "start"),
                 ("site work (`done in S s`: policy, data load, model, kernel, train/eval)", "start", "done"),
                 ("reply to the SuperNode, ClientApp exits", "done", "sending"),
                 ("upload: the SuperNode pushes the reply's objects to the SuperLink", "sending", "sent")]
# on a round's critical path: consecutive points, each segment named by the point it ends at
PATH = [("push", "ServerApp: configure the round, push the messages (after collecting the previous replies)"),
        ("receiving", "SuperNode picks the message up (its idle poll: 3 s, and the request)"),
        ("uploaded", "ServerApp still uploading the message's objects (the SuperNode backs off 1-10 s)"),
        ("received", "SuperNode downloads the rest (an HTTPS request per object, through Caddy)"),
        ("ready", "ClientApp process start not hidden by the download"),
        ("confirm", "ClientApp gets the message from its SuperNode (its pull backoff)"),
        ("start", "FAB install + import cmvim.client.app"),
        ("done", "site work (`done in S s`)"),
        ("sending", "reply to the SuperNode, ClientApp exits"),
        ("sent", "SuperNode uploads the reply's objects"),
        ("pulled", "ServerApp downloads the replies (its 3 s poll, a request per object, backoff; a failed one: "
                   "until it gives up)"),
        ("end", "ServerApp aggregates, checkpoints")]


GROUPS = [("moving the weights: one HTTPS request per object, and backoff waits for objects not there yet",
           ("uploaded", "received", "confirm", "sent", "pulled")),
          ("ClientApp start and exit (not hidden by the download): FAB install, imports, reply",
           ("ready", "start", "sending")),
          ("site work (`done in S s`: data load, model, scan kernel load, training)", ("done",)),
          ("SuperNode's poll for the message", ("receiving",)),
          ("ServerApp: configure, aggregate, checkpoint", ("push", "end"))]


def analyse(run: dict) -> dict:
    msgs, lags = [], []
    for site, lines in run["sites"].items():
        site_msgs, site_lags = messages(lines)
        lags += site_lags
        for m in site_msgs:
            m["site"], m["start"] = site, m["done"] - m["work"]
            m["ready"] = max(m["received"], m.get("process", m["received"]))
        msgs += site_msgs
    link = run["link"]
    rounds = []
    for entry in run["metrics"]["rounds"]:
        phase, r, wall = entry["phase"], entry["round"], entry["seconds"]
        end = run["ckpts"].get(f"{phase}_round{r:03d}.pt")
        rounds.append(round_row(f"{phase} {r}", wall, end, [m for m in msgs if (m["phase"], m["round"]) == (phase, r)],
                                link))
        rounds[-1]["sites"] = len(entry.get("train", {}))
    final = [m for m in msgs if m["kind"] == "evaluate" and m["round"] == 0]
    last_ft = max((v for k, v in run["ckpts"].items() if k.startswith("finetune_round")), default=None)
    evaluate = run["ckpts"].get("evaluate_round000.pt")
    final_row = (round_row("final evaluation", evaluate - last_ft, evaluate, final, link, start=last_ft)
                 if final and evaluate and last_ft else None)
    if final_row:
        final_row["sites"] = len(run["metrics"].get("sites", {}))
    return {"msgs": msgs, "rounds": rounds, "final": final_row, "lags": lags}


def last_in(times: list[float], lo: float, hi: float) -> float | None:
    inside = [t for t in times if lo <= t <= hi]
    return max(inside) if inside else None


def round_row(name: str, wall: float | None, end: float | None, mine: list[dict], link: dict,
              start: float | None = None) -> dict:
    kinds = [k for k in ("train", "evaluate") if any(m["kind"] == k for m in mine)]
    work = sum(max(m["work"] for m in mine if m["kind"] == k) for k in kinds) if kinds else None
    row = {"name": name, "wall": wall, "work": work, "msgs": len(mine), "path": {}, "requests": {}}
    if wall is None or end is None or not kinds:
        return row
    previous = end - wall if start is None else start
    row["requests"] = {key: sum(1 for t in link.get(key, []) if previous <= t <= end)
                       for key in ("fleet_pull_object", "fleet_push_object", "push_object", "pull_object")}
    path: dict[str, float] = {}
    for i, kind in enumerate(kinds):
        crit = max((m for m in mine if m["kind"] == kind), key=lambda m: m["sent"])
        first = min(m["receiving"] for m in mine if m["kind"] == kind)
        points = dict(crit)
        points["push"] = last_in(link.get("push", []), previous - 5.0, first)     # the end is the checkpoint's mtime
        points["uploaded"] = last_in(link.get("push_object", []), previous, crit["received"])
        last = i == len(kinds) - 1
        after = max(m["sent"] for m in mine if m["kind"] == kind)
        upto = end if last else min(m["receiving"] for m in mine if m["kind"] == kinds[i + 1])
        points["pulled"] = last_in(link.get("pull_object", []), after, upto)
        points["end"] = end if last else None
        at = previous
        for key, label in PATH:
            if key in ("pulled", "end") and not last:
                continue
            t = points.get(key)
            if t is None:
                continue
            t = max(t, at)
            path[label] = path.get(label, 0.0) + (t - at)
            at = t
        previous = at
    row["path"] = path
    return row


# -- report --------------------------------------------------------------------------------------
def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(args, cfg: dict, micro_: dict | None, run: dict, result: dict, total: float, runtime: float,
           leftovers: list[str], failures: list[str]) -> None:
    say("")
    say("```text")
    say(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end "
        f"(other jobs running: the numbers are noisy); python {platform.python_version()}")
    say(f"cohort: 3 sites x {args.subjects} subjects at {args.shape}^3; model {args.preset}; pretrain "
        f"{args.pretrain_rounds} round(s) x {cfg['pretrain'].get('local_epochs')} epoch(s), batch "
        f"{cfg['pretrain'].get('batch_size')}; finetune {args.finetune_rounds} x {cfg['finetune'].get('local_epochs')} "
        f"epoch(s), batch {cfg['finetune'].get('batch_size')}; validation every round: "
        f"{cfg['evaluation'].get('every_round', True)}")
    say("sites: " + ("cmvim-client --cold (a process per message, Flower's default)" if args.cold else
                     "cmvim-client's warm site worker (one process per site, data and imports kept)"))
    say(f"deployment {total:.0f} s (cmvim-server start to every process stopped); whole benchmark {runtime:.0f} s")
    for i, failure in enumerate(failures, 1):
        say(f"attempt {i} failed: {failure}")
    say("```")
    say("")
    say("Per round (wall: metrics.json `seconds`; work: the slowest site's `done in S s`, summed over the "
        "round's message kinds):")
    say("")
    say("| round | sites answered | messages | wall s | slowest site's work s | overhead s | overhead % |")
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = result["rounds"] + ([result["final"]] if result["final"] else [])
    for row in rows:
        over = row["wall"] - row["work"] if row["wall"] is not None and row["work"] is not None else None
        label = row["name"] + (" (not a round)" if row["name"] == "final evaluation" else "")
        say(f"| {label} | {row.get('sites', '-')}/3 | {row['msgs']} | {fmt(row['wall'], 1)} | {fmt(row['work'], 1)} | {fmt(over, 1)} | "
            f"{pct(over, row['wall']) if over is not None else '-'} |")
    left = run["metrics"].get("failures") or []
    for f in left:
        say(f"- left out: {f.get('phase', '')} round {f.get('round', '')}, site {f.get('site')} ({f.get('stage')}): "
            f"{str(f.get('reason'))[:200]}")
    say("")
    say("Each round's wall time along its critical path (the site whose reply reached the SuperLink last; "
        "seconds; site times from the SuperNode log lines, server times from the SuperLink's DEBUG lines):")
    say("")
    say("| segment | " + " | ".join(row["name"] for row in rows) + " |")
    say("| --- |" + " ---: |" * len(rows))
    for _, label in PATH:
        if any(label in row["path"] for row in rows):
            say(f"| {label} | " + " | ".join(fmt(row["path"].get(label), 1) for row in rows) + " |")
    say("| **sum (= wall)** | " + " | ".join(fmt(sum(row["path"].values()) if row["path"] else None, 1)
                                            for row in rows) + " |")
    names = {"fleet_pull_object": "sites pull", "fleet_push_object": "sites push",
             "push_object": "ServerApp pushes", "pull_object": "ServerApp pulls"}
    say("| object requests the SuperLink served: " + " / ".join(names.values()) + " | " +
        " | ".join(" / ".join(str(row["requests"].get(k, "-")) for k in names) for row in rows) + " |")
    say("")
    say("The same, grouped, over all rounds (not the final evaluation):")
    say("")
    say("| where | s | % of round time |")
    say("| --- | ---: | ---: |")
    walls = sum(r["wall"] for r in result["rounds"] if r["path"])
    for group, keys in GROUPS:
        labels = {label for key, label in PATH if key in keys}
        seconds = sum(v for r in result["rounds"] for k, v in r["path"].items() if k in labels)
        say(f"| {group} | {seconds:.1f} | {pct(seconds, walls)} |")
    say(f"| **all rounds** | {walls:.1f} | 100% |")
    msgs = result["msgs"]
    say("")
    say(f"Per message at the site, all {len(msgs)} messages (seconds):")
    say("")
    say("| segment | median | min | max |")
    say("| --- | ---: | ---: | ---: |")
    for label, a, b in SITE_SEGMENTS:
        values = [span(m, a, b) for m in msgs if span(m, a, b) is not None]
        if values:
            say(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    overhead = [(m["sent"] - m["receiving"]) - m["work"] for m in msgs]
    say(f"| **message receipt to reply sent, minus site work** | {statistics.median(overhead):.2f} | "
        f"{min(overhead):.2f} | {max(overhead):.2f} |")
    firsts = [min((m for m in msgs if m["site"] == s), key=lambda m: m["receiving"]) for s in sorted({m["site"] for m in msgs})]
    say("")
    say(f"(a site's first message also fetches the run and the FAB: download {', '.join(fmt(span(m, 'receiving', 'received'), 1) for m in firsts)} s; "
        f"log lines reach this script a median {1000 * (med(result['lags']) or 0):.0f} ms after Flower's own timestamp)")
    events = run["events"]
    say("")
    say("Once per deployment (seconds since `cmvim-server` started):")
    say("")
    say("| event | t s |")
    say("| --- | ---: |")
    for name, t in events.items():
        if t is not None:
            say(f"| {name} | {t - events['server start']:.1f} |")
    pushes = run["link"].get("push", [])
    if pushes:
        say(f"| ServerApp pushes round 1's messages (its process started, imports, initial model) | "
            f"{pushes[0] - events['server start']:.1f} |")
    say(f"| a site receives its first message | {min(m['receiving'] for m in msgs) - events['server start']:.1f} |")
    end_first = run["ckpts"].get("pretrain_round001.pt")
    if end_first:
        say(f"| pretrain round 1 done | {end_first - events['server start']:.1f} |")
    if micro_:
        report_micro(micro_)
    say("")
    say("Flower 1.42's fixed polls and backoffs on a message's path (its source):")
    say("")
    say("| wait | file | s |")
    say("| --- | --- | ---: |")
    for what, where, seconds in POLLS:
        say(f"| {what} | `{where}` | {seconds} |")
    if leftovers:
        say("")
        say("PROCESSES LEFT BEHIND (killed by PID now): " + "; ".join(leftovers))
    say("")
    say("By kind of round (overhead = wall - the slowest site's work; per round, and of the kind's whole "
        "round time):")
    say("")
    for line in phase_table(result["rounds"], int(cfg["finetune"].get("probe_rounds") or 0)):
        say(line)
    say("")
    say(f"overhead: {statistics.median(overhead_shares(measured(result['rounds']))):.0f}% of round time")


def phase_table(rounds: list[dict], probe_rounds: int) -> list[str]:
    """The by-kind table's lines: per kind of round, the median (and range) of the rounds' overhead
    shares, and the kind's overhead as a share of its whole round time."""
    lines = ["| rounds | n | overhead % per round: median (min-max) | wall s | overhead s | overhead % of their time |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, rows in phase_groups(rounds, probe_rounds):
        shares = overhead_shares(rows)
        wall, work = sum(r["wall"] for r in rows), sum(r["work"] for r in rows)
        lines.append(f"| {label} | {len(rows)} | {statistics.median(shares):.0f} % ({min(shares):.0f}-{max(shares):.0f} %) "
                     f"| {wall:.1f} | {wall - work:.1f} | {pct(wall - work, wall)} |")
    return lines


def measured(rounds: list[dict]) -> list[dict]:
    """The rounds with both a wall time and the sites' work."""
    return [r for r in rounds if r["wall"] and r["work"] is not None]


def overhead_shares(rows: list[dict]) -> list[float]:
    """Each round's overhead (wall - the slowest site's work) as a percentage of its wall time."""
    return [100 * (r["wall"] - r["work"]) / r["wall"] for r in rows]


def phase_groups(rounds: list[dict], probe_rounds: int) -> list[tuple[str, list[dict]]]:
    """The measured rounds by kind: pretraining, the probe rounds (the head alone), the other
    fine-tuning rounds, and all of them; a kind with no measured round is left out."""
    done = measured(rounds)

    def kind(row: dict) -> str:
        phase, number = row["name"].rsplit(" ", 1)
        if phase != "finetune":
            return phase
        return "finetune (probe)" if int(number) <= probe_rounds else "finetune"
    groups = [(label, [r for r in done if kind(r) == key]) for label, key in (
        ("pretraining", "pretrain"), ("fine-tuning, probe rounds (the head alone)", "finetune (probe)"),
        ("fine-tuning, the other rounds", "finetune"))]
    return [g for g in groups if g[1]] + ([("all rounds", done)] if done else [])


def report_micro(m: dict) -> None:
    site, kernel = m["site"], m["kernel"]
    say("")
    say(f"Per-message fixed costs measured alone (a fresh interpreter each, median of {m['repeat']}; wall seconds, "
        "interpreter start included; nothing else running in the benchmark meanwhile):")
    say("")
    say("| cost | s |")
    say("| --- | ---: |")
    say(f"| interpreter start (`python -c pass`) | {m['python']:.2f} |")
    say(f"| `import torch` | {m['torch']:.2f} |")
    say(f"| `import flwr` | {m['flwr']:.2f} |")
    say(f"| flwr-clientapp's own imports (cmvim's guard, Flower's ClientApp runtime) | {m['clientapp_proc']:.2f} |")
    say(f"| `import cmvim.client.app` | {m['client_app']:.2f} |")
    say(f"| SiteData.load of site A, warm cache (in-process, what every round does) | {site['warm']:.3f} |")
    say(f"| SiteData.load of site A, cold (first pass: decode, preprocess, write the cache) | {site['cold']:.2f} |")
    say(f"| load_task (SiteData.load warm + SiteTask) | {site['load_task']:.3f} |")
    say(f"| build the model: pretrain / finetune (in-process) | {site['model_pretrain']:.3f} / "
        f"{site['model_finetune']:.3f} |")
    for label, k in kernel.items():
        say(f"| scan kernel (numba, backend cpu), first forward+backward, {label} | {k['first']:.2f} |")
    say(f"| scan kernel, a later call (same shapes) | {med(k['second'] for k in kernel.values()):.3f} |")
    for phase, (arrays, initial, trained, mb) in site["objects"].items():
        say(f"| a {phase} message's weights: tensors / Flower objects, one HTTP request each (initial weights; "
            f"trained) / MB | {arrays} / {initial}; {trained} / {mb:.2f} |")
    prof = sorted(m["profile"].items(), key=lambda kv: -kv[1])
    total = sum(m["profile"].values())
    say("")
    say(f"`python -X importtime` of a ClientApp process's imports (guard, Flower's runtime, cmvim.client.app): "
        f"{m['profile_modules']} modules, {total:.2f} s import self time; by top-level package:")
    say("")
    say("| package | s | share |")
    say("| --- | ---: | ---: |")
    for name, seconds in prof[:10]:
        say(f"| {name} | {seconds:.2f} | {pct(seconds, total)} |")
    imported, later = set(m["profile"]), set(site["modules"])
    say("")
    say("Imported on that path: " + ", ".join(
        f"{p} {'yes' if p in imported else ('only once load_task ran' if p in later else 'no')}" for p in WATCH)
        + f"; new top-level packages once load_task and the models ran: {', '.join(site['new_modules']) or 'none'}.")


def say(text: str) -> None:
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "small"), default="tiny",
                        help="tiny: tests/test_deploy.py's run; small: quick.yaml's model and round (use --shape 48)")
    parser.add_argument("--shape", type=int, default=None, help="volume side (default 32 tiny, 48 small)")
    parser.add_argument("--subjects", type=int, default=24, help="per site (3 sites)")
    parser.add_argument("--pretrain-rounds", type=int, default=2)
    parser.add_argument("--finetune-rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="repeats of each import timing")
    parser.add_argument("--no-micro", action="store_true", help="only the deployment")
    parser.add_argument("--no-compile", action="store_true", help="skip the scan kernel's cold compile (~20 s+)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on the run after S s")
    parser.add_argument("--attempts", type=int, default=2, help="deployments to try when one fails (default 2)")
    parser.add_argument("--no-server-debug", action="store_true",
                        help="no FLWR_LOG_LEVEL=DEBUG for the coordinator (its side of the breakdown is then lost)")
    parser.add_argument("--cold", action="store_true",
                        help="the sites run every message in a fresh process (cmvim-client --cold): the 'before'. "
                             "Since issue #30 cmvim-client allows --cold only with --insecure, so this mode no longer "
                             "starts a TLS deployment; docs/benchmarks/deploy.md keeps the numbers it measured")
    parser.add_argument("--keep", type=Path, help="keep the logs and results here (default: a temporary folder)")
    args = parser.parse_args()
    if args.cold:
        parser.error("--cold: cmvim-client runs Flower's process per message only with --insecure since issue #30 "
                     "(its Runtime API has no authentication); docs/benchmarks/deploy.md keeps the measured 'before'")
    args.shape = args.shape or (48 if args.preset == "small" else 32)
    started = time.time()
    from cmvim.simulations.cohort import CohortConfig, cached_cohort
    t = time.perf_counter()
    cohort = cached_cohort(CohortConfig(sites=3, subjects=args.subjects, shape=args.shape, seed=3, effect_scale=5.0,
                                        pet_missing=0.0))
    say(f"cohort {cohort} ({time.perf_counter() - t:.1f} s)")
    work = Path(tempfile.mkdtemp(prefix="cmvim-deploy-bench-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex
    cfg_path = work / "run.yaml"
    cfg = run_yaml(cfg_path, args)
    env = base_env(tag)
    leftovers: list[str] = []
    failures: list[str] = []
    try:
        micro_ = None
        if not args.no_micro:
            micro_ = micro(cfg_path, {s: cohort / s for s in "ABC"}, work, env, args.repeat, not args.no_compile)
            micro_["repeat"] = args.repeat
        for attempt in range(1, args.attempts + 1):
            try:
                run, total = deploy(cohort, cfg_path, work / f"attempt-{attempt}", tag, args.timeout,
                                    not args.no_server_debug, args.cold)
                break
            except RunFailed as err:
                failures.append(str(err).splitlines()[0])
                say(f"attempt {attempt}: {err}")
                time.sleep(2)
                leftovers += reap(tag)
        else:
            raise SystemExit(f"no attempt completed ({args.attempts}); logs in {work}")
    finally:
        time.sleep(2)
        leftovers += reap(tag)
    result = analyse(run)
    report(args, cfg, micro_, run, result, total, time.time() - started, leftovers, failures)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
