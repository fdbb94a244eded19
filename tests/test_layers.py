"""The import rules of docs/architecture.md, checked on the source: cmvim imports none of the
apps, the client and the server never import each other, the server never imports the
simulator, no module imports an app by a bare top-level name (installed, they are cmvim.server,
cmvim.client, cmvim.simulations, cmvim.deploy), and reading a run config loads neither torch nor
Opacus nor Flower (the coordinator's CLI and a site's policy check read configs)."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ("server", "client", "simulations", "deploy")


def imported_layers(folder: str) -> dict[str, set[str]]:
    """{layer imported: files importing it} over every module under `folder`, lazy imports inside
    functions included. A layer is an app (`server`, ...: cmvim.server, or a relative import that
    climbs out of the package), `cmvim` (the library), `bare:<app>` (an app by a top-level name),
    or another package's top-level name."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        package = ["cmvim"] + ([folder] if folder in APPS else []) + list(path.relative_to(ROOT / folder).parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                names = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] in APPS:
                    layer = f"bare:{parts[0]}"
                elif parts[0] == "cmvim":
                    layer = parts[1] if len(parts) > 1 and parts[1] in APPS else "cmvim"
                else:
                    layer = parts[0]
                found.setdefault(layer, set()).add(str(path.relative_to(ROOT)))
    return found


BARE = {f"bare:{app}" for app in APPS}


@pytest.mark.parametrize("folder, forbidden", [
    ("cmvim", {"client", "server", "simulations", "deploy"} | BARE),
    ("client", {"server", "simulations"} | BARE),
    ("server", {"client", "simulations"} | BARE),
    ("simulations", BARE),
    ("deploy", {"client", "server", "simulations"} | BARE),
    ("benchmarks", BARE),
    ("tests", BARE),
])
def test_layers_import_only_downwards(folder, forbidden):
    found = imported_layers(folder)
    assert not {name: found[name] for name in forbidden & set(found)}


def test_the_rule_checker_sees_a_violation(tmp_path, monkeypatch):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "m.py").write_text("def f():\n    from cmvim.simulations.cohort import x\n"
                                              "from ..client import app\nimport client.app\nfrom .runner import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imported_layers("server") == {"simulations": {"server/m.py"}, "client": {"server/m.py"},
                                         "bare:client": {"server/m.py"}, "server": {"server/m.py"}}


def test_reading_a_run_config_loads_neither_torch_nor_opacus_nor_flower():
    code = ("import sys; from cmvim.run_config import run_config; import cmvim.server.deploy, cmvim.client.policy; "
            "cfg = run_config('simulations/configs/quick.yaml'); assert cfg.model.embed_dim == 96; "
            "print(sorted(m for m in ('torch', 'opacus', 'flwr') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_checkouts_flower_app_is_the_one_cmvim_server_writes(tmp_path):
    """`flwr run .` (the checkout's pyproject) and cmvim-server (server/flower_app.write_project)
    declare the same client app and run config; only the server app differs (simulation vs
    deployment)."""
    from cmvim.server.flower_app import APP_CONFIG, CLIENT_APP, SERVER_APP, SIMULATION_SERVER_APP, write_project
    checkout = tomllib.loads((ROOT / "pyproject.toml").read_text())
    written = tomllib.loads((write_project(tmp_path, "1.2.3") / "pyproject.toml").read_text())
    for project, server_app in ((checkout, SIMULATION_SERVER_APP), (written, SERVER_APP)):
        app = project["tool"]["flwr"]["app"]
        assert app["components"] == {"serverapp": server_app, "clientapp": CLIENT_APP}
        assert app["config"] == APP_CONFIG
        assert app["publisher"] == checkout["tool"]["flwr"]["app"]["publisher"]
    assert written["project"]["version"] == "1.2.3"


def test_the_sites_message_path_imports_only_what_a_training_message_needs():
    """Each message starts a fresh ClientApp process (Flower 1.42): what its import pulls in is
    paid per message. Opacus, scikit-learn, matplotlib and Ray load only where they are used."""
    import subprocess
    import sys
    code = ("import sys, cmvim.client.app; "
            "print(' '.join(m for m in ('opacus', 'sklearn', 'matplotlib', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"imported on the message path: {out}"
