"""A bug in vmk (a Python exception escaping pid 0) never loses the guests' output:
``vmk boot`` flushes the consoles, prints one line naming the syscall and the
container, writes the traceback to a file and exits with status 70
(``tools/cli.py``, EX_SOFTWARE).  The bug is planted in a subprocess: the
``getpid`` syscall handler is replaced by one that raises."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmk.tools.build import build

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the guest programs are C (gcc needed)")

WRITER_C = r"""
#include "vmk.h"
int main(void)
{
    static const char a[] = "early line through console_write\n";
    vmk_console_write(a, sizeof a - 1);
    for (int i = 0; i < 40; i++) {          /* 40 lines through the console channel (handle 1) */
        char line[16] = "chan line 00\n";
        line[10] = '0' + i / 10;
        line[11] = '0' + i % 10;
        vmk_send(1, line, 13);
    }
    vmk_getpid();                           /* the planted bug */
    vmk_console_write("never\n", 6);
    return 0;
}
"""

OTHER_C = r"""
#include "vmk.h"
int main(void)
{
    vmk_send(1, "other container\n", 16);
    for (;;) vmk_sleep(1000000000L);
}
"""

MANIFEST = """
[[program]]
name = "writer"
source = "writer.c"
[[program]]
name = "other"
source = "other.c"
[[container]]
name = "other"
program = "other"
memory = "128K"
handles = ["console.rx", "console.tx"]
[[container]]
name = "writer"
program = "writer"
memory = "128K"
handles = ["console.rx", "console.tx"]
"""

PLANT = """
import sys
import vmk.kernel.pid0 as pid0
from vmk.kernel.syscall_table import Syscall
def boom(*args):
    raise RuntimeError("planted bug")
pid0._SYSCALLS[Syscall.GETPID] = boom
from vmk.tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_vmk_bug_flushes_the_output_and_says_where(tmp_path: Path) -> None:
    (tmp_path / "writer.c").write_text(WRITER_C)
    (tmp_path / "other.c").write_text(OTHER_C)
    (tmp_path / "m.toml").write_text(MANIFEST)
    build(tmp_path / "m.toml", tmp_path / "m.img")
    proc = subprocess.run([sys.executable, "-c", PLANT, "boot", str(tmp_path / "m.img"), "--idle", "skip",
                           "--max-time", "10s"], capture_output=True, timeout=120, env={"TMPDIR": str(tmp_path),
                          **{k: v for k, v in __import__("os").environ.items() if k != "TMPDIR"}})
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 70, (out, err)
    # every byte the guests wrote before the bug reached the terminal
    assert "early line through console_write\n" in out
    assert "other container\n" in out
    assert [ln for ln in out.splitlines() if ln.startswith("chan line")] == [f"chan line {i:02}" for i in range(40)]
    assert "never" not in out
    # one line on stderr: what failed, where, and where the traceback is
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("vmk: internal error"), line
    assert "RuntimeError: planted bug" in line and "syscall getpid" in line and "(writer)" in line, line
    m = re.search(r"traceback in (\S+)$", line)
    assert m, line
    saved = Path(m.group(1)).read_text()
    assert "Traceback" in saved and "RuntimeError: planted bug" in saved
