"""cmvim: federated CMViM pretraining and fine-tuning for 3D multi-modal brain imaging."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cmvim")          # pyproject.toml is the one home of the version
except PackageNotFoundError:                # a source tree that was never installed
    __version__ = "0+unknown"
