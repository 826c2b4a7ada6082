"""Block mode (CPU.block_mode, the default): block-level instruction counting
must give the same instruction counts, virtual times, interrupt counts and
registers as count mode (Unicorn's per-instruction counter) on the same guest,
wherever the run is cut."""
from __future__ import annotations

import pytest
from unicorn import UC_HOOK_BLOCK

from vmk.testing import Harness
from vmk.testing.baremetal import install_runtime
from vmk.machine.cpu import CPU, Reg, Stop
from vmk.tools.bench import LOOP, _timer_guest

def _run(block: bool, source: str, n: int, period: int = 1_000_000):
    h = Harness.from_asm(_timer_guest(period, source), mem=128 << 20)
    h.machine.cpu.block_mode = block
    install_runtime(h)
    r = h.run(max_instructions=n)
    cpu = h.machine.cpu
    return r.why, h.instructions, h.now, dict(h.irq_counts), cpu.rip, cpu._abcd.read()


@pytest.mark.parametrize("period", [1_000_000, 30_011])
def test_compute_loop_with_timer_same_both_ways(period):
    # 5-instruction blocks; the timer deadline falls inside a block: the last
    # stretch before it runs in count mode, so the interrupt lands on the same
    # instruction (same RIP and registers at the end, same interrupt count).
    off = _run(False, LOOP, 3_000_017, period)
    on = _run(True, LOOP, 3_000_017, period)
    assert on == off
    assert off[3].get(0x40, 0) >= 3


def test_block_mode_actually_counts_blocks():
    h = Harness.from_asm(_timer_guest(1_000_000, LOOP), mem=128 << 20)
    cpu = h.machine.cpu
    cpu.block_mode = True
    install_runtime(h)
    h.run(max_instructions=2_000_000)
    # Only a handful of distinct blocks (setup, loop, handler) were decoded.
    assert 0 < cpu._bc_misses.value < 64
    executed, why = cpu.run(10_000)
    assert executed == 10_000 and cpu._bc_counter.value > 9_000


@pytest.mark.parametrize("period", [7_777, 100_003, 2_003])
def test_same_state_wherever_the_run_is_cut(period):
    # The LAPIC timer's handler (install_runtime) reads the TSC and EOIs
    # through MMIO in the middle of its blocks: exact time and an exact stop
    # there are what block mode must get right.  Cut at arbitrary points.
    def state(block, n):
        h = Harness.from_asm(_timer_guest(period, LOOP), mem=128 << 20)
        h.machine.cpu.block_mode = block
        install_runtime(h)
        h.run(max_instructions=n)
        cpu = h.machine.cpu
        return h.instructions, h.now, dict(h.irq_counts), cpu.rip, cpu._abcd.read(), cpu.reg(Reg.RSP)
    for n in (1, 4_095, 4_097, 123_457, 1_000_003):
        assert state(True, n) == state(False, n), n


# ---------------------------------------------------------------- the last stretch of a slice
# A budget that runs out k instructions into a block: phase 1 stops before the
# block, and the CPU has QEMU translate that block cut after k instructions
# (CPUState.cflags_next_tb) instead of finishing in count mode, which flushed
# the translations twice per slice and left the hot loop freshly translated
# (half speed for the next 1-2 ms on the development host).

_LOOP_AT = 0x100000
_LOOP5 = """
loop:
    add rax, rbx
    imul rcx, rax
    xor rdx, rcx
    dec rbx
    jnz loop
    hlt
"""


def _loop_cpu(block: bool):
    from unicorn.x86_const import UC_X86_REG_RBX, UC_X86_REG_RSP

    from vmk.machine.cpu import CPU
    from vmk.testing import assemble

    cpu = CPU()
    cpu.block_mode = block
    cpu.uc.mem_map(0, 4 << 20)
    cpu.uc.mem_write(_LOOP_AT, assemble(_LOOP5, _LOOP_AT))
    cpu.uc.reg_write(UC_X86_REG_RSP, 0x80000)
    cpu.uc.reg_write(UC_X86_REG_RBX, 1_000_000)
    cpu.rip = _LOOP_AT
    return cpu


