"""The VM-mode HAL on the real machine, with a recording stand-in for pid 0."""
from __future__ import annotations

from vmk.hal.aspace import PAGE, USER_CODE_BASE, USER_STACK_TOP, AddressSpace
from vmk.hal.context import GuestContext
from vmk.hal.vm import Hal, Vector
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.testing import assemble
from vmk.testing.harness import SerialCapture


class FakeKernel:
    def __init__(self, hal: Hal) -> None:
        self.hal = hal
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.faults: list[tuple[int, int | None, int, int]] = []
        self.irqs: list[tuple[str, int]] = []

    def syscall(self, nr, args):
        self.calls.append((nr, args))
        if nr == 0:                      # exit: blocks forever
            self.hal.machine.stop("exit")
            return None
        if nr == 16:                     # console_write(buf, len)
            data = self.aspace.read(args[0], args[1])
            self.hal.console_write(data)
            return args[1]
        if nr == 12:
            return self.hal.machine.now
        return -38

    def switch_in_place(self):
        return False                     # blocking always goes round the run loop

    def fault(self, vector, error_code, cr2, rip):
        self.faults.append((vector, error_code, cr2, rip))
        self.hal.machine.stop("fault")

    def interrupt(self, source):
        self.irqs.append((source, self.hal.machine.now))


def boot(src: str, ports=frozenset()):
    com1 = SerialCapture()
    m = Machine(MachineConfig(mem=16 << 20, serial=[com1]))
    hal = Hal(m)
    k = FakeKernel(hal)
    hal.start(k)
    hal.granted_ports = frozenset(ports)
    a = AddressSpace(hal.frames, 1 << 20)
    code = assemble(src, USER_CODE_BASE)
    a.map(USER_CODE_BASE, (len(code) + PAGE - 1) & ~(PAGE - 1), writable=False, executable=True)
    a.write(USER_CODE_BASE, code, force=True)
    a.map(USER_STACK_TOP - 4 * PAGE, 4 * PAGE)
    a.map(0x600000, PAGE)
    a.write(0x600000, b"hello from ring 3\n")
    k.aspace = a
    hal.switcher.load(GuestContext.start(USER_CODE_BASE, USER_STACK_TOP), a.cr3)
    return m, hal, k, com1


def test_syscalls_complete_inline_and_block() -> None:
    m, hal, k, com1 = boot("""
        mov rax, 12
        syscall
        mov r12, rax
        mov rdi, 0x600000
        mov rsi, 18
        mov rax, 16
        syscall
        mov rdi, 7
        mov rax, 0
        syscall
        ud2
    """)
    r = m.run(until=10_000_000)
    assert r.why == Why.STOPPED and r.message == "exit"
    assert [c[0] for c in k.calls] == [12, 16, 0]
    assert k.calls[2][1][0] == 7
    assert not k.faults                                   # the ud2 after exit never ran
    hal.idle()                                              # what pid 0 does with nothing to run
    m.run(until=m.now + 5_000_000)                          # THRE interrupts drain the queue
    assert com1.data.decode() == "hello from ring 3\n"


def test_fault_reaches_the_kernel_with_its_details() -> None:
    m, hal, k, _ = boot("mov rbx, 0x900000\n mov rax, [rbx]\n ud2")
    m.run(until=1_000_000)
    assert k.faults == [(14, 4, 0x900000, USER_CODE_BASE + 7)]


def test_ports_only_when_granted() -> None:
    src = "mov dx, 0x3ff\n mov al, 0x5a\n out dx, al\n mov rax, 0\n syscall"
    m, hal, k, _ = boot(src)
    m.run(until=1_000_000)
    assert k.faults and k.faults[0][:2] == (13, 0)
    assert m.uarts[0].read(7, 1) != 0x5A
    m, hal, k, _ = boot(src, ports={0x3FF})
    m.run(until=1_000_000)
    assert not k.faults and m.uarts[0].read(7, 1) == 0x5A


def test_tickless_timer_and_uart_rx_top_half() -> None:
    m, hal, k, com1 = boot("l: pause\n jmp l")
    hal.set_deadline(250_000)
    m.uarts[0].receive(b"abc")
    m.run(until=1_000_000)
    timer = [t for s, t in k.irqs if s == "timer"]
    assert timer == [250_000]
    assert hal.rx.take(10) == b"abc"
    assert hal.irq_counts[Vector.COM1] >= 1


def test_start_silences_the_pit_the_firmware_left_running() -> None:
    """The firmware leaves 8254 counter 0 at 18.2 Hz; pid 0 times with the LAPIC only,
    so the HAL stops it: an idle CPU then sleeps until the next real deadline."""
    m = Machine(MachineConfig(mem=16 << 20))
    hal = Hal(m)
    hal.outb(0x43, 0x36)                 # counter 0, LSB/MSB, mode 3, as the BIOS leaves it
    hal.outb(0x40, 0)
    hal.outb(0x40, 0)
    assert m.clock.next_deadline() is not None
    hal.start(FakeKernel(hal))
    assert m.clock.next_deadline() is None
