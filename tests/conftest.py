"""Shared fixtures: the tiny config and one synthetic checkpoint per test session."""
import pytest

from quant.config import preset
from quant.synthetic import write_checkpoint


@pytest.fixture(scope="session")
def tiny_cfg():
    """Preset 'tiny': 2 layers, 8 experts, top-2, GQA group 2, 8-row-block scales."""
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_cfg, tmp_path_factory):
    """Directory of a release-format checkpoint of ``tiny_cfg`` (seed 0). Do not modify."""
    return write_checkpoint(tiny_cfg, tmp_path_factory.mktemp("tiny") / "ckpt-0", seed=0)