def _flush_counter(cpu):
    flushes = []
    real = cpu.uc.ctl_flush_tb
    cpu.uc.ctl_flush_tb = lambda: (flushes.append(1), real())[1]
    return flushes


def test_cflags_next_tb_offset_matches_this_unicorn():
    # The CPU writes CPUState.cflags_next_tb at a measured offset: it must read
    # -1 (no request) and a limit of k must cut the next translation to k
    # instructions, after which QEMU resets it.
    cpu = _loop_cpu(True)
    assert cpu._cflags_next_tb.value == 0xFFFF_FFFF
    assert cpu.run(5_000) == (5_000, Stop.COUNT)           # stops before a block: RIP on `add`
    assert cpu.rip == _LOOP_AT
    cpu._cflags_next_tb.value = 2
    cpu._bc_counter.value = 0
    cpu._bc_limit.value = 2
    cpu._bc_active.value = 1
    cpu._phase1 = cpu._running = True
    try:
        cpu._emu_start(0)
    finally:
        cpu._phase1 = cpu._running = False
        cpu._bc_active.value = 0
    assert cpu._bc_last_size.value == 7                    # add rax, rbx (3) + imul rcx, rax (4)
    assert cpu._bc_counter.value == 2 and cpu.rip == _LOOP_AT + 7
    assert cpu._cflags_next_tb.value == 0xFFFF_FFFF


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_slice_ending_inside_a_block_stops_where_count_mode_does(k):
    # Budgets that end k instructions into the 5-instruction loop block (and,
    # from there, inside the blocks that start in the middle of it): every
    # slice must retire exactly its budget and stop on the same instruction,
    # with the same registers, as count mode; and with no count-mode finish
    # (no translation flushed).  A cut one instruction long or short would be
    # refused by the block counter or stop short: count mode would finish the
    # slice and flush.

    block, count = _loop_cpu(True), _loop_cpu(False)
    flushes = _flush_counter(block)
    for n in (5_000 + k, 4_096 + k, 10_000 + 2 * k, 7_777, 4_099):
        assert block.run(n) == count.run(n) == (n, Stop.COUNT), n
        assert block.rip == count.rip, n
        assert [block.reg(r) for r in (Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX)] == \
               [count.reg(r) for r in (Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX)], n
    assert flushes == []
    assert not block._tb_count_mode
    assert block._cflags_next_tb.value == 0xFFFF_FFFF
    # The cut translations are cached beside the full ones: decodes stay
    # bounded by the (start, length) pairs inside one 5-instruction loop (15)
    # however many slices run.
    for _ in range(20):
        for n in (5_000 + k, 4_096 + k, 10_000 + 2 * k, 7_777, 4_099):
            assert block.run(n) == count.run(n) == (n, Stop.COUNT), n
            assert block.rip == count.rip, n
    assert block._bc_misses.value <= 15
    assert flushes == []


def test_timer_slices_end_without_flushing_translations():
    # The compute loop under a 100 us LAPIC timer (paging, the real interrupt
    # path): deadlines fall inside blocks; no slice end flushes the
    # translations (count mode did, twice per slice).  Two flushes are
    # allowed: the previous run's last slice, cut by max_instructions below
    # BLOCK_MIN, ran in count mode, so this run's first slice drops the count
    # hook and flushes (CPU._drop_count_hook; Unicorn's emu_start did that same
    # flush itself before, unseen here), and this run's last slice is such a
    # count-mode slice again.
    h = Harness.from_asm(_timer_guest(100_000, LOOP), mem=128 << 20)
    cpu = h.machine.cpu
    cpu.block_mode = True
    install_runtime(h)
    h.run(max_instructions=500_000)
    flushes = _flush_counter(cpu)
    irqs = h.irq_counts.get(0x40, 0)
    h.run(max_instructions=3_000_000)
    assert h.irq_counts.get(0x40, 0) - irqs >= 25
    assert len(flushes) <= 2


