"""A container that floods the console holds itself back, not pid 0's memory
and every other writer: ``console_write`` and the console.tx driver wait while
more than ``VMKernel.CONSOLE_HIGH`` bytes are queued for the UART (found by
the guest fuzzer: 2,000 writes of 64 KiB queued 131 MB in 1 ms of virtual
time, and the other containers' lines waited hours of virtual time behind)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the guest programs are C (gcc needed)")

FLOOD_C = r"""
#include "vmk.h"
static char big[8192];
int main(void)
{
    for (int i = 0; i < 8192; i++) big[i] = '.';
    big[8191] = '\n';
    for (int i = 0; i < 1000; i++) {          /* 8 MB: 12 minutes of a 115200-baud line */
        vmk_console_write(big, sizeof big);
        vmk_send(1, big, 4096);               /* and through the console channel */
    }
    return 0;
}
"""

WITNESS_C = r"""
#include "vmk.h"
int main(void)
{
    char line[] = "witness 0\n";
    for (int i = 0; i < 3; i++) {
        vmk_sleep(1000000L);
        line[8] = '0' + i;
        vmk_console_write(line, sizeof line - 1);
    }
    vmk_console_write("witness done\n", 13);
    for (;;) vmk_sleep(1000000000L);
}
"""

MANIFEST = """
[kernel]
policy = "%s"
[[program]]
name = "flood"
source = "flood.c"
[[program]]
name = "witness"
source = "witness.c"
[[container]]
name = "witness"
program = "witness"
memory = "128K"
[[container]]
name = "flood"
program = "flood"
memory = "128K"
handles = ["console.rx", "console.tx"]
"""


@pytest.mark.parametrize("policy", ["global", "per-container"])
def test_a_flooding_container_waits_for_the_console(tmp_path: Path, policy: str) -> None:
    (tmp_path / "flood.c").write_text(FLOOD_C)
    (tmp_path / "witness.c").write_text(WITNESS_C)
    (tmp_path / "m.toml").write_text(MANIFEST % policy)
    build(tmp_path / "m.toml", tmp_path / "m.img")
    com1 = SerialCapture()
    k = VMKernel(Machine(MachineConfig(serial=[com1])), read_image(tmp_path / "m.img"))
    most = 0
    write = k.hal.console_write

    def counting(data: bytes) -> None:
        nonlocal most
        write(data)
        most = max(most, len(k.hal.tx_queue))

    k.hal.console_write = counting
    r = k.run(until=8_000_000_000)          # 8 s of virtual time: ~92 KB on the line
    assert r.why is Why.TIME_LIMIT, (r.why, r.message)
    # the queue stays within the high mark plus what the held writers bring when it
    # drains: the flood's 8 KiB console_write, its 4 KiB channel message, a witness line
    assert 0 < most <= k.CONSOLE_HIGH + 8192 + 4096 + 64, most
    text = com1.data.decode()
    # the witness's lines got through, whole, within seconds, not behind the 8 MB
    assert [ln for ln in text.splitlines() if ln.startswith("witness")] == \
        ["witness 0", "witness 1", "witness 2", "witness done"]
    assert k.containers[2].exit_code is None           # the flood is still going: it waits, it is not killed
