"""The README's test-kit example runs as written (so it cannot rot)."""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example(guest_dir: Path) -> None:
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(from vmk.testing import Harness\n\ndef test_echo\(\):.*?)```", text, re.S).group(1)
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code, "README.md", "exec"), scope)
        scope["test_echo"]()
    finally:
        os.chdir(cwd)
