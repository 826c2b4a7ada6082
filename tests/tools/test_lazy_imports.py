"""What a ``vmk`` process imports: heavy modules only where they are used.

Start-up is part of every ``vmk boot`` (tools/bench.py poll-qemu compares the
whole process with QEMU): pyelftools, the vmk image format, the debugger, the
GDB stub, the bench, keystone, prompt_toolkit and socket (only the tcp: serial
back end uses it) each cost milliseconds to import and a bare-metal boot needs
none of them.  Each check runs in a fresh
interpreter and lists what it found.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Never needed to parse the command line or print the help.
NOT_FOR_THE_CLI = ("keystone", "capstone", "prompt_toolkit", "elftools", "vmk.tools.debugshell",
                   "vmk.tools.bench", "vmk.tools.bench_debug", "vmk.tools.bench_kernel", "vmk.tools.gdbstub",
                   "vmk.tools.rsp", "vmk.tools.build", "vmk.boot.vmkimage", "vmk.kernel", "vmk.hal",
                   "vmk.testing", "socket")
# Never needed to boot a bare-metal ELF kernel (capstone is: block mode decodes
# its translation blocks with it).
NOT_FOR_A_KERNEL_BOOT = ("keystone", "prompt_toolkit", "vmk.tools.debugshell", "vmk.tools.bench",
                         "vmk.tools.bench_debug", "vmk.tools.bench_kernel", "vmk.tools.gdbstub", "vmk.tools.rsp",
                         "vmk.tools.build", "vmk.tools.kernelview", "vmk.tools.vmview", "vmk.boot.vmkimage",
                         "vmk.kernel", "vmk.hal", "vmk.testing", "socket")

RUN = """
import json, sys
from vmk.tools.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
sys.stdout.flush()
sys.stderr.write("\\nMODULES " + json.dumps({"status": status, "modules": sorted(sys.modules)}) + "\\n")
"""


def _modules(*args: str) -> tuple[object, list[str]]:
    proc = subprocess.run([sys.executable, "-c", RUN, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES ")]
    assert line, proc.stderr
    report = json.loads(line[-1][len("MODULES "):])
    return report["status"], report["modules"]


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_importing_the_cli_loads_no_heavy_module() -> None:
    code = "import json, sys, vmk.tools.cli; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _loaded(json.loads(proc.stdout), NOT_FOR_THE_CLI) == []


def test_vmk_help_loads_no_heavy_module() -> None:
    status, modules = _modules("--help")
    assert status == 0
    assert _loaded(modules, NOT_FOR_THE_CLI) == []


def test_booting_a_kernel_loads_only_what_it_uses(guest_dir: Path) -> None:
    status, modules = _modules("boot", str(guest_dir / "benchpoll.elf"), "--idle", "skip",
                               "--serial-timing", "instant")
    assert status == (0x10 << 1) | 1                        # benchpoll's isa-debug-exit: it ran to the end
    assert _loaded(modules, NOT_FOR_A_KERNEL_BOOT) == []
    assert "vmk.boot.elf" in modules                        # the loader did parse the ELF file,
    assert "elftools" not in modules                        # with its own reader, not pyelftools (~30 ms)
