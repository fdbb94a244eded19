"""Fixtures shared by the federated-run tests."""
import pytest

from cmvim.simulations.cohort import CohortConfig, cached_cohort

# An easy cohort: large effects, PET for everyone, enough labeled subjects that the tiny model's
# fine-tuning (which sits on a loss plateau for its first ~2 rounds) gets past chance. With 24
# subjects a site and effect_scale 3 the test split held 4-6 labeled subjects and AUCs were noise.
EASY = {"sites": 3, "subjects": 60, "shape": 32, "seed": 2, "effect_scale": 5.0, "pet_missing": 0.0}


@pytest.fixture(scope="session")
def easy_cohort(tmp_path_factory):
    return cached_cohort(CohortConfig(**EASY), root=tmp_path_factory.mktemp("cache"))
