"""Guest workloads shared by the tests and the benchmarks (one source each).

``BUSY_S`` never blocks; ``ECHO_S`` copies console bytes (handle 0, rx) to the
console (handle 1, tx), one at a time.  :func:`busy_and_echo_manifest` is the
starvation scenario: two busy containers around an interrupt-driven echo
(tests/kernel/test_starvation.py; ``vmk bench kernel``, wakeup rows).
:func:`ping_pong_manifest` is two containers on two 8-byte channels (handles 0
and 1: "ping", "pong"; tests/kernel/test_switch_in_place.py, the bench's
two-container round trip)."""
from __future__ import annotations

__all__ = ["BUSY_S", "ECHO_S", "busy_and_echo_manifest", "ping_pong_manifest"]

BUSY_S = """
spin:
    inc rax
    jmp spin
"""

ECHO_S = """
loop:
    lea rsi, [rip + buf]
    mov rdi, 0
    mov rdx, 1
    mov rax, SYS_RECV
    syscall
    lea rsi, [rip + buf]
    mov rdi, 1
    mov rdx, 1
    mov rax, SYS_SEND
    syscall
    jmp loop
buf:
    .byte 0
"""


def busy_and_echo_manifest(policy: str, timeslice_ns: int, echo_priority: int | None = None) -> str:
    """The image manifest: programs ``busy.s`` and ``echo.s`` (write BUSY_S and ECHO_S
    there), containers busy1, busy2 (pids 1, 2) and echo (pid 3, on the console)."""
    priority = "" if echo_priority is None else f"priority = {echo_priority}\n"
    return f"""
[kernel]
policy = "{policy}"
channels = 8
timeslice_ns = {timeslice_ns}
[[program]]
name = "busy"
source = "busy.s"
[[program]]
name = "echo"
source = "echo.s"
[[container]]
name = "busy1"
program = "busy"
memory = "64K"
[[container]]
name = "busy2"
program = "busy"
memory = "64K"
[[container]]
name = "echo"
program = "echo"
memory = "64K"
{priority}handles = ["console.rx", "console.tx"]
"""


def ping_pong_manifest(source_a: str, source_b: str | None = None, memory: str = "256K") -> str:
    """Containers a (pid 1) and b (pid 2), each holding "ping" (handle 0) and "pong"
    (handle 1); b runs ``source_b``, or the same program as a if None."""
    b = "a" if source_b is None else "b"
    second = "" if source_b is None else f'[[program]]\nname = "b"\nsource = "{source_b}"\n'
    return f"""
[kernel]
channels = 16
[[program]]
name = "a"
source = "{source_a}"
{second}[[channel]]
name = "ping"
msg_size = 8
[[channel]]
name = "pong"
msg_size = 8
[[container]]
name = "a"
program = "a"
memory = "{memory}"
handles = ["ping", "pong"]
[[container]]
name = "b"
program = "{b}"
memory = "{memory}"
handles = ["ping", "pong"]
"""
