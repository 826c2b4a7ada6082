"""Several CPUs: machine construction, INIT-SIPI-SIPI into real mode on a UC_MODE_64
instance, the context offset of EFER, the round-robin on one clock."""
from __future__ import annotations

import struct

import pytest

from vmk.machine.cpu import CPU
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.machine.smp import CTX_EFER, ApState, efer_from_context
from vmk.testing import Harness
from vmk.testing.harness import assemble

# 16-bit code the STARTUP vector 0x07 points at (0x7000), hand-encoded:
# mov ax, cs; mov [0x502], ax; mov ax, 0x1234; mov [0x500], ax; mov eax, cr0; mov [0x504], eax; cli; hlt
AP_STUB = bytes.fromhex("8cc8" "a30205" "b83412" "a30005" "0f20c0" "66a30405" "fa" "f4")

BSP = """
    mov rdi, 0xFEE00000
    mov eax, 0x01000000
    mov dword ptr [rdi+0x310], eax
    mov eax, 0x4500
    mov dword ptr [rdi+0x300], eax
    mov eax, 0x4607
    mov dword ptr [rdi+0x300], eax
    mov dword ptr [rdi+0x300], eax
    mov rsi, 0x500
wait:
    mov ax, word ptr [rsi]
    cmp ax, 0x1234
    jne wait
    cli
    hlt
"""


def test_one_cpu_is_the_machine_of_before() -> None:
    m = Machine(MachineConfig())
    assert m.processors == [] and m.cpus == [m.cpu] and m.apic_bus is None
    assert m.cpu.apic_id == 0 and m.cpu.bsp


@pytest.mark.parametrize("n", [0, 256])
def test_cpu_count_is_validated(n: int) -> None:
    with pytest.raises(ValueError, match="1 to 255"):
        Machine(MachineConfig(cpus=n, mem=16 << 20))


def test_cpus_and_apics() -> None:
    m = Machine(MachineConfig(cpus=3, mem=16 << 20))
    assert [(c.apic_id, c.bsp) for c in m.cpus] == [(0, True), (1, False), (2, False)]
    assert [p.state for p in m.processors] == [ApState.RUNNING, ApState.WAIT_FOR_SIPI, ApState.WAIT_FOR_SIPI]
    assert [a.apic_id for a in m.lapics] == [0, 1, 2]
    # RAM is shared: a byte written through one Unicorn is seen by the others.
    m.cpus[2].uc.mem_write(0x1234, b"\x5a")
    assert m.cpus[1].uc.mem_read(0x1234, 1) == b"\x5a" and m.ram.buf[0x1234] == 0x5A


def test_efer_context_offset() -> None:
    cpu = CPU()
    cpu.uc.msr_write(0xC000_0080, 0x501)
    assert efer_from_context(cpu) == 0x501
    assert struct.unpack_from("<Q", bytes(cpu.uc.context_save()), CTX_EFER)[0] == 0x501


def test_init_sipi_starts_an_ap_in_real_mode() -> None:
    h = Harness.from_asm(BSP, cpus=2)
    m = h.machine
    m.write_physical(0x7000, AP_STUB)
    r = m.run(until=10_000_000)
    assert r.why == Why.DEAD                     # both CPUs halted with IF=0
    ap = m.processors[1]
    assert ap.state is ApState.RUNNING and ap.sipis == 1 and ap.cpu.halted
    assert struct.unpack_from("<HHI", m.ram.buf, 0x500) == (0x1234, 0x0700, 0x6000_0010)   # CS, CR0 after INIT
    assert ap.cpu.rip == len(AP_STUB)             # IP, from CS base 0x7000
    assert efer_from_context(ap.cpu) == 0
    assert m.instructions == sum(p.instructions for p in m.processors)


def test_an_ap_without_sipi_never_runs() -> None:
    h = Harness.from_asm("cli\nhlt", cpus=4)
    r = h.machine.run(until=1_000_000)
    assert r.why == Why.DEAD
    assert [p.instructions for p in h.machine.processors] == [2, 0, 0, 0]


def test_round_robin_turns_share_one_clock() -> None:
    # Two CPUs spinning: virtual time advances with the instructions of both.
    h = Harness.from_asm(BSP.replace("cmp ax, 0x1234", "cmp ax, 0x4321"), cpus=2, smp_quantum_ns=1000)
    m = h.machine
    m.write_physical(0x7000, bytes.fromhex("ebfe"))            # the AP spins: jmp $
    r = m.run(until=200_000)
    assert r.why == Why.TIME_LIMIT
    a, b = (p.instructions for p in m.processors)
    assert a + b == m.instructions == m.now                    # 1 ns per instruction, one clock
    assert abs(a - b) <= 1000 + 20                             # 1 us turns, alternating


