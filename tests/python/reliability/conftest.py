"""Reliability-suite fixtures.

The `cuda` and `slow` markers are registered in pyproject.toml and CUDA tests
are skipped by tests/python/conftest.py; both are repeated here (idempotently)
so this directory also works on its own, e.g. `pytest tests/python/reliability`
with another rootdir.
"""

import pytest
import torch

import orchard

HAS_CUDA = torch.cuda.is_available() and bool(orchard.build_info().get("cuda_compiled"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: longer-running test")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and an orchard build with the CUDA backend")
    for item in items:
        if "cuda" in item.keywords and "reliability" in str(item.fspath):
            item.add_marker(skip)
