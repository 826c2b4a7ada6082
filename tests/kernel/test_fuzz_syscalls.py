"""Random syscall numbers and arguments thrown at the kernel (hypothesis).

A fuzzing container executes syscalls from a table the test writes into its
memory; a second container holds a secret.  Whatever the arguments, the
kernel must not raise, must not hand the secret to the fuzzer, and the
secret-holder's memory must be intact."""
from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig
from vmk.testing.harness import SerialCapture
from vmk.tools.build import build

TABLE = 0x410000          # inside the fuzzer's heap
N = 12

FUZZER = f"""
    mov r12, {TABLE:#x}
    mov r13, {N}
next:
    mov rax, [r12]
    mov rdi, [r12+8]
    mov rsi, [r12+16]
    mov rdx, [r12+24]
    mov r10, [r12+32]
    mov r8, [r12+40]
    mov r9, [r12+48]
    syscall
    mov [r12+56], rax
    add r12, 64
    dec r13
    jnz next
    mov rdi, 0
    mov rax, SYS_EXIT
    syscall
"""

KEEPER = """
    lea rbx, [rip + secret]
wait:
    mov rax, SYS_SLEEP
    mov rdi, 100000
    syscall
    jmp wait
secret:
    .ascii "TOP-SECRET-0123456789"
"""

SECRET = b"TOP-SECRET-0123456789"


def _image(tmp: Path) -> Path:
    (tmp / "fuzz.s").write_text(FUZZER)
    (tmp / "keep.s").write_text(KEEPER)
    (tmp / "img.toml").write_text("""
[kernel]
channels = 8
[[program]]
name = "fuzz"
source = "fuzz.s"
[[program]]
name = "keep"
source = "keep.s"
[[channel]]
name = "shared"
[[container]]
name = "fuzz"
program = "fuzz"
memory = "256K"
handles = ["console.rx", "console.tx", "shared"]
[[container]]
name = "keep"
program = "keep"
memory = "128K"
handles = ["shared"]
""")
    build(tmp / "img.toml", tmp / "img.img")
    return tmp / "img.img"


_IMAGE: list[Path] = []

small = st.integers(min_value=-4, max_value=40)
wild = st.one_of(small, st.integers(min_value=0, max_value=2**64 - 1),
                 st.sampled_from([0x400000, 0x410000, 0x7FFFE000, 0x900000, 2**63, 2**64 - 8]))
record = st.tuples(st.integers(min_value=0, max_value=25) | st.integers(min_value=0, max_value=2**64 - 1),
                   wild, wild, wild, wild, wild, wild)


# derandomize: the same examples every run (a failure reproduces; CI is deterministic)
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record, min_size=N, max_size=N))
def test_random_syscalls_never_crash_or_leak(tmp_path_factory, records) -> None:
    if not _IMAGE:
        _IMAGE.append(_image(tmp_path_factory.mktemp("fuzz")))
    com1 = SerialCapture()
    m = Machine(MachineConfig(mem=32 << 20, serial=[com1]))
    k = VMKernel(m, read_image(_IMAGE[0]))
    fuzz, keep = k.containers[1], k.containers[2]
    table = b"".join(struct.pack("<7Q", *[v & (2**64 - 1) for v in rec]) + bytes(8) for rec in records)
    fuzz.aspace.write(TABLE, table)
    keeper_pages = {va: bytes(m.ram.buf[pa:pa + 4096]) for va, (pa, _) in keep.aspace.pages.items()}
    k.run(until=m.now + 20_000_000)                     # never raises: that is the test
    assert all(len(c.fibers) <= k.MAX_FIBERS for c in k.containers.values())
    # the keeper's memory is untouched (it only sleeps; its stack changes, its code/data may not)
    for va, (pa, _) in keep.aspace.pages.items() if keep.exit_code is None else []:
        if va < 0x7F00_0000:
            assert bytes(m.ram.buf[pa:pa + 4096]) == keeper_pages[va]
    # the secret never reached the fuzzer's memory or the console
    if fuzz.exit_code is None:
        mem = b"".join(bytes(m.ram.buf[pa:pa + 4096]) for pa, _ in fuzz.aspace.pages.values())
        assert SECRET not in mem
    assert SECRET not in bytes(com1.data)