def test_snapshot_restores_every_cpu() -> None:
    h = Harness.from_asm(BSP, cpus=2)
    m = h.machine
    m.write_physical(0x7000, AP_STUB)
    snap = m.snapshot()
    first = m.run(until=10_000_000)
    after = (m.instructions, m.now, [p.instructions for p in m.processors], m.processors[1].cpu.rip)
    m.restore(snap)
    assert m.processors[1].state is ApState.WAIT_FOR_SIPI and m.processors[1].sipis == 0
    again = m.run(until=10_000_000)
    assert again.why == first.why
    assert (m.instructions, m.now, [p.instructions for p in m.processors], m.processors[1].cpu.rip) == after


# CPUID leaf 1 into [rdi], then again with CR4.OSXSAVE set into [rdi+16]; then start CPU 1 at AP_CPUID.
CPUID_BSP = """
    mov rdi, 0x600
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov dword ptr [rdi], eax
    mov dword ptr [rdi+4], ebx
    mov dword ptr [rdi+8], ecx
    mov dword ptr [rdi+12], edx
    mov rax, cr4
    or rax, 0x40000
    mov cr4, rax
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov dword ptr [rdi+16], eax
    mov dword ptr [rdi+20], ebx
    mov dword ptr [rdi+24], ecx
    mov dword ptr [rdi+28], edx
""" + BSP.replace("cmp ax, 0x1234", "cmp ax, 0x5678")

# The AP, in real mode at 0x7000: CPUID leaf 1 into 0x620.., then 0x5678 at 0x500.
AP_CPUID = """
    xor ax, ax
    mov ds, ax
    mov di, 0x620
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov dword ptr [di], eax
    mov dword ptr [di+4], ebx
    mov dword ptr [di+8], ecx
    mov dword ptr [di+12], edx
    mov word ptr [0x500], 0x5678
    cli
    hlt
"""


def _leaf1(m: Machine, at: int, n: int = 2) -> list[tuple[int, int, int, int]]:
    return [struct.unpack_from("<4I", m.ram.buf, at + 16 * k) for k in range(n)]


def test_cpuid_leaf1_is_the_one_cpu_machines_but_the_apic_id() -> None:
    # Every CPU of an SMP machine reports the features of the one-CPU machine's CPU: no
    # RDRAND (its decoder raises #UD: Linux's KASLR executed it and triple-faulted) and
    # OSXSAVE = the executing CPU's CR4.OSXSAVE (SDM vol. 2A, CPUID); EBX[31:24] is its APIC ID.
    one = Harness.from_asm(CPUID_BSP)
    one.machine.run(until=100_000)                # (then it waits for an AP it does not have)
    want = _leaf1(one.machine, 0x600)
    assert not want[0][2] & (1 << 30) and not want[0][2] & (1 << 27) and want[1][2] & (1 << 27)
    assert want[0][1] >> 24 == 0
    h = Harness.from_asm(CPUID_BSP, cpus=2)
    m = h.machine
    m.write_physical(0x7000, assemble(AP_CPUID, 0x7000, 16))
    assert m.run(until=10_000_000).why == Why.DEAD
    assert _leaf1(m, 0x600) == want
    (a, b, c, d), = _leaf1(m, 0x620, 1)
    assert (a, b & 0x00FF_FFFF, c, d) == (want[0][0], want[0][1] & 0x00FF_FFFF, want[0][2], want[0][3])
    assert b >> 24 == 1


# The AP at 0x7000 (CS base 0x7000 in real mode): RDMSR IA32_APIC_BASE (emulated, machine/insnemu.py)
# into 0x640, WRMSR it back, then 0x5678 at 0x500.  Linux's trampoline does RDMSR/WRMSR in real mode.
AP_MSR = """
    xor ax, ax
    mov ds, ax
    mov di, 0x640
    mov ecx, 0x1b
    rdmsr
    mov dword ptr [di], eax
    mov dword ptr [di+4], edx
    wrmsr
    mov word ptr [di+8], 0x4242
    mov word ptr [0x500], 0x5678
    cli
    hlt
"""


def test_emulated_msr_in_real_mode_with_a_cs_base() -> None:
    # An instruction vmk emulates at a code hook (RDMSR/WRMSR) in a new block restarts the
    # block and skips the instruction at RIP = linear address - CS base: with the linear
    # address as RIP the AP ran at 0x7000 + 0x7000 + IP (Linux's AP halted in its trampoline).
    h = Harness.from_asm(CPUID_BSP, cpus=2)
    m = h.machine
    m.write_physical(0x7000, assemble(AP_MSR, 0, 16))
    assert m.run(until=10_000_000).why == Why.DEAD
    assert struct.unpack_from("<IIH", m.ram.buf, 0x640) == (0xFEE0_0800, 0, 0x4242)   # EN, not BSP
    assert m.processors[1].cpu.rip == len(assemble(AP_MSR, 0, 16))
