"""The package as a user installs it: a wheel built from this tree, installed into a fresh venv,
builds and boots the console demo from outside the source tree (issue 13).

The dependencies (pyproject's, and the build backend's) are fetched once with ``pip download``
into ``out/wheelhouse`` (PyPI or pip's cache); after that the test is offline: the wheel is built
and installed with ``--no-index --find-links``.  Without gcc or without the wheels, it is skipped.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "out" / "wheelhouse"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pip(command: str, *args: str, python: str | None = None, offline: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    opts: list[str] = []
    if offline:
        env["PIP_CONFIG_FILE"] = os.devnull       # no extra indexes or find-links from the host's config
        opts = ["--no-index", "--find-links", str(WHEELHOUSE)]
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *(["--python", python] if python else []),
           command, *opts, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _wheelhouse() -> None:
    reqs = list(PYPROJECT["project"]["dependencies"]) + list(PYPROJECT["build-system"]["requires"])
    names = [r.split("=")[0].split(">")[0].replace("-", "_").lower() for r in reqs]
    have = {p.name.split("-")[0].lower() for p in WHEELHOUSE.glob("*.whl")} if WHEELHOUSE.is_dir() else set()
    if all(n in have for n in names):
        return
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    proc = _pip("download", "-q", "--only-binary=:all:", "-d", str(WHEELHOUSE), *reqs, offline=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot fetch the dependencies' wheels into {WHEELHOUSE}: {proc.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with vmk installed from a wheel of this tree: its bin/."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the C extensions and the demo's programs")
    _wheelhouse()
    tmp = tmp_path_factory.mktemp("pkg")
    dist = tmp / "dist"
    src = tmp / "src"                            # setuptools builds in the tree: not in ours
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "out", "build", "*.egg-info", "*.so",
                                                             "__pycache__", ".pytest_cache", ".hypothesis"))
    proc = _pip("wheel", "-q", "--no-deps", "-w", str(dist), str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    wheel = next(dist.glob("vmk-*.whl"))
    proc = _pip("install", "-q", str(wheel), python=str(venv / "bin" / "python"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return venv / "bin"


def test_wheel_contents(installed: Path) -> None:
    wheel = next(installed.parent.parent.glob("dist/vmk-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("vmk/guest/include/vmk.h", "vmk/guest/include/vmk.inc", "vmk/guest/include/vmk.ld",
              "vmk/guest/include/vmk_crt0.c", "vmk/demo/console/console.toml", "vmk/demo/console/shell.c",
              "vmk/demo/pipeline/pipeline.toml", "vmk/demo/pipeline/common.h"):
        assert f in names, f
    assert "vmk/setup.py" not in names
    assert not [n for n in names if n.startswith(("vmk/tests/", "tests/", "vmk/out/"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_wheel_builds_and_boots_the_console_demo(installed: Path, tmp_path: Path) -> None:
    """The README's promise, outside the source tree: vmk demo -> vmk build -> vmk boot."""
    vmk = str(installed / "vmk")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = lambda *a, **kw: subprocess.run([vmk, *a], capture_output=True, cwd=tmp_path, env=env,  # noqa: E731
                                          timeout=300, **kw)
    version = run("--version")
    assert version.returncode == 0 and version.stdout.decode().strip() == f"vmk {PYPROJECT['project']['version']}"
    demo = run("demo", "console")
    manifest = Path(demo.stdout.decode().strip())
    assert demo.returncode == 0 and manifest.is_file()
    assert ROOT not in manifest.parents and installed.parent in manifest.parents   # the installed copy
    built = run("build", str(manifest), "-o", "console.img")
    assert built.returncode == 0, built.stderr.decode()
    booted = run("boot", "console.img", "--idle", "skip", "--max-time", "5s",
                 input=b"echo hello\rspawn hello\rexit\r")
    out = booted.stdout.decode()
    assert booted.returncode == 0, booted.stderr.decode()
    assert out.startswith("vmk console: type help\r\n> echo hello\r\nhello\r\n")
    assert "hello from a spawned container" in out
    assert out.endswith("> exit\r\nbye\r\n")


def test_version_matches_pyproject() -> None:
    import vmk
    from vmk.tools.cli import main
    assert vmk.__version__ == PYPROJECT["project"]["version"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
