"""The import rules of docs/architecture.md, checked on the source: cmvim imports none of the
apps, the client and the server never import each other, the server never imports the
simulator, no module imports an app by a bare top-level name (installed, they are cmvim.server,
cmvim.client, cmvim.simulations, cmvim.deploy), only the Flower room imports Flower's internals,
every run is assembled one way (server/assembly.py builds the one FederatedRun; every ServerApp
main serves through it), and reading a run config loads neither torch nor Opacus nor Flower (the coordinator's CLI and a
site's policy check read configs)."""
import ast
import importlib.util
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


def module_imports() -> dict[str, set[str]]:
    """{module: what it imports} for every module installed under cmvim (the library and the apps,
    by their installed names: cmvim.server.runner), lazy imports inside functions included. What it
    imports is our modules, by name (`from P import x` is the module P.x where there is one, else
    P), and other packages by their top-level name (`torch`). The packages an import runs first
    are left out: a package's __init__ that imports its own modules makes no circle."""
    paths = {}
    for folder in ("cmvim",) + APPS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = ["cmvim"] + ([folder] if folder in APPS else []) + list(path.relative_to(ROOT / folder).parts)
            parts[-1] = parts[-1].removesuffix(".py")
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def ours(name: str) -> str:
        parts = name.split(".")
        parts = ["cmvim"] + parts if parts[0] in APPS else parts        # a bare app name (forbidden above)
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in paths:
                return ".".join(parts[:end])
        return parts[0]

    found: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - (node.level - 1)] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                names |= {f"{source}.{alias.name}" for alias in node.names}
        found[module] = {ours(name) for name in names} - {module}
    return found


