"""Fixtures shared by the federated-run tests."""
import importlib.util
from pathlib import Path

import pytest

from cmvim.data import SiteData
from cmvim.run_config import PreprocessConfig
from cmvim.simulations.cohort import CohortConfig, cached_cohort

# An easy cohort: large effects, PET for everyone, enough labeled subjects that the tiny model's
# fine-tuning (which sits on a loss plateau for its first ~2 rounds) gets past chance. With 24
# subjects a site and effect_scale 3 the test split held 4-6 labeled subjects and AUCs were noise.
EASY = {"sites": 3, "subjects": 60, "shape": 32, "seed": 2, "effect_scale": 5.0, "pet_missing": 0.0}


@pytest.fixture(scope="session")
def easy_cohort(tmp_path_factory):
    return cached_cohort(CohortConfig(**EASY), root=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def easy_sites(easy_cohort):
    """The easy cohort's sites, loaded as the recipe tests train on them (test_cnn3d loads its own)."""
    cfg = PreprocessConfig(spatial="none", shape=32, voxel_size=6.25, normalize={"mri": "zscore", "pet": "suvr"})
    return {name: SiteData.load(Path(easy_cohort) / name, cfg, seed=0, split_fractions=(0.6, 0.0, 0.4))
            for name in ("A", "B", "C")}


@pytest.fixture
def load_benchmark():
    """`load_benchmark("ssl")`: a script of benchmarks/ as a module (they are scripts, not a package)."""
    def load(name: str):
        path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
