"""A container that faults is ended with a one-line report; the others go on.

Containers are written in assembly (keystone, with the vmk.inc constants)."""
from __future__ import annotations

from pathlib import Path

from vmk.boot.vmkimage import read_image
from vmk.kernel.pid0 import VMKernel
from vmk.machine.pc import Machine, MachineConfig, Why
from vmk.testing.harness import SerialCapture
from vmk.testing.vmimage import TICKER_S, boot, build_programs
from vmk.tools.build import build

TICKER = TICKER_S

WILD_READ = """
    mov rbx, 0x900000000
    mov rax, [rbx]
    mov rax, SYS_EXIT
    syscall
"""

PORT_POKE = """
    mov dx, 0x3ff
    mov al, 0x5a
    out dx, al
    mov rdi, 0
    mov rax, SYS_EXIT
    syscall
"""

BAD_SYSCALLS = """
    mov rax, 9999
    syscall
    mov r13, rax
    mov rax, SYS_SEND
    mov rdi, 77
    mov rsi, 0
    mov rdx, 4
    syscall
    mov r14, rax
    mov rax, SYS_SEND
    mov rdi, 1
    mov rsi, 0xdead0000
    mov rdx, 4
    syscall
    mov r15, rax
    mov rdi, r13
    add rdi, r14
    add rdi, r15
    mov rax, SYS_EXIT
    syscall
"""


def make_image(tmp: Path, programs: dict[str, str], ports: dict[str, list[int]] | None = None) -> Path:
    return build_programs(tmp, programs, extra={n: f"ports = {p}" for n, p in (ports or {}).items()})


def run(image: Path, until: int = 100_000_000):
    return boot(image, until)


def test_faulting_container_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    r, k, out = run(make_image(tmp_path, {"ticker": TICKER, "wild": WILD_READ}))
    assert r.why == Why.EXIT
    assert out.count("tick\n") == 3                     # pid 1 ran to its end
    assert k.containers[1].exit_code == 42
    [report] = k.reports
    assert report.startswith("pid 2 (wild) killed: #PF page fault error 0x4 at RIP 0x40000a")
    assert "at address 0x900000000" in report
    assert report in out


def test_ungranted_port_is_a_fault_granted_port_works(tmp_path: Path) -> None:
    r, k, out = run(make_image(tmp_path, {"poke": PORT_POKE}))
    assert k.reports and "#GP general protection" in k.reports[0]
    assert k.machine.uarts[0].read(7, 1) != 0x5A
    r, k, out = run(make_image(tmp_path, {"poke": PORT_POKE}, ports={"poke": [0x3FF]}))
    assert not k.reports and k.containers[1].exit_code == 0
    assert k.machine.uarts[0].read(7, 1) == 0x5A


def test_bad_syscalls_get_errors_not_crashes(tmp_path: Path) -> None:
    r, k, out = run(make_image(tmp_path, {"bad": BAD_SYSCALLS}))
    assert r.why == Why.EXIT and not k.reports
    # -ENOSYS + -EBADF + -EFAULT
    assert k.containers[1].exit_code == -(38 + 9 + 14)


FIBER_BOMB = """
start:
    mov rax, SYS_FIBER_SPAWN
    lea rdi, [rip + start]
    mov rsi, 0x7fffe000
    mov rdx, 0
    syscall
    cmp rax, 0
    jge start
    mov rdi, rax
    mov rax, SYS_EXIT
    syscall
"""


def test_fiber_bomb_gets_eagain_and_the_kernel_survives(tmp_path: Path) -> None:
    r, k, out = run(make_image(tmp_path, {"bomb": FIBER_BOMB, "ticker": TICKER}), until=200_000_000)
    assert k.containers[1].exit_code == -11             # -EAGAIN from the fiber limit
    assert out.count("tick\n") == 3 and k.containers[2].exit_code == 42


