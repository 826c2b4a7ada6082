"""Shared fixtures: the guest kernels built from guest/ and tests/guest/."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST_OUT = ROOT / "out" / "guest"


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """Build (incrementally) and return the directory of the guest kernels."""
    if shutil.which("gcc") is None or shutil.which("objcopy") is None:
        pytest.skip("gcc and GNU binutils are needed to build the guest kernels")
    proc = subprocess.run(["make", "-s", "-C", str(ROOT / "guest"), f"OUT={GUEST_OUT}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"guest build failed:\n{proc.stdout}\n{proc.stderr}"
    return GUEST_OUT
