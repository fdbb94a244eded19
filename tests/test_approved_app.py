"""Only approved code runs at a site: the guard cmvim-client puts in front of Flower's
flwr-clientapp refuses an app bundle that ships code (a ClientApp with the policy check
removed), names another ClientApp, or is not pinned, before Flower installs any of it. The
bundles are real FABs, built by `flwr build`."""
import subprocess
import sys
from pathlib import Path

import pytest

from cmvim.client.approved_app import AppRefused, check_bundle
from cmvim.client.policy import SitePolicy
from cmvim.server.flower_app import write_project

REPO = Path(__file__).resolve().parent.parent


def build(folder: Path, tmp_path: Path) -> bytes:
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)
    proc = subprocess.run([str(Path(sys.executable).with_name("flwr")), "build", "--app", str(folder)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"FLWR_HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (fab,) = tmp_path.glob("*.fab")
    content = fab.read_bytes()
    fab.unlink()
    return content


def test_the_coordinators_bundle_is_approved_and_a_bundle_with_code_is_refused(tmp_path):
    shipped = build(write_project(tmp_path / "app", "0.1.0"), tmp_path)
    digest = check_bundle(shipped, SitePolicy())
    assert len(digest) == 64

    # the attack: the same app with a ClientApp that skips the site policy, shipped in the bundle
    evil = write_project(tmp_path / "evil", "0.1.0")
    (evil / "cmvim" / "client").mkdir(parents=True)
    (evil / "cmvim" / "__init__.py").write_text("")
    (evil / "cmvim" / "client" / "__init__.py").write_text("")
    app = (REPO / "client" / "app.py").read_text().replace("policy.check(", "(lambda *a, **k: None)(")
    (evil / "cmvim" / "client" / "app.py").write_text(app)
    with pytest.raises(AppRefused, match=r"sha256 [0-9a-f]{64}: it carries files \(cmvim/__init__.py"):
        check_bundle(build(evil, tmp_path), SitePolicy())

    # a code-free bundle naming another ClientApp (something else installed at the site)
    other = write_project(tmp_path / "other", "0.1.0")
    (other / "pyproject.toml").write_text((other / "pyproject.toml").read_text().replace(
        'clientapp = "cmvim.client.app:app"', 'clientapp = "flwr.clientapp:ClientApp"'))
    with pytest.raises(AppRefused, match="its ClientApp is 'flwr.clientapp:ClientApp'"):
        check_bundle(build(other, tmp_path), SitePolicy())

    # a pin: only the listed hashes, whatever they hold
    with pytest.raises(AppRefused, match="not in the site policy's approved_fab_sha256"):
        check_bundle(shipped, SitePolicy(approved_fab_sha256=["0" * 64]))
    assert check_bundle(shipped, SitePolicy(approved_apps="sha256", approved_fab_sha256=[digest])) == digest
    with pytest.raises(AppRefused, match="no hash is approved"):
        check_bundle(shipped, SitePolicy(approved_apps="sha256"))


def test_the_guard_runs_as_flwr_clientapp_before_flower_installs_anything(tmp_path, monkeypatch):
    """The script cmvim-client puts first on the SuperNode's PATH is the guard, and the guard's
    install step refuses before calling Flower's installer."""
    from cmvim.client import approved_app
    from cmvim.client.join import install_guard
    script = install_guard(tmp_path / "bin") / "flwr-clientapp"
    assert script.read_text().startswith(f"#!{sys.executable}") and "approved_app import main" in script.read_text()
    assert oct(script.stat().st_mode & 0o777) == "0o700"
    installed = []
    guarded = approved_app._guarded_install(lambda content, **kw: installed.append(content))
    policy = tmp_path / "policy.yaml"
    policy.write_text("approved_apps: sha256\napproved_fab_sha256: []\n")
    monkeypatch.setenv(approved_app.POLICY_ENV, str(policy))
    with pytest.raises(AppRefused):
        guarded(b"anything", skip_prompt=True)
    assert installed == []
