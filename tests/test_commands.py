"""Every command a user runs answers --version with the installed cmvim's version."""
import subprocess
import sys
from pathlib import Path

import pytest

import cmvim

COMMANDS = [["cmvim-sim"], ["cmvim-cohort"], ["cmvim-server"], ["cmvim-client"], ["cmvim-client", "check"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_says_its_version(command):
    exe = Path(sys.executable).with_name(command[0])
    proc = subprocess.run([str(exe), *command[1:], "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{' '.join(command)} (cmvim) {cmvim.__version__}"
