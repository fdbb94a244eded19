"""`cmvim-client --site A --data DIR --server HOST:PORT ...`: join a federation as a Flower SuperNode.

Before anything connects: the site check runs on DIR (fatal problems: refuse to start), the
site policy is read (a mistyped key is an error that names it), the CA certificate, the
SuperNode key and the coordinator's public key (--coordinator-key: only instructions it signed
run, cmvim.instructions) are parsed, so a wrong file is named here rather than as a TLS error
later, and the state folder must be the site user's alone (private_folder).

Then a Flower SuperNode runs with node config `site`, `data-dir` and `policy` (the ClientApp
checks every request against the policy before reading data), in Flower's process isolation, and
the warm site worker (cmvim.client.worker) runs its messages in one long-lived process, started
again if it dies (`--cold`, with --insecure only: Flower's process per message). Flower's SuperNode retries with
backoff while the server is away; if it exits for any other transient reason it is started again
with backoff (2 s doubling to 60 s). A certificate the CA does not vouch for, or a key the
server has not registered (after --auth-retries tries: the coordinator may be registering it
right now), stops it with a message saying what to fix.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import stat
import sys
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from cmvim.cli_util import free_port
from cmvim.config import ConfigError
from cmvim.flower_process import Child, flower_env, flower_executable

from .approved_app import POLICY_ENV
from .check import manifest_ready
from .policy import load_policy
from .supernode import POLL_ENV

UNREGISTERED = 4
AUTH_RETRY_SECONDS = 10.0
# (text in the SuperNode's output, what it means for a hospital, exit status)
FATAL = [
    ("CERTIFICATE_VERIFY_FAILED", "the server's TLS certificate is not signed by the CA in --root-cert "
                                  "(wrong CA file, or the wrong server)", 3),
    ("Hostname mismatch", "the server's TLS certificate does not name the host in --server "
                          "(connect with the name the certificate was made for)", 3),
    ("IP address mismatch", "the server's TLS certificate does not name the address in --server "
                            "(connect with the name the certificate was made for)", 3),
    ("[code: 2004]", "the server refused this site's key: either it is not registered (send <site>.pub to "
                     "the coordinator; check --auth-key is this site's key) or a SuperNode with this key is "
                     "still connected (a restarted site is let in once the server notices the old one is "
                     "gone, about a minute)", UNREGISTERED),
    ("Unable to parse the private key", "the SuperNode key file cannot be read (--auth-key)", 4),
]


class JoinError(Exception):
    """A problem a hospital fixes before joining; the message says what and where."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site", required=True, help="this site's name, as the coordinator knows it (e.g. A)")
    parser.add_argument("--data", required=True, type=Path, help="the site folder (manifest.csv or a BIDS dataset)")
    parser.add_argument("--server", required=True, help="the SuperLink's address, HOST:PORT")
    parser.add_argument("--root-cert", type=Path, help="the federation's CA certificate (ca.crt)")
    parser.add_argument("--auth-key", type=Path, help="this site's SuperNode private key (<site>.key)")
    parser.add_argument("--coordinator-key", type=Path,
                        help="the coordinator's public key (coordinator.pub, received with ca.crt): the site runs "
                             "only instructions it signed")
    parser.add_argument("--policy", type=Path, help="the site policy YAML (default: every phase allowed, "
                                                    "at most 10 local epochs, batch size 64)")
    parser.add_argument("--state-dir", type=Path, help="Flower's working folder for this node "
                                                       "(default ~/.cmvim/supernode-<site>)")
    parser.add_argument("--runtime-port", type=int, help="local port of the SuperNode's runtime API "
                                                         "(default: a free one)")
    parser.add_argument("--device", default=None,
                        help="where this site computes: auto (its GPU when it has one), cpu, cuda or cuda:N "
                             "(default: what the run config says, auto unless the coordinator set it)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no node authentication (testing on one machine only)")
    parser.add_argument("--max-restarts", type=int, default=None, help="give up after this many restarts (default: never give up)")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="seconds between the SuperNode's requests for work while the server has none (default 1; "
                             "Flower's own is 3): the delay before each message is picked up")
    parser.add_argument("--cold", action="store_true",
                        help="run every message in a fresh process, as Flower does by default, instead of the warm "
                             "site worker (slower: each message imports torch and reads the site's data again); "
                             "with --insecure only: Flower's per-task Runtime API is open to every local user")
    parser.add_argument("--auth-retries", type=int, default=12,
                        help="retries, 10 s apart, while the server refuses this site's key (default 12: the "
                             "coordinator may be registering it, or still sees this site's previous SuperNode)")