COM2_DRIVER = """
    # COM2 (granted: ports 0x2F8-0x2FF, IRQ 3): 115200 8N1, FIFO, RX interrupts, OUT2
    mov dx, 0x2fb
    mov al, 0x80
    out dx, al
    mov dx, 0x2f8
    mov al, 1
    out dx, al
    mov dx, 0x2f9
    mov al, 0
    out dx, al
    mov dx, 0x2fb
    mov al, 3
    out dx, al
    mov dx, 0x2fa
    mov al, 7
    out dx, al
    mov dx, 0x2fc
    mov al, 0x0b
    out dx, al
    mov dx, 0x2f9
    mov al, 1
    out dx, al
    mov r12, 0
wait:
    lea rdi, [rip + ev]
    mov rsi, 1
    mov rax, SYS_SYNC
    syscall
drain:
    mov dx, 0x2fd
    in al, dx
    test al, 1
    jz wait
    mov dx, 0x2f8
    in al, dx
    lea rsi, [rip + buf]
    mov [rsi], al
    mov rdi, 1
    mov rdx, 1
    mov rax, SYS_SEND
    syscall
    inc r12
    cmp r12, 5
    jne drain
    mov rdi, 0
    mov rax, SYS_EXIT
    syscall
ev:
    .long EV_IRQ
    .long 0
    .quad 3
    .quad 0
    .quad 0
    .quad 0
buf:
    .quad 0
"""


def test_container_drives_its_granted_uart_through_irq_events(tmp_path: Path) -> None:
    (tmp_path / "drv.s").write_text(COM2_DRIVER)
    (tmp_path / "img.toml").write_text("""
[kernel]
channels = 8
[[program]]
name = "drv"
source = "drv.s"
[[container]]
name = "drv"
program = "drv"
memory = "64K"
ports = ["0x2F8-0x2FF"]
irqs = [3]
handles = ["console.rx", "console.tx"]
""")
    build(tmp_path / "img.toml", tmp_path / "img.img")
    com1 = SerialCapture()
    m = Machine(MachineConfig(serial=[com1]))
    k = VMKernel(m, read_image(tmp_path / "img.img"))
    m.clock.timer(lambda: m.uarts[1].receive(b"he")).arm(2_000_000)
    m.clock.timer(lambda: m.uarts[1].receive(b"llo")).arm(9_000_000)
    r = k.run(until=100_000_000)
    assert com1.data.decode() == "hello"
    assert r.why == Why.EXIT and k.containers[1].exit_code == 0 and not k.reports
    assert k.irq_sources[3].fires >= 2                  # at least one interrupt per burst


HEAP_TOUCH = """
    # write one byte per page across 8 heap pages, then read them back
    mov rbx, 0x401000
    mov rcx, 8
touch:
    mov byte ptr [rbx], 0x5a
    add rbx, 0x1000
    dec rcx
    jnz touch
    mov rbx, 0x401000
    movzx rdi, byte ptr [rbx + 0x7000]
    mov rax, SYS_EXIT
    syscall
"""

HEAP_HOG = """
    mov rbx, 0x401000
hog:
    mov byte ptr [rbx], 1
    add rbx, 0x1000
    jmp hog
"""


def test_heap_pages_are_mapped_on_first_touch(tmp_path: Path) -> None:
    r, k, out = run(make_image(tmp_path, {"heap": HEAP_TOUCH}))
    c = k.containers[1]
    assert c.exit_code == 0x5A and not k.reports


def test_a_container_past_its_memory_is_ended_with_a_report(tmp_path: Path) -> None:
    r, k, out = run(make_image(tmp_path, {"hog": HEAP_HOG, "ticker": TICKER}), until=200_000_000)
    [report] = k.reports
    assert report.startswith("pid 1 (hog) killed:")
    assert k.containers[2].exit_code == 42 and out.count("tick\n") == 3


def test_an_interrupt_raised_by_a_handler_is_taken_before_idling(tmp_path: Path) -> None:
    """With instant serial timing the UART's THRE interrupt is raised by the HAL's own
    top half (its THR writes): it must be taken at once, not after the next timer
    (the console then stalled with the fault report half sent)."""
    r, k, out = boot(make_image(tmp_path, {"ticker": TICKER, "wild": WILD_READ}), serial_timing="instant")
    assert r.why == Why.EXIT, (r.why, r.message)
    assert out.count("tick\n") == 3
    [report] = k.reports
    assert report + "\n" in out
