"""Fixtures for the kernel core tests (helpers live in kernelsim.py)."""
from __future__ import annotations

import pytest
from kernelsim import Sim


@pytest.fixture
def sim() -> Sim:
    return Sim()


@pytest.fixture(params=["global", "per-container"])
def policy(request: pytest.FixtureRequest) -> str:
    return str(request.param)
