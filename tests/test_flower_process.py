"""cmvim's supervisor of Flower's processes (cmvim.flower_process.Child), on real processes: what it
keeps of their output, and how it stops them (by PID, never by name)."""
from __future__ import annotations

import sys
import time

import pytest

from cmvim.flower_process import Child

PRINTS = "import time\nfor line in ('a', 'b', 'c'):\n    print(line, flush=True)\ntime.sleep(60)\n"
# a command that stops its own child on SIGTERM (as cmvim-server and cmvim-client do: here by closing
# its stdin), saying how it ended; the child says so if a SIGTERM reaches it
GRANDCHILD = ("import signal, sys\n"
              "signal.signal(signal.SIGTERM, lambda *_: (print('a SIGTERM reached my child', flush=True), sys.exit(1)))\n"
              "sys.stdin.read()\n")
STOPS_ITS_CHILD = f"""
import signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {GRANDCHILD!r}], stdin=subprocess.PIPE)
def stop(*_):
    child.stdin.close()
    print("stopped my child", child.wait(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("up", flush=True)
signal.pause()
"""


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_stamped_child_keeps_every_line_with_its_arrival_time(tmp_path):
    started = time.time()
    child = Child([sys.executable, "-c", PRINTS], echo=False, stamped=True, keep=2, log_path=tmp_path / "c.log")
    try:
        wait_for(lambda: child.seen("c") is not None)
    finally:
        child.stop(grace=5)
    assert child.lines == ["b", "c"]                                  # the last `keep`
    assert [line for _, line in child.history] == ["a", "b", "c"]     # all of them
    times = [arrived for arrived, _ in child.history]
    assert started <= times[0] <= times[1] <= times[2] <= time.time() and child.seen("b") == times[1]
    assert child.seen("never printed") is None
    stamps = [line.split(" ", 1) for line in (tmp_path / "c.log").read_text().splitlines()]
    assert [(float(stamp), line) for stamp, line in stamps] == [(round(t, 3), x) for t, x in child.history]
    plain = Child([sys.executable, "-c", "print('x')"], echo=False)
    plain.wait(60)
    with pytest.raises(ValueError, match="stamped"):
        plain.seen("x")


def test_leader_first_lets_the_command_stop_its_own_children():
    child = Child([sys.executable, "-c", STOPS_ITS_CHILD], echo=False, stamped=True)
    wait_for(lambda: child.seen("up") is not None)
    child.stop(grace=30, leader_first=True)
    assert child.poll() == 0 and child.lines[-1] == "stopped my child 0", child.lines
