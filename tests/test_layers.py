"""The import rules of docs/architecture.md, checked on the source: cmvim imports none of the
apps, the client and the server never import each other, and reading a run config loads
neither torch nor Opacus (the coordinator's CLI and a site's policy check read configs)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_roots(folder: str) -> dict[str, set[str]]:
    """{top-level package imported: files importing it} over every module under `folder`,
    lazy imports inside functions included."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("cmvim", {"client", "server", "simulations"}),
    ("client", {"server", "simulations"}),
    ("server", {"client"}),
])
def test_layers_import_only_downwards(folder, forbidden):
    found = imported_roots(folder)
    assert not {name: found[name] for name in forbidden & set(found)}


def test_the_rule_checker_sees_a_violation(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    from server.app import app\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imported_roots("pkg") == {"server": {"pkg/m.py"}}


def test_reading_a_run_config_loads_neither_torch_nor_opacus():
    code = ("import sys; from cmvim.run_config import run_config; import server.deploy, client.policy; "
            "cfg = run_config('simulations/configs/quick.yaml'); assert cfg.model.embed_dim == 96; "
            "print(sorted(m for m in ('torch', 'opacus', 'flwr') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