def _read_certificate(path: Path) -> None:
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as err:
        raise JoinError(f"--root-cert {path}: cannot read it ({err.strerror})") from None
    except ValueError:
        raise JoinError(f"--root-cert {path}: not a PEM certificate (expected the federation's ca.crt)") from None


def _read_key(path: Path) -> None:
    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except OSError as err:
        raise JoinError(f"--auth-key {path}: cannot read it ({err.strerror})") from None
    except (ValueError, TypeError) as err:
        raise JoinError(f"--auth-key {path}: not an unencrypted OpenSSH private key ({err}); "
                        f"make one with cmvim-client keygen --site NAME --out DIR") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JoinError(f"--auth-key {path}: a {type(key).__name__}; Flower needs an EC (NIST P-384) key")


def preflight(args: argparse.Namespace) -> None:
    """Everything that can be checked before connecting; raises JoinError naming the problem."""
    if getattr(args, "cold", False) and not args.insecure:
        raise JoinError("--cold runs Flower's process per task, whose Runtime API has no authentication and puts "
                        "each task's token on a command line every local user can read: it is for a test on one "
                        "machine only (with --insecure); a hospital runs the warm site worker (the default)")
    if not args.insecure:
        if args.root_cert is None or args.auth_key is None or getattr(args, "coordinator_key", None) is None:
            raise JoinError("TLS and node authentication are on: give --root-cert ca.crt, --auth-key "
                            f"{args.site}.key and --coordinator-key coordinator.pub (or --insecure for a local test)")
        _read_certificate(args.root_cert)
        _read_key(args.auth_key)
    if getattr(args, "coordinator_key", None) is not None:
        from cmvim.instructions import load_public_key
        try:
            load_public_key(args.coordinator_key)
        except OSError as err:
            raise JoinError(f"--coordinator-key {args.coordinator_key}: cannot read it ({err.strerror})") from None
        except ValueError as err:
            raise JoinError(f"--coordinator-key {err}") from None
    if args.policy is not None:
        try:
            load_policy(args.policy)
        except (ConfigError, ValueError, OSError) as err:
            raise JoinError(f"--policy {args.policy}: {err}") from None
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        raise JoinError(f"--server {args.server!r}: expected HOST:PORT")
    if not all(c.isalnum() or c in "-_" for c in args.site):
        raise JoinError(f"--site {args.site!r}: use letters, digits, '-' and '_'")
    if getattr(args, "device", None) is not None:
        from cmvim.device import DeviceError, describe, resolve_device
        try:
            args.device_name = describe(resolve_device(args.device))
        except DeviceError as err:
            raise JoinError(f"--device: {err}") from None
    flower_executable("flower-supernode", JoinError)


def private_folder(path: Path, uid: int | None = None) -> Path:
    """`path` made (0700) and checked as a folder only the site's user (`uid`, default this
    process's) controls: the folder itself theirs with no group or other write, every folder above
    it theirs or root's, and writable by others only with the sticky bit (as /tmp is: no one can
    rename or replace what is in it). Anything else is a JoinError naming the folder: whoever
    controls a folder on the path could swap the guard script or the ledger kept there, and the
    next task would run their code as the site (checked before creating and again after, so a
    folder raced into place by another user is refused too). Returns the resolved folder."""
    uid = os.getuid() if uid is None else uid
    path = Path(path).expanduser().absolute()

    def check_above(folder: Path) -> None:
        real = Path(os.path.realpath(folder))
        for above in (real, *real.parents):
            if not above.exists():
                continue
            info = above.stat()
            if info.st_uid not in (uid, 0):
                raise JoinError(f"--state-dir {path}: {above} belongs to another user (uid {info.st_uid}); "
                                "choose a state folder under a folder only this site's user and root control")
            if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
                raise JoinError(f"--state-dir {path}: {above} is writable by other users "
                                f"(mode {stat.filemode(info.st_mode)}, no sticky bit); anyone could replace "
                                "what the site keeps below it")

    check_above(path.parent)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    real = Path(os.path.realpath(path))
    info = real.stat()
    if info.st_uid != uid:
        raise JoinError(f"--state-dir {path}: the folder belongs to another user (uid {info.st_uid}, this site "
                        f"runs as uid {uid}); they could replace the guard script and the ledger in it: "
                        "choose a folder this site's user creates")
    check_above(real.parent)
    real.chmod(0o700)                        # the SuperNode's log and the ledger: this site's eyes only
    return real


