"""cmvim: federated CMViM pretraining and fine-tuning for 3D multi-modal brain imaging.

The design card's folders server/, client/, simulations/ and deploy/ are installed as
cmvim.server, cmvim.client, cmvim.simulations and cmvim.deploy (pyproject's package-dir), so no
generic top-level name lands in site-packages. In a source checkout (and in a Flower app bundle
built from it) they sit beside cmvim/; `_CheckoutApps` lets them import by the same names there,
so code, tests and `flwr run .` see one layout.
"""
import importlib.abc
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("cmvim")          # pyproject.toml is the one home of the version
except PackageNotFoundError:                # a source tree that was never installed
    __version__ = "0+unknown"

APPS = ("server", "client", "simulations", "deploy")


class _CheckoutApps(importlib.abc.MetaPathFinder):
    """Finds cmvim.<app> in the checkout's <app>/ folder (installed, cmvim/<app>/ exists and this
    finder is never registered)."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _register_checkout_apps() -> None:
    here = Path(__file__).resolve().parent
    folders = {f"{__name__}.{app}": here.parent / app for app in APPS
               if not (here / app).is_dir() and (here.parent / app / "__init__.py").is_file()}
    if folders and not any(isinstance(f, _CheckoutApps) and f.folders == folders for f in sys.meta_path):
        # first: the apps come from beside the cmvim that was imported, even where an editable
        # install of another checkout registered its own finder
        sys.meta_path.insert(0, _CheckoutApps(folders))


_register_checkout_apps()
