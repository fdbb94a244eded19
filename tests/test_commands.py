"""Every command a user runs answers --version with the installed cmvim's version; cmvim-client's
bare form still joins; a missing optional extra ends in the pip command, not a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

import cmvim

COMMANDS = [["cmvim-sim"], ["cmvim-cohort"], ["cmvim-server"], ["cmvim-client"], ["cmvim-client", "join"],
            ["cmvim-client", "check"], ["cmvim-client", "predict"], ["cmvim-client", "keygen"], ["cmvim-certs"]]


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


def test_client_without_a_subcommand_joins(tmp_path):
    """`cmvim-client --site A ...`, the form the Dockerfiles and deployments use, is `cmvim-client join`."""
    exe = Path(sys.executable).with_name("cmvim-client")
    args = ["--site", "A", "--data", str(tmp_path / "missing"), "--server", "127.0.0.1:9", "--insecure"]
    bare, named = (subprocess.run([str(exe), *form, *args], capture_output=True, text=True, timeout=120)
                   for form in ([], ["join"]))
    assert bare.returncode == named.returncode == 2
    assert bare.stdout == named.stdout and "no manifest.csv in the site folder" in bare.stdout
    assert "site A has fatal data problems (above): not joining" in bare.stderr
    nothing = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "{join,check,predict,keygen}" in nothing.stderr


@pytest.mark.parametrize("module, blocked, argv, hint", [
    ("cmvim.simulations.cohort_cli", "nilearn", ["--out", "cohort"],
     "cmvim-cohort needs the simulation extra: pip install 'cmvim[sim]'"),
    ("cmvim.simulations.cli", "ray", [], "cmvim-sim needs the simulation extra: pip install 'cmvim[sim]'"),
], ids=["cmvim-cohort", "cmvim-sim"])
def test_a_missing_extra_says_how_to_install_it(tmp_path, module, blocked, argv, hint):
    """The extra's package made unimportable, as in an install without [sim]: the entry point says
    which extra to install and exits 2, before it writes anything."""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"from {module} import main\nsys.exit(main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and hint in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
