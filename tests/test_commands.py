"""Every command a user runs answers --version with the installed cmvim's version."""
import subprocess
import sys
from pathlib import Path

import pytest

import cmvim

COMMANDS = [["cmvim-sim"], ["cmvim-cohort"], ["cmvim-server"], ["cmvim-client"], ["cmvim-client", "check"],
            ["cmvim-client", "keygen"], ["cmvim-certs"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_says_its_version(command):
    exe = Path(sys.executable).with_name(command[0])
    proc = subprocess.run([str(exe), *command[1:], "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{' '.join(command)} (cmvim) {cmvim.__version__}"


def test_certs_command_writes_a_federation(tmp_path):
    exe = Path(sys.executable).with_name("cmvim-certs")
    proc = subprocess.run([str(exe), "--out", str(tmp_path / "certs"), "--sites", "A"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    made = sorted(str(p.relative_to(tmp_path / "certs")) for p in (tmp_path / "certs").rglob("*") if p.is_file())
    assert made == ["ca.crt", "ca.key", "coordinator.key", "coordinator.pub", "server.crt", "server.key",
                    "sites/A.key", "sites/A.pub"]
    assert oct((tmp_path / "certs" / "coordinator.key").stat().st_mode & 0o777) == "0o600"
    from cmvim.instructions import load_private_key, load_public_key
    signing, checking = load_private_key(tmp_path / "certs" / "coordinator.key"), \
        load_public_key(tmp_path / "certs" / "coordinator.pub")
    checking.verify(signing.sign(b"a pair"), b"a pair")          # the two halves of one key
    again = subprocess.run([str(exe), "--out", str(tmp_path / "certs")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr


def test_a_site_makes_its_own_key_pair(tmp_path):
    exe = Path(sys.executable).with_name("cmvim-client")
    proc = subprocess.run([str(exe), "keygen", "--site", "A", "--out", str(tmp_path / "keys")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    key, pub = tmp_path / "keys" / "sites" / "A.key", tmp_path / "keys" / "sites" / "A.pub"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    from cmvim.client.join import _read_key
    _read_key(key)                                   # what cmvim-client --auth-key accepts
    again = subprocess.run([str(exe), "keygen", "--site", "A", "--out", str(tmp_path / "keys")], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