def install_guard(folder: Path) -> Path:
    """`folder`/flwr-clientapp: Flower's ClientApp runner behind cmvim's approved-app check."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    script.write_text(f"#!{sys.executable}\nfrom cmvim.client.approved_app import main\nmain()\n")
    script.chmod(0o700)
    return folder


def worker_secret(state: Path) -> Path:
    """The secret the SuperNode and the site worker share (0600): only this site's processes may
    take its tasks from the SuperNode's local Runtime API."""
    path = state / "worker.secret"
    path.unlink(missing_ok=True)                       # a fresh one each start
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


def worker_command(runtime_port: int, secret: Path, args: argparse.Namespace, state: Path) -> list[str]:
    """The warm worker, with the settings every task runs under (the SuperNode's node config: the
    same values; a task naming others is refused, cmvim.client.local_guard)."""
    cmd = [sys.executable, "-m", "cmvim.client.worker", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
           "--auth-secret-file", str(secret), "--site", args.site, "--data", str(args.data.resolve()),
           "--state-dir", str(state)]
    if args.policy is not None:
        cmd += ["--policy", str(args.policy.resolve())]
    if getattr(args, "device", None) is not None:
        cmd += ["--device", str(args.device)]
    if getattr(args, "coordinator_key", None) is not None:
        cmd += ["--coordinator-key", str(args.coordinator_key.resolve())]
    return cmd


class WorkerSupervisor:
    """The warm site worker (cmvim.client.worker), started again whenever it exits until stopped:
    a crash costs the message it was running (a failed site-round for the server), not the run."""

    def __init__(self, cmd: list[str], env: dict, site: str, log_path: Path):
        self.cmd, self.env, self.site, self.log_path = cmd, env, site, log_path
        self.child: Child | None = None
        self.stopped = threading.Event()
        self.starts = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        backoff = 1.0
        while not self.stopped.is_set():
            self.starts += 1
            started = time.monotonic()
            self.child = Child(self.cmd, env=self.env, prefix=f"[{self.site} worker] ", log_path=self.log_path)
            code = self.child.wait()
            if self.stopped.is_set():
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            print(f"cmvim-client: site {self.site}'s worker exited (status {code}); starting it again in "
                  f"{backoff:.0f} s", flush=True)
            self.stopped.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def stop(self) -> None:
        self.stopped.set()
        if self.child is not None:
            self.child.stop()
        self.thread.join(timeout=15)


def supernode_command(args: argparse.Namespace, runtime_port: int, state: Path, secret: Path | None = None
                      ) -> list[str]:
    node_config = f'site="{args.site}" data-dir="{args.data.resolve()}" state-dir="{state}"'
    if args.policy is not None:
        node_config += f' policy="{args.policy.resolve()}"'
    if getattr(args, "device", None) is not None:
        node_config += f' device="{args.device}"'
    if getattr(args, "coordinator_key", None) is not None:
        node_config += f' coordinator-key="{args.coordinator_key.resolve()}"'
    flower_executable("flower-supernode", JoinError)          # flwr is installed here
    # Flower's SuperNode, polling the coordinator every --poll-interval s (cmvim.client.supernode)
    cmd = [sys.executable, "-m", "cmvim.client.supernode", "--superlink", args.server,
           "--node-config", node_config, "--host", "127.0.0.1", "--port", str(runtime_port)]
    if secret is not None:            # the warm site worker takes the tasks: the SuperNode starts no process
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(args.root_cert.resolve()),
                "--auth-supernode-private-key", str(args.auth_key.resolve())]
    return cmd


