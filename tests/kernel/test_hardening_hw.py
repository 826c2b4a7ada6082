"""Machine/HAL hardening against containers: wild jumps, software interrupts, W^X, out of memory.

Each case is a container that does one bad thing next to one that keeps
working; the bad one must be ended with its one-line report (VMKernel.fault)
and the machine must go on.  Guests are assembly (keystone, vmk.inc names) or
C against vmk.h (gcc).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from vmk.boot.vmkimage import SegFlag
from vmk.hal.aspace import KERNEL_RESERVED
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Why
from vmk.testing.vmimage import TICKER_S, boot, build_programs

MS = 1_000_000
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="a C guest (gcc needed)")

TICKER = TICKER_S


def _image(tmp: Path, programs: dict[str, str], memory: str = "128K", extra: dict[str, str] | None = None) -> Path:
    return build_programs(tmp, programs, memory=memory, extra=extra)


def _run(image: Path, until: int = 100 * MS, mem: int | None = None):
    return boot(image, until, **({"mem": mem} if mem else {}))


def _one_report(k: VMKernel, out: str) -> str:
    [report] = k.reports
    assert f"vmk: {report}\n" in out
    return report


def _ticker_went_on(r, k: VMKernel, out: str, pid: int = 2) -> None:
    assert r.why == Why.EXIT
    assert out.count("tick\n") == 3 and k.containers[pid].exit_code == 42


# ---------------------------------------------------------------------------- wild instruction fetches
# Before the fix each of these spun for ever inside emu_start (the fetch fault came
# before the instruction's count hook): no report, no time limit.
@pytest.mark.parametrize("src, rip, addr", [
    ("mov rbx, 0x900000000\ncall rbx", 0x9_0000_0000, 0x9_0000_0000),        # unmapped
    ("xor eax, eax\njmp rax", 0, 0),                                          # address 0
    ("mov rbx, 0xffff800000000000\njmp rbx", 0xFFFF_8000_0000_0000, 0xFFFF_8000_0000_0000),   # "kernel"
    ("mov rbx, 0x500000\njmp rbx", 0x50_0000, 0x50_0000),                    # heap, not touched yet
])
def test_a_wild_jump_is_reported_as_an_instruction_fetch_fault(tmp_path: Path, src: str, rip: int,
                                                                addr: int) -> None:
    r, k, out = _run(_image(tmp_path, {"wild": src, "ticker": TICKER}))
    report = _one_report(k, out)
    assert report == (f"pid 1 (wild) killed: #PF page fault error 0x14 at RIP {rip:#x} "
                      f"at address {addr:#x} (instruction fetch)")
    assert k.containers[1].exit_code == -128 - 14
    _ticker_went_on(r, k, out)


def test_a_jump_to_a_non_canonical_address_is_gp(tmp_path: Path) -> None:
    r, k, out = _run(_image(tmp_path, {"wild": "mov rbx, 0x0000900000000000\njmp rbx", "ticker": TICKER}))
    report = _one_report(k, out)
    # Quirk (Unicorn/QEMU): RIP is the target, where hardware would name the jmp.
    assert report == "pid 1 (wild) killed: #GP general protection error 0x0 at RIP 0x900000000000"
    _ticker_went_on(r, k, out)


def test_the_time_limit_still_ends_a_run_with_a_wild_jump(tmp_path: Path) -> None:
    """The wild one dies at once; a spinning neighbour is stopped by the limit, not the host."""
    r, k, out = _run(_image(tmp_path, {"wild": "xor eax, eax\ncall rax", "spin": "l:\njmp l"}), until=5 * MS)
    assert r.why == Why.TIME_LIMIT and len(k.reports) == 1


# ---------------------------------------------------------------------------- software interrupts
@pytest.mark.parametrize("vector", [0x80, 0x20, 0x24, 0x41, 0x0E, 0x02])
def test_int_n_from_ring3_is_gp_with_the_idt_error_code(tmp_path: Path, vector: int) -> None:
    r, k, out = _run(_image(tmp_path, {"intn": f"nop\nint {vector:#x}\nmov rax, SYS_EXIT\nsyscall",
                                        "ticker": TICKER}))
    report = _one_report(k, out)
    assert report == (f"pid 1 (intn) killed: #GP general protection error {(vector << 3) | 2:#x} "
                      f"at RIP 0x400001 (INT {vector:#x}: no gate for ring 3)")      # the INT's own address
    assert k.containers[1].exit_code == -128 - 13
    # no top half, no EOI: every vector >= 32 the HAL handled came from the interrupt controller
    assert sum(n for v, n in k.hal.irq_counts.items() if v >= 32) == k.machine.interrupts_taken
    _ticker_went_on(r, k, out)


# Syncs on IRQ 1 (granted to it) or a 1 ms timeout, three times, printing which
# arm fired; exits 0 if the IRQ never fired.
IRQ_WAITER = r"""
#include "vmk.h"
int main(void)
{
    for (int i = 0; i < 3; i++) {
        struct vmk_event ev[2] = {
            {.kind = EV_IRQ, .handle = 1, .result = -12345},
            {.kind = EV_TIMEOUT, .arg0 = 1000000, .result = -12345},
        };
        vmk_sync(ev, 2);
        if (ev[0].result != -12345)
            vmk_exit(99);
        vmk_send(1, "alive\n", 6);
    }
    return 0;
}
"""


@needs_gcc
def test_int_0x41_does_not_fire_irq1_for_another_container(tmp_path: Path) -> None:
    img = _image(tmp_path, {"waiter": IRQ_WAITER, "faker": "int 0x41\nint 0x41\nmov rax, SYS_EXIT\nsyscall"},
                 extra={"waiter": "irqs = [1]"})
    r, k, out = _run(img)
    assert r.why == Why.EXIT
    report = _one_report(k, out)
    assert report == ("pid 2 (faker) killed: #GP general protection error 0x20a at RIP 0x400000 "
                      "(INT 0x41: no gate for ring 3)")
    assert k.irq_sources[1].fires == 0
    assert out.count("alive\n") == 3 and k.containers[1].exit_code == 0


@pytest.mark.parametrize("src, what, rip", [
    ("nop\nint3", "#BP breakpoint", 0x400002),            # CC: a trap, RIP after it
    ("nop\nint 3", "#BP breakpoint", 0x400003),           # CD 03 through the same DPL-3 gate
    ("nop\nint 4", "exception 4", 0x400003),              # #OF's gate is DPL 3 too
    ("nop\n.byte 0xce", "#UD invalid opcode", 0x400001),  # INTO does not exist in 64-bit mode
])
def test_int3_and_the_overflow_vector_stay_traps(tmp_path: Path, src: str, what: str, rip: int) -> None:
    r, k, out = _run(_image(tmp_path, {"trap": src, "ticker": TICKER}))
    assert _one_report(k, out) == f"pid 1 (trap) killed: {what} at RIP {rip:#x}"
    _ticker_went_on(r, k, out)


# ---------------------------------------------------------------------------- W^X
WRITE_TEXT = r"""
#include "vmk.h"
static const char greeting[] = "hello";
void victim(void) {}
int main(void)
{
    volatile char *p = %s;
    *p = 0x55;
    vmk_send(1, "wrote\n", 6);
    return 0;
}
"""

EXEC_FROM = r"""
#include "vmk.h"
unsigned char in_data[16] = {0xb8, 7, 0, 0, 0, 0xc3};     /* mov eax, 7; ret */
int main(void)
{
    unsigned char on_stack[16] = {0xb8, 7, 0, 0, 0, 0xc3};
    unsigned char *code = %s;
    for (int i = 0; i < 6; i++)
        code[i] = in_data[i];
    long r = ((long (*)(void))code)();
    vmk_send(1, "ran\n", 4);
    return (int)r + on_stack[15];
}
"""


def _segment(k: VMKernel, name: str, flags: SegFlag):
    [seg] = [s for s in k.image.program(name).segments if s.flags == flags]
    return seg


@needs_gcc
@pytest.mark.parametrize("target", ["(volatile char *)victim", "(volatile char *)greeting"])
def test_a_c_guest_that_writes_its_text_or_rodata_is_killed(tmp_path: Path, target: str) -> None:
    r, k, out = _run(_image(tmp_path, {"scribbler": WRITE_TEXT % target, "ticker": TICKER}))
    report = _one_report(k, out)
    assert report.startswith("pid 1 (scribbler) killed: #PF page fault error 0x7 at RIP 0x")
    assert report.endswith("(write to a read-only page)")
    addr = int(report.split(" at address ")[1].split()[0], 16)
    text = _segment(k, "scribbler", SegFlag.R | SegFlag.X)
    assert text.vaddr <= addr < text.end
    assert "wrote" not in out
    _ticker_went_on(r, k, out)


@needs_gcc
@pytest.mark.parametrize("where", ["on_stack", "in_data", "heap"])
def test_a_c_guest_that_executes_its_stack_data_or_heap_is_killed(tmp_path: Path, where: str) -> None:
    src = EXEC_FROM % ("(unsigned char *)0x600000" if where == "heap" else where)
    r, k, out = _run(_image(tmp_path, {"jit": src, "ticker": TICKER}, memory="4M"))
    report = _one_report(k, out)
    assert report.startswith("pid 1 (jit) killed: #PF page fault error 0x15 at RIP 0x")
    assert report.endswith("(execute of a no-execute page)")
    rip = int(report.split(" at RIP ")[1].split()[0], 16)
    addr = int(report.split(" at address ")[1].split()[0], 16)
    assert rip == addr                                          # the fetch itself faulted
    if where == "in_data":
        data = _segment(k, "jit", SegFlag.R | SegFlag.W)
        assert data.vaddr <= addr < data.end
    elif where == "on_stack":
        assert 0x7FFF_0000 <= addr < 0x7FFF_F000
    else:
        assert addr == 0x600000
    assert "ran" not in out
    _ticker_went_on(r, k, out)


@needs_gcc
def test_code_still_runs_and_data_is_still_writable(tmp_path: Path) -> None:
    src = r"""
