"""Flower's processes as cmvim's commands start them (the SuperLink for cmvim-server, the
SuperNode for cmvim-client): their executables, their environment, and a supervisor that
streams their output and stops them by PID. (The shorter waits inside Flower's processes are
cmvim.flower_polls'; the other Flower internals cmvim uses are cmvim.flower_internals'.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
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
    prefix; `lines` keeps the last `keep` lines. `stamped` keeps every line with its arrival time
    (`history`, `seen`; the log's lines start with it too), for measuring a run from its output.
    `stop()` ends the whole group (the SuperNode's SuperExec and ClientApp processes, the
    SuperLink's ServerApp) by the child's PID: never by name.
    """

    def __init__(self, cmd: list[str], env: dict | None = None, prefix: str = "", log_path=None,
                 on_line=None, echo: bool = True, die_with_parent: bool = True, cwd=None,
                 keep: int = 400, stamped: bool = False):
        self.cmd, self.prefix, self.on_line, self.echo, self.keep = cmd, prefix, on_line, echo, keep
        self.lines: list[str] = []
        self.history: list[tuple[float, str]] | None = [] if stamped else None
        # logs can hold tracebacks with paths: readable by the owner only
        self._log = (os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8")
                     if log_path else None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=env if env is not None else dict(os.environ), start_new_session=True,
                                     preexec_fn=_die_with_parent if die_with_parent else None, cwd=cwd)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            del self.lines[:-self.keep]
            if self.history is not None:
                arrived = time.time()
                self.history.append((arrived, line))
            if self._log:
                self._log.write(f"{arrived:.3f} {line}\n" if self.history is not None else line + "\n")
                self._log.flush()
            if self.echo:
                print(f"{self.prefix}{line}", flush=True)
            if self.on_line:
                self.on_line(line)

    def seen(self, text: str) -> float | None:
        """When the first line holding `text` arrived (a `stamped` child), None before it has."""
        if self.history is None:
            raise ValueError("Child.seen needs a stamped child (Child(..., stamped=True))")
        return next((arrived for arrived, line in list(self.history) if text in line), None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self, grace: float = 10.0, leader_first: bool = False) -> None:
        """SIGTERM, then after `grace` s SIGKILL, to the whole group. `leader_first`: the SIGTERM goes
        to the child alone, for a command that stops its own children (cmvim-server, cmvim-client)."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    if leader_first and sig == signal.SIGTERM:
                        self.proc.send_signal(sig)
                    else:
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