def reachable(imports: dict[str, set[str]], module: str) -> set[str]:
    """Every module `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for name in imports.get(todo.pop(), ()):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def import_circles(imports: dict[str, set[str]]) -> list[dict[str, set[str]]]:
    """Each circle of imports: {module: the modules of the circle it imports}."""
    reach = {module: reachable(imports, module) for module in imports}
    circles: list[dict[str, set[str]]] = []
    for module in sorted(imports):
        if module in reach[module] and not any(module in circle for circle in circles):
            members = {other for other in reach[module] if module in reach.get(other, ())}
            circles.append({m: imports[m] & members for m in sorted(members)})
    return circles


def test_imports_run_one_way():
    """No circle of imports among cmvim's modules (lazy imports count too): a module that needs
    another's piece and is needed by it means the piece belongs lower down, in one of them or
    a module of its own."""
    assert import_circles(module_imports()) == []


def test_the_circle_checker_sees_a_circle(tmp_path, monkeypatch):
    (tmp_path / "cmvim" / "data").mkdir(parents=True)
    (tmp_path / "cmvim" / "__init__.py").write_text("")
    (tmp_path / "cmvim" / "data" / "__init__.py").write_text("from .a import x\nfrom .b import y\n")
    (tmp_path / "cmvim" / "data" / "a.py").write_text("import numpy\nfrom .b import y\n")
    (tmp_path / "cmvim" / "data" / "b.py").write_text("def y():\n    from cmvim.data.a import x\n")
    (tmp_path / "cmvim" / "c.py").write_text("from .data import a\nfrom . import data\n")
    for app in APPS:
        (tmp_path / app).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    imports = module_imports()
    assert imports["cmvim.data.a"] == {"numpy", "cmvim.data.b"} and imports["cmvim.c"] == {"cmvim.data.a", "cmvim.data"}
    assert import_circles(imports) == [{"cmvim.data.a": {"cmvim.data.b"}, "cmvim.data.b": {"cmvim.data.a"}}]


# cmvim's floors, bottom up, for the modules whose place a reader relies on. A module reaches
# (imports, directly or through others, lazy imports included) nothing on a floor above its own,
# and the two lower floors reach no torch: the coordinator's CLI, a site's policy check and a
# run's curves and logs load no model. The reconstruction figure builds the model, so it stands
# on the top floor, apart from the round-history curves.
FLOORS = (
    ("the shared names and the run config", ("cmvim.names", "cmvim.protocol", "cmvim.config", "cmvim.model_config",
                                             "cmvim.run_config", "cmvim.tables")),
    ("the run's record: results, curves, logs", ("cmvim.metrics", "cmvim.results", "cmvim.figures",
                                                  "cmvim.tracking")),
    ("the model, the data and what trains them", ("cmvim.model", "cmvim.ssm", "cmvim.losses", "cmvim.weights",
                                                  "cmvim.sharing", "cmvim.engine", "cmvim.data", "cmvim.site_task",
                                                  "cmvim.reconstruction")),
)
TORCH_FREE_FLOORS = 2


def on(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("floor", range(len(FLOORS) - 1), ids=[name for name, _ in FLOORS[:-1]])
def test_floors_import_only_downwards(floor):
    imports = module_imports()
    above = tuple(prefix for _, prefixes in FLOORS[floor + 1:] for prefix in prefixes)
    forbidden = above + (("torch",) if floor < TORCH_FREE_FLOORS else ())
    here = [module for module in imports if on(module, FLOORS[floor][1])]
    reached = {module: sorted(name for name in reachable(imports, module) if on(name, forbidden))
               for module in here}
    assert not {module: names for module, names in reached.items() if names}


def test_every_floor_names_modules_that_exist():
    imports = module_imports()
    assert [prefix for _, prefixes in FLOORS for prefix in prefixes if not any(on(m, (prefix,)) for m in imports)] == []


# Flower's public API: what its public packages export (their __all__). Any other name (one from a
# module below them, flwr.common.constant, flwr.app.error) or package (flwr.server, flwr.client,
# flwr.compat, flwr.supernode, flwr.superlink, flwr.supercore, flwr.proto) is an internal, which
# moves between releases without notice: only the room (cmvim.flower_internals, cmvim.flower_polls,
# cmvim.flower_process) reaches those, so an upgrade reads three modules. The tests may use them
# directly: they play a hostile party (forged Fleet requests, a stranger asking for a site's task)
# and pin what the room assumes.
FLOWER_PUBLIC = ("flwr", "flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp", "flwr.clientapp.mod",
                 "flwr.common", "flwr.simulation")
FLOWER_ROOM = ("cmvim/flower_internals.py", "cmvim/flower_polls.py", "cmvim/flower_process.py")


def flower_exports(package: str) -> set[str]:
    """The names a Flower package exports: its __init__'s __all__, read without importing it."""
    origin = Path(importlib.util.find_spec(package).origin)
    for node in ast.parse(origin.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def flower_internals_used(folder: str) -> dict[str, set[str]]:
    """{file: the Flower internals it imports} under `folder`, lazy imports and import_module("flwr...")
    included: `module.name` for a name its public package does not export, `module` for a module
    outside the public packages."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        used = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                used |= {alias.name for alias in node.names
                         if alias.name.split(".")[0] == "flwr" and alias.name not in FLOWER_PUBLIC}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] == "flwr":
                public = flower_exports(node.module) if node.module in FLOWER_PUBLIC else set()
                used |= {f"{node.module}.{alias.name}" for alias in node.names if alias.name not in public}
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                  in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                  and str(node.args[0].value).split(".")[0] == "flwr" and node.args[0].value not in FLOWER_PUBLIC):
                used.add(node.args[0].value)
        if used:
            found[str(path.relative_to(ROOT))] = used
    return found


def test_only_the_flower_room_imports_flowers_internals():
    found = {}
    for folder in ("cmvim",) + APPS + ("benchmarks",):
        found.update(flower_internals_used(folder))
    outside = {path: sorted(names) for path, names in found.items() if path not in FLOWER_ROOM}
    assert {path: names for path, names in outside.items() if names} == {}


def test_the_flower_rule_checker_sees_internals(tmp_path, monkeypatch):
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "m.py").write_text(
        "import flwr\nimport flwr.supernode.cli\nfrom flwr.app import Message\nfrom flwr.app.error import Error\n"
        "from flwr.serverapp import Grid, LegacyThing\nfrom flwr.clientapp.mod import fixedclipping_mod\n"
        "def f():\n    from flwr.common.constant import TIMESTAMP_HEADER\n"
        "    return importlib.import_module('flwr.superlink.grid.http_grid')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert flower_internals_used("client") == {"client/m.py": {
        "flwr.supernode.cli", "flwr.app.error.Error", "flwr.serverapp.LegacyThing", "flwr.common.constant.TIMESTAMP_HEADER",
        "flwr.superlink.grid.http_grid"}}


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


def run_assembly_breaches(folders=APPS + ("benchmarks",)) -> dict[str, list[str]]:
    """{file: what it does past the one run assembly}: a FederatedRun built anywhere but
    server/assembly.py's serve, or a ServerApp main whose body does not go through serve /
    serve_from_context (cmvim-sim, `flwr run .` and cmvim-server assemble one way)."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                        == "FederatedRun" and where != "server/assembly.py"):
                    found.setdefault(where, []).append(f"FederatedRun built at line {node.lineno}")
                if isinstance(node, ast.FunctionDef) and any(
                        isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "main" for d in node.decorator_list):
                    calls = {getattr(c.func, "id", getattr(c.func, "attr", None))
                             for c in ast.walk(node) if isinstance(c, ast.Call)}
                    if not calls & {"serve", "serve_from_context"}:
                        found.setdefault(where, []).append(f"ServerApp main {node.name} does not serve the assembly")
    return found


def test_every_run_is_assembled_one_way():
    assert run_assembly_breaches() == {}


def test_the_assembly_checker_sees_a_breach(tmp_path, monkeypatch):
    (tmp_path / "simulations").mkdir()
    (tmp_path / "simulations" / "m.py").write_text(
        "@app.main()\ndef main(grid, context):\n    FederatedRun(cfg, out, grid).run()\n"
        "@other.main()\ndef fine(grid, context):\n    serve(grid, context, request, prepared)\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert run_assembly_breaches(("simulations",)) == {"simulations/m.py": [
        "ServerApp main main does not serve the assembly", "FederatedRun built at line 3"]}
