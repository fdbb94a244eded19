"""Only approved code runs at a site: a guard in front of Flower's `flwr-clientapp`.

Flower's SuperNode runs whatever ClientApp the coordinator's app bundle (FAB) names, and puts
the bundle's files first on the import path. So a coordinator (or anyone who can submit a run)
could ship a ClientApp without the site policy's check, the SecAgg requirement or the privacy
ledger. `cmvim-client` therefore starts the SuperNode with this guard first on its PATH as
`flwr-clientapp`: before Flower installs a bundle or imports anything from it, the guard checks
the bundle against the site policy and refuses anything else with a message naming its hash.

What the site accepts (policy `approved_apps`):
  installed   (default) a bundle that carries no code at all (pyproject.toml and Flower's own
              manifest only) and names cmvim's ClientApp: the code that runs is the cmvim this
              hospital installed, with its policy check and ledger. cmvim-server ships exactly such
              a bundle (cmvim.server.flower_app).
  sha256      additionally, or instead, the bundle's SHA-256 must be one of `approved_fab_sha256`.
"""
from __future__ import annotations

import hashlib
import io
import os
import tomllib
import zipfile

from .policy import SitePolicy, load_policy

CLIENT_APP = "cmvim.client.app:app"         # the one component a code-free bundle may name
FLOWER_FILES = {"pyproject.toml", ".info/CONTENT"}
POLICY_ENV = "CMVIM_SITE_POLICY"            # set by cmvim-client for the SuperNode and its children


class AppRefused(Exception):
    """The bundle is not one this site runs; the message is public (the hash and the rule)."""


def check_bundle(content: bytes, policy: SitePolicy) -> str:
    """The bundle's SHA-256 when the site policy approves it; AppRefused naming the hash otherwise."""
    digest = hashlib.sha256(content).hexdigest()
    pinned = policy.approved_fab_sha256
    if pinned and digest not in pinned:
        raise AppRefused(f"site refused app bundle sha256 {digest}: not in the site policy's approved_fab_sha256")
    if policy.approved_apps == "sha256":
        if not pinned:
            raise AppRefused(f"site refused app bundle sha256 {digest}: approved_apps is sha256 and no hash is approved")
        return digest
    try:
        bundle = zipfile.ZipFile(io.BytesIO(content))
        names = set(bundle.namelist())
        project = tomllib.loads(bundle.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AppRefused(f"site refused app bundle sha256 {digest}: not a readable Flower app bundle ({exc})") from None
    extra = sorted(names - FLOWER_FILES)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise AppRefused(f"site refused app bundle sha256 {digest}: it carries files ({shown}); this site runs only "
                         "the cmvim installed here (site policy approved_apps: installed)")
    component = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if component != CLIENT_APP:
        raise AppRefused(f"site refused app bundle sha256 {digest}: its ClientApp is {component!r}, this site runs "
                         f"only {CLIENT_APP!r} (site policy approved_apps: installed)")
    return digest


def _guarded_install(install):
    def install_approved(content: bytes, *args, **kwargs):
        policy_file = os.environ.get(POLICY_ENV) or None
        check_bundle(content, load_policy(policy_file))
        return install(content, *args, **kwargs)
    return install_approved


def main() -> None:
    """`flwr-clientapp` with the bundle checked before Flower installs or imports any of it."""
    from cmvim.flower_internals import flwr_clientapp, guard

    guard("fab install", _guarded_install)
    flwr_clientapp()


if __name__ == "__main__":
    main()