#include "vmk.h"
int counter = 40;
int main(void) { counter += 2; vmk_send(1, "ok\n", 3); return counter; }
"""
    r, k, out = _run(_image(tmp_path, {"plain": src}))
    assert not k.reports and out == "ok\n" and k.containers[1].exit_code == 42


def test_a_flat_program_stays_rwx(tmp_path: Path) -> None:
    """A keystone program is one segment; it may patch itself (documented: build.py)."""
    src = "lea rbx, [rip + patch]\nmov byte ptr [rbx + 1], 9\npatch:\nmov edi, 1\nmov rax, SYS_EXIT\nsyscall"
    r, k, out = _run(_image(tmp_path, {"selfmod": src}))
    assert not k.reports and k.containers[1].exit_code == 9


# ---------------------------------------------------------------------------- out of memory
HEAP_HOG = """
    mov rbx, 0x401000
hog:
    mov byte ptr [rbx], 1
    add rbx, 0x1000
    jmp hog
"""

STACK_HOG = """
deeper:
    call deeper
"""


def test_a_heap_access_beyond_the_heap_is_out_of_memory(tmp_path: Path) -> None:
    r, k, out = _run(_image(tmp_path, {"hog": HEAP_HOG, "ticker": TICKER}, memory="64K"))
    layout = k.image.layout(k.image.container("hog"))
    end = layout.heap_base + layout.heap_size
    assert _one_report(k, out) == (f"pid 1 (hog) killed: out of memory (limit 64 KiB): page fault at address "
                                   f"{end:#x} beyond its heap ({layout.heap_base:#x}..{end:#x}), RIP 0x400007")
    assert k.containers[1].exit_code == -12
    _ticker_went_on(r, k, out)


def test_a_stack_that_grows_below_its_mapping_is_a_stack_overflow(tmp_path: Path) -> None:
    r, k, out = _run(_image(tmp_path, {"deep": STACK_HOG, "ticker": TICKER}, memory="64K"))
    layout = k.image.layout(k.image.container("deep"))
    assert _one_report(k, out) == ("pid 1 (deep) killed: stack overflow (stack 16 KiB): page fault at address "
                                   f"{layout.stack_bottom - 8:#x} below the stack at {layout.stack_bottom:#x}, "
                                   "RIP 0x400000")
    assert k.containers[1].exit_code == -12
    _ticker_went_on(r, k, out)


def test_demand_paging_out_of_machine_frames_is_out_of_memory(tmp_path: Path) -> None:
    """The machine has exactly the container's memory: its page tables take frames
    the heap then misses."""
    img = _image(tmp_path, {"hog": HEAP_HOG}, memory="256K")
    r, k, out = _run(img, mem=KERNEL_RESERVED + (256 << 10))
    report = _one_report(k, out)
    assert report.startswith("pid 1 (hog) killed: out of memory (limit 256 KiB), the machine's RAM is "
                             "exhausted: page fault at address 0x")
    assert report.endswith(" in its heap, RIP 0x400007")
    assert k.containers[1].exit_code == -12