class SiteNode:
    """A hospital's node in a federation, as `cmvim-client join` runs it. Built only once the
    preflight passed and the state folder is the site user's alone (else JoinError); `run` then
    checks the site's data and keeps a Flower SuperNode and the warm site worker going until the
    node is stopped (SIGTERM, SIGINT) or cannot join."""

    def __init__(self, args: argparse.Namespace):
        preflight(args)
        self.args = args
        self.state = private_folder(args.state_dir or Path.home() / ".cmvim" / f"supernode-{args.site}")
        self.supernode: Child | None = None
        self.worker: WorkerSupervisor | None = None
        self.stopping: list[int | None] = []          # the signals that asked the node to stop
        self.fatal: list[tuple[str, int]] = []        # (meaning, exit status) of a FATAL line the SuperNode wrote

    def site_ready(self) -> bool:
        """The site check on the data folder, then what the node will run under, said once."""
        args = self.args
        print(f"cmvim-client: checking site {args.site} before joining")
        if manifest_ready(args.data) != 0:
            print(f"cmvim-client: site {args.site} has fatal data problems (above): not joining", file=sys.stderr)
            return False
        print(f"cmvim-client: site policy: {load_policy(args.policy)}")
        if getattr(args, "device", None) is not None:
            print(f"cmvim-client: computing on {args.device_name} (--device {args.device})")
        if args.insecure:
            print("cmvim-client: WARNING --insecure: no TLS, no node authentication; for tests on one machine only")
        return True

    def environment(self) -> dict:
        """The environment of the SuperNode and the worker. Flower's SuperExec starts
        `flwr-clientapp` by name: ours comes first and checks every app bundle against the site
        policy before Flower installs or imports any of it."""
        env = flower_env(self.state)
        env["PATH"] = os.pathsep.join([str(install_guard(self.state / "bin")), env["PATH"]])
        env[POLICY_ENV] = str(self.args.policy.resolve()) if self.args.policy is not None else ""
        env[POLL_ENV] = str(self.args.poll_interval)
        return env

    def watch(self, line: str) -> None:
        """A line of the SuperNode's output: the first FATAL one is kept for `_supervise`."""
        for needle, meaning, code in FATAL:
            if needle in line and not self.fatal:
                self.fatal.append((meaning, code))

    def stop(self, signum=None, frame=None) -> None:
        """Stop the SuperNode and the worker (a signal handler); `run` then returns 0."""
        self.stopping.append(signum)
        if self.supernode is not None:
            self.supernode.stop()
        if self.worker is not None:
            self.worker.stop()

    def run(self) -> int:
        """0 when stopped; 2 when the site check found fatal problems; a FATAL status when the
        site cannot join; 1 when the SuperNode exited more than --max-restarts times."""
        if not self.site_ready():
            return 2
        env = self.environment()
        runtime_port = self.args.runtime_port or free_port()
        secret = None if self.args.cold else worker_secret(self.state)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            return self._supervise(env, runtime_port, secret)
        finally:
            if self.worker is not None:
                self.worker.stop()

    def _connect(self, env: dict, runtime_port: int, secret: Path | None) -> tuple[int, float]:
        """One SuperNode, started (the warm worker too, the first time) and waited for: its exit
        status and the seconds it ran."""
        args = self.args
        print(f"cmvim-client: site {args.site} connecting to {args.server} (log: {self.state / 'supernode.log'})",
              flush=True)
        self.supernode = Child(supernode_command(args, runtime_port, self.state, secret), env=env,
                               prefix=f"[{args.site}] ", log_path=self.state / "supernode.log", on_line=self.watch)
        if secret is not None and self.worker is None:
            self.worker = WorkerSupervisor(worker_command(runtime_port, secret, args, self.state), env, args.site,
                                           self.state / "worker.log")
        started = time.monotonic()
        code = self.supernode.wait()
        self.supernode.stop()                    # the SuperExec and ClientApp processes it started
        return code, time.monotonic() - started

    def _supervise(self, env: dict, runtime_port: int, secret: Path | None) -> int:
        """The SuperNode started again whenever it exits, with backoff, until stopped or fatal."""
        args = self.args
        restarts, backoff, auth_failures = 0, 2.0, 0
        while True:
            code, ran = self._connect(env, runtime_port, secret)
            if self.stopping:
                print(f"cmvim-client: site {args.site} stopped")
                return 0
            if self.fatal:
                meaning, status = self.fatal.pop()
                if status != UNREGISTERED or auth_failures >= args.auth_retries:
                    print(f"cmvim-client: site {args.site} cannot join: {meaning}", file=sys.stderr)
                    return status
                auth_failures += 1
                print(f"cmvim-client: {meaning} (attempt {auth_failures}/{args.auth_retries + 1}); "
                      f"trying again in {AUTH_RETRY_SECONDS:.0f} s", flush=True)
                time.sleep(AUTH_RETRY_SECONDS)
                if self.stopping:
                    return 0
                continue
            restarts += 1
            if args.max_restarts is not None and restarts > args.max_restarts:
                print(f"cmvim-client: the SuperNode exited {restarts} times (last status {code}); giving up",
                      file=sys.stderr)
                return 1
            if ran > 300:
                backoff = 2.0                    # it ran a while: start the backoff afresh
            print(f"cmvim-client: the SuperNode exited (status {code}); reconnecting in {backoff:.0f} s", flush=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, 60.0)
            if self.stopping:
                return 0


def join(args: argparse.Namespace) -> int:
    """`cmvim-client join`: a SiteNode built from the command's arguments, run; 2 when it cannot be built."""
    try:
        node = SiteNode(args)
    except JoinError as err:
        print(f"cmvim-client: {err}", file=sys.stderr)
        return 2
    return node.run()
