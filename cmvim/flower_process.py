"""Flower's processes as cmvim's commands start them (the SuperLink for cmvim-server, the
SuperNode for cmvim-client): their executables, their environment, and a supervisor that
streams their output and stops them by PID."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


def flower_executable(name: str, error: type[Exception] = RuntimeError) -> str:
    """Flower's command `name` (flwr, flower-superlink, flower-supernode) from this interpreter's
    environment; `error` saying so when flwr is not installed there."""
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        raise error(f"{name} not found next to {sys.executable}: is flwr installed in this environment? "
                    "(installing cmvim installs it)")
    return str(path)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, so a killed
    cmvim-client or cmvim-server never leaves an orphaned SuperNode or SuperLink behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG


class Child:
    """A child process in its own process group, its output streamed line by line.

    `on_line(line)` sees every line (for matching known errors) and `echo` prints them with a
    prefix. `stop()` ends the whole group (the SuperNode's SuperExec and ClientApp processes,
    the SuperLink's ServerApp) by the child's PID: never by name.
    """

    def __init__(self, cmd: list[str], env: dict | None = None, prefix: str = "", log_path=None,
                 on_line=None, echo: bool = True, die_with_parent: bool = True):
        self.cmd, self.prefix, self.on_line, self.echo = cmd, prefix, on_line, echo
        self.lines: list[str] = []
        # logs can hold tracebacks with paths: readable by the owner only
        self._log = (os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8")
                     if log_path else None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=env if env is not None else dict(os.environ), start_new_session=True,
                                     preexec_fn=_die_with_parent if die_with_parent else None)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            del self.lines[:-400]
            if self._log:
                self._log.write(line + "\n")
                self._log.flush()
            if self.echo:
                print(f"{self.prefix}{line}", flush=True)
            if self.on_line:
                self.on_line(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:                                   # the leader is gone; its group may not be
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        self._reader.join(timeout=5)
        if self._log:
            self._log.close()
            self._log = None


def flower_env(home, extra_path: bool = True) -> dict:
    """The environment for Flower's own processes: its home folder, runtime dependency
    installation off, and this interpreter's bin folder first on PATH (the SuperNode and
    SuperLink start `flower-superexec` by name)."""
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONUNBUFFERED="1")
    if extra_path:
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class Backoff:
    """A poll's wait that is short right after activity and grows with the time since it, up to
    `slow`: clamp(ratio x seconds since `mark()`, fast, slow) (a relative backoff). Right after a
    site replied, the next message of a round is usually a second or two away; an idle
    federation's polls slow back down to `slow` within slow/ratio seconds."""

    def __init__(self, fast: float, slow: float, ratio: float = 0.1, clock=None):
        import time
        self.fast, self.slow, self.ratio = fast, max(fast, slow), ratio
        self.clock = clock or time.monotonic
        self.last = self.clock()

    def mark(self) -> None:
        self.last = self.clock()

    def interval(self) -> float:
        return min(self.slow, max(self.fast, self.ratio * (self.clock() - self.last)))


class _PollSleep:
    """The `time` module as a Flower module sees it, with its hard-coded waits replaced: a sleep
    of `s` seconds for which `rules` has a Backoff sleeps that Backoff's interval; any other sleep is
    left as it is."""

    def __init__(self, rules: dict[float, Backoff]):
        import time
        self._time, self.rules = time, rules

    def __getattr__(self, name):
        return getattr(self._time, name)

    def sleep(self, seconds: float) -> None:
        rule = self.rules.get(seconds)
        self._time.sleep(rule.interval() if rule is not None else seconds)


def _marking(function, *backoffs: Backoff):
    """`function`, marking every one of `backoffs` when it is called and when it returns."""
    import functools

    def mark():
        for backoff in backoffs:
            backoff.mark()

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        mark()
        try:
            return function(*args, **kwargs)
        finally:
            mark()
    wrapper.__wrapped_by_cmvim__ = True
    return wrapper


FLOWER_POLL = 3.0           # Flower 1.42's hard-coded poll on both ends of a message
FLOWER_REPLY_WAIT = 0.5     # the SuperNode's look for the reply to send (in memory, this process)


def quicken_supernode(module, poll: float, fast: float = 0.1) -> Backoff:
    """Flower 1.42's SuperNode (flwr.supernode.start_client_internal, `module`) asks the SuperLink for
    work every hard-coded 3 s when there was none, and looks for the reply to send every 0.5 s.
    With the warm site worker a small model's round is a few seconds of work, so those waits were
    most of it. Here, in this process only: the ask for work waits `fast` s right after the site
    last sent a reply, growing with the time since (Backoff: ratio 0.1) back to `poll` s for an
    idle site (each ask is one HTTPS request to the coordinator); the look for the reply (a
    lookup in this process's memory, free) every 10 ms, so a reply leaves within 10 ms of the
    site's work ending (it waited up to 0.2 s after a long task before). Returns the activity
    clock (marked when a reply starts and ends)."""
    activity, reply = Backoff(fast, poll), Backoff(0.01, 0.01)
    module.time = _PollSleep({FLOWER_POLL: activity, FLOWER_REPLY_WAIT: reply})
    if not getattr(module._push_messages, "__wrapped_by_cmvim__", False):
        module._push_messages = _marking(module._push_messages, activity, reply)
    return activity


def quicken_server_polls(http_grid, poll: float, fast: float = 0.05) -> Backoff:
    """Flower 1.42's ServerApp (flwr.superlink.grid.http_grid, `http_grid`) asks the SuperLink for the
    sites' replies every hard-coded 3 s. Here: `fast` s right after it sent the messages, growing
    with the time since (Backoff: ratio 0.1) to `poll` s; a request on the coordinator's loopback."""
    activity = Backoff(fast, poll)
    http_grid.time = _PollSleep({FLOWER_POLL: activity})
    grid = http_grid.HttpGrid
    if not getattr(grid.send_and_receive, "__wrapped_by_cmvim__", False):
        grid.send_and_receive = _marking(grid.send_and_receive, activity)
    return activity


def shorten_object_backoff(initial: float = 0.05, cap: float = 0.5) -> None:
    """Flower 1.42 pulls a message's objects with a backoff of 1 s doubling to 10 s when one is not
    there yet (the sender is still pushing it): on a small model's round, a second or more per
    message waiting for an object that arrived milliseconds later (a doubling backoff waits up to
    as long again as the object took). Start at `initial`, cap at `cap`
    (flwr.supercore.inflatable.inflatable_utils' pulls, this process only)."""
    from flwr.supercore.inflatable import inflatable_utils

    # as many tries as give the same patience as Flower's (500 tries at up to 10 s)
    wanted = {"initial_backoff": initial, "backoff_cap": cap, "max_tries_per_object": int(500 * 10 / cap)}
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):       # keyword-only defaults in 1.42
        defaults = getattr(getattr(inflatable_utils, name, None), "__kwdefaults__", None)
        if defaults:
            defaults.update({k: v for k, v in wanted.items() if k in defaults})
