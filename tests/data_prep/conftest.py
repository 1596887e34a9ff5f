"""Small generated dermoscopy cohorts, drawn once per test session (seeded, no network)."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.synthetic.dermoscopy import generate_dermoscopy


@pytest.fixture(scope="session")
def isic_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """120 images in ISIC 2019's layout, mostly 600x450 with some 1024x768 (read-only: copy to modify)."""
    root = tmp_path_factory.mktemp("isic2019")
    return generate_dermoscopy(root, n_images=120, seed=7, sizes={(600, 450): 0.8, (1024, 768): 0.2}, workers=2)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The smallest cohort holding every class (24 images of 96x72): cheap to copy and break."""
    root = tmp_path_factory.mktemp("isic_tiny")
    return generate_dermoscopy(root, n_images=24, seed=3, sizes=[(96, 72)], workers=1)
