"""The package installs like a product: a wheel built from the checkout, installed non-editable
into a fresh virtual environment, runs every command from a folder outside the checkout, and
puts no generic top-level name (server, client, simulations, deploy) into site-packages.

The fresh venv borrows this environment's third-party packages through a .pth line (so the test
needs no network and takes seconds to install), never this environment's cmvim: an editable
install's finder lives in a .pth file that a path line does not run."""
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from cmvim.cli_util import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow        # a wheel build, a venv and a tiny simulation: ~2 min


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's bin folder, an environment for it): cmvim installed there from a wheel."""
    root = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = root / "source"          # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "runs", "*.egg-info",
                                                                  "__pycache__", "*.png", "*.jsonl"))
    _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q", "-w", root / "wheel"],
         cwd=root, env=env)
    (wheel,) = (root / "wheel").glob("cmvim-*.whl")
    _run([sys.executable, "-m", "venv", root / "venv"], cwd=root, env=env)
    bin_dir = root / "venv" / "bin"
    venv_site = Path(_run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=root, env=env).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (venv_site / "borrowed.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=root, env=env)
    for script in entry_points(group="console_scripts"):     # flwr's commands, as pip would write them here
        if script.dist is not None and script.dist.name == "flwr":
            module, _, func = script.value.partition(":")
            path = bin_dir / script.name
            path.write_text(f"#!{bin_dir / 'python'}\nimport sys\nfrom {module} import {func}\n"
                            f"sys.exit({func}())\n")
            path.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return bin_dir, env, venv_site


def test_the_wheel_holds_one_namespace(installed):
    bin_dir, env, venv_site = installed
    top = {p.name for p in venv_site.iterdir() if not p.name.endswith((".pth", ".dist-info")) and p.name != "__pycache__"}
    ours = top - {"pip", "_distutils_hack", "setuptools", "pkg_resources", "_virtualenv.py", "distutils-precedence"}
    assert ours == {"cmvim"}, ours
    packaged = {p.name for p in (venv_site / "cmvim").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert packaged >= {"server", "client", "simulations", "deploy", "data", "model", "ssm"}
    assert (venv_site / "cmvim" / "simulations" / "configs" / "quick.yaml").is_file()
    where = _run([bin_dir / "python", "-c", "import cmvim.server.app as a, cmvim; print(a.__file__, cmvim.__version__)"],
                 cwd=venv_site.parent, env=env).stdout.split()
    assert where[0].startswith(str(venv_site)) and where[1] == _run(
        [sys.executable, "-c", "import cmvim; print(cmvim.__version__)"], cwd=REPO, env=env).stdout.strip()


def test_installed_commands_run_outside_the_checkout(installed, tmp_path):
    bin_dir, env, _ = installed
    env = dict(env, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    _run([bin_dir / "cmvim-certs", "--out", tmp_path / "certs", "--sites", "A"], cwd=tmp_path, env=env)
    assert (tmp_path / "certs" / "sites" / "A.pub").is_file()
    _run([bin_dir / "cmvim-cohort", "--sites", "2", "--subjects", "16", "--shape", "32", "--seed", "3",
          "--effect-scale", "5", "--pet-missing", "0", "--out", tmp_path / "cohort"], cwd=tmp_path, env=env)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "cohort": {"path": str(tmp_path / "cohort")}, "model": {"preset": "tiny"},
        "preprocess": {"spatial": "none", "shape": 32, "voxel_size": 6.25}, "split_fractions": [0.6, 0.0, 0.4],
        "pretrain": {"rounds": 1, "local_epochs": 1, "batch_size": 4},
        "finetune": {"rounds": 1, "local_epochs": 1, "batch_size": 4, "probe_rounds": 0},
        "strategy": {"name": "fedavg", "min_nodes": 2}, "evaluation": {"bootstrap": 50, "every_round": False}}))
    check = _run([bin_dir / "cmvim-client", "check", "--data", tmp_path / "cohort" / "A", "--config", config],
                 cwd=tmp_path, env=env)
    assert "READY" in check.stdout
    usage = _run([bin_dir / "cmvim-client", "--help"], cwd=tmp_path, env=env).stdout
    assert all(f"    {name} " in usage for name in ("join", "check", "predict", "keygen")), usage
    sim = _run([bin_dir / "cmvim-sim", "--config", config, "--out", tmp_path / "run"], cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "metrics.json").is_file() and "| pooled |" in sim.stdout
    # the coordinator: starts its SuperLink from the installed package, writes the app project Flower
    # runs, and gives up (non-zero, saying why) when no site comes online
    server = subprocess.run([bin_dir / "cmvim-server", "--config", config, "--out", tmp_path / "deploy", "--insecure",
                             "--address", f"127.0.0.1:{free_port()}", "--wait-sites", "1", "--wait-timeout", "3"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert server.returncode != 0 and "only 0 of 1 sites came online" in server.stdout + server.stderr
    build = _run([bin_dir / "flwr", "build", "--app", tmp_path / "deploy" / ".superlink" / "app"],
                 cwd=tmp_path, env=env)
    assert "Successfully built" in build.stdout