# Code rewritten in place, the block keeping its size (5 bytes) but not its
# instruction count: `add rax, 1; ret` (2) <-> `nop x4; ret` (5).  The guest
# flips the bytes every 50 calls, with the LAPIC timer running.
PATCHED_AT = 0x200000
ADD_RET = bytes.fromhex("4883c001c3909090")
NOPS_RET = bytes.fromhex("90909090c3909090")
SELF_MODIFYING = f"""
    mov rsi, {PATCHED_AT}
    mov rdi, {int.from_bytes(ADD_RET, 'little') ^ int.from_bytes(NOPS_RET, 'little')}
outer:
    mov r8, 50
inner:
    call rsi
    dec r8
    jnz inner
    xor qword ptr [rsi], rdi
    jmp outer
"""


def _smc_state(block: bool, n: int, second_block_hook: bool = False):
    h = Harness.from_asm(_timer_guest(30_011, SELF_MODIFYING), mem=128 << 20)
    h.machine.write_physical(PATCHED_AT, ADD_RET)
    h.machine.cpu.block_mode = block
    if second_block_hook:
        h.machine.cpu.uc.hook_add(UC_HOOK_BLOCK, lambda *args: None)
        h.machine.cpu.flush_translations()
    install_runtime(h)
    h.run(max_instructions=n)
    cpu = h.machine.cpu
    return h.instructions, h.now, dict(h.irq_counts), cpu.rip, cpu._abcd.read(), cpu.reg(Reg.RSP)


@pytest.mark.parametrize("n", [20_011, 300_007])
def test_code_rewritten_in_place_is_counted_as_it_is_now(n):
    # Before, block mode kept the first count of the 5-byte block (Linux's
    # alternatives patching made it drift 10 us from count mode).
    assert _smc_state(True, n) == _smc_state(False, n)


def test_rewritten_code_is_counted_right_with_a_second_block_hook():
    # A second block hook makes Unicorn call both through its dispatcher: the
    # counter's return address then names no translation, and it checks the
    # block's bytes on every entry instead.
    assert _smc_state(True, 300_007, second_block_hook=True) == _smc_state(False, 300_007)


def test_translations_flushed_are_checked_not_decoded_again(monkeypatch):
    # After a flush every block is translated again at a new place: its bytes
    # are hashed in C and, unchanged, keep their count (no decode in Python).
    decoded = []
    decode = CPU._decode_block

    def recorded(self, pc, size, cr3):
        decoded.append((pc, size, cr3))
        return decode(self, pc, size, cr3)
    monkeypatch.setattr(CPU, "_decode_block", recorded)
    h = Harness.from_asm(_timer_guest(100_003, LOOP), mem=128 << 20)
    cpu = h.machine.cpu
    install_runtime(h)
    h.run(max_instructions=200_000)
    before = set(decoded)
    decoded.clear()
    cpu.flush_translations()
    h.run(max_instructions=200_000)
    assert h.irq_counts[0x40] >= 3
    assert before and not before & set(decoded)     # only blocks of new shapes (cut elsewhere) were decoded


RDTSC_SAMPLES = """
    mov rdi, 0x300000
    mov r12, 40000
again:
    imul rbx, rbx, 3
    rdtsc
    mov dword ptr [rdi], eax
    mov dword ptr [rdi + 4], edx
    add rdi, 8
    dec r12
    jnz again
    hlt
"""


def _tsc_samples(block: bool, monkeypatch) -> tuple[list[int], int]:
    calls = []
    hook = CPU._hook_rdtsc

    def counted(self):
        calls.append(1)
        return hook(self)
    monkeypatch.setattr(CPU, "_hook_rdtsc", counted)
    h = Harness.from_asm(_timer_guest(100_003, RDTSC_SAMPLES), mem=128 << 20)
    h.machine.cpu.block_mode = block
    install_runtime(h)
    h.run(max_instructions=400_000)
    raw = h.machine.read_physical(0x300000, 8 * 40_000)
    return [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)], len(calls)


def test_rdtsc_in_c_reads_the_time_count_mode_reads(monkeypatch):
    # In a block-mode run RDTSC is answered in C (gw_rdtsc: the block counter's
    # instruction count, the clock's time for it); count mode asks the Python
    # hook.  Same values, with the LAPIC timer interrupting the loop.
    on, hooked_on = _tsc_samples(True, monkeypatch)
    off, hooked_off = _tsc_samples(False, monkeypatch)
    assert on == off and off[0] > 0 and sorted(off) == off
    assert hooked_off >= 40_000 and hooked_on < hooked_off // 2     # most of them in C
