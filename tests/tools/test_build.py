"""`vmk build` (tools/build.py): manifest -> image -> read back, programs that run, and every refusal in one line."""
from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import capstone
import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL,
    UC_X86_REG_RAX,
    UC_X86_REG_RDI,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)
from vmk.boot.vmkimage import (
    PAGE_SIZE,
    STACK_TOP,
    USER_BASE,
    ChannelSpec,
    Image,
    KernelSettings,
    Policy,
    SegFlag,
    read_image,
)
from vmk.kernel.syscall_table import Syscall
from vmk.tools import build as build_mod
from vmk.tools.build import BuildError, assemble, build, build_image

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed: C programs cannot be built")

HELLO_S = """\
# prints a line, then exits with 7
_start:
    mov eax, SYS_CONSOLE_WRITE
    lea rdi, [rip + msg]
    mov esi, msg_end - msg
    syscall
    cmp rax, ERR_EPIPE          # keystone-safe -EPIPE
    je failed
    mov edi, 7; mov eax, SYS_EXIT; syscall
failed: ud2
msg: .ascii "hello from asm; # kept\\n"
msg_end:
"""

HELLO_C = """\
#include "vmk.h"

static const char msg[] = "hello from C\\n";
static char buf[64];            /* .bss */
long counter = 40;              /* .data */

int main(void)
{
    for (unsigned i = 0; i < sizeof msg - 1; i++)
        buf[i] = msg[i];
    if (vmk_console_write(buf, sizeof msg - 1) == -EPIPE)
        return 1;
    return (int)(counter + 2);
}
"""

MANIFEST = """\
[kernel]
policy = "per-container"
timeslice_ns = "2ms"
channels = 16

[[program]]
name = "hello"
source = "hello.s"

[[channel]]
name = "jobs"
msg_size = 8

[[container]]
name = "init"
program = "hello"
memory = "128K"
stack = "16K"
priority = 3
ports = [0x3FF, "0x3F8-0x3FE", 0x2F8]
irqs = [4]
handles = [
    "console.rx",
    "console.tx",
    "jobs",
]

[[container]]
name = "worker"
program = "hello"
memory = 65536
autostart = false
handles = ["jobs"]
"""


def project(tmp_path: Path, manifest: str = MANIFEST, **files: str | bytes) -> Path:
    """Write the manifest and files (keyword hello__c means hello.c); hello.s is there unless given."""
    named = {name.replace("__", "."): text for name, text in files.items()}
    named.setdefault("hello.s", HELLO_S)
    for name, text in named.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "vmk.toml").write_text(manifest)
    return tmp_path / "vmk.toml"


def line_of(text: str, needle: str, after: str = "") -> int:
    """1-based line of the first `needle` after the first `after` (the oracle for FILE:LINE)."""
    start = text.index(after) if after else 0
    return text[:text.index(needle, start)].count("\n") + 1


def error(tmp_path: Path, manifest: str = MANIFEST, **files: str | bytes) -> str:
    path = project(tmp_path, manifest, **files)
    with pytest.raises(BuildError) as e:
        build_image(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def run(image: Image, container: str, max_insns: int = 10_000) -> tuple[int, bytes]:
    """Run a container's program on raw Unicorn with console_write and exit: (exit code, console bytes)."""
    spec = image.container(container)
    prog = image.program(spec.program)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    pages = sorted({p for s in prog.segments for p in range(s.vaddr // PAGE_SIZE, -(-s.end // PAGE_SIZE))})
    for p in pages:
        uc.mem_map(p * PAGE_SIZE, PAGE_SIZE)
    for s in prog.segments:
        uc.mem_write(s.vaddr, s.data)
    uc.mem_map(STACK_TOP - spec.stack, spec.stack)
    out = bytearray()
    status: list[int] = []

    def on_syscall(uc: Uc, _user) -> None:
        number = uc.reg_read(UC_X86_REG_RAX)
        if number == Syscall.CONSOLE_WRITE:
            out.extend(uc.mem_read(uc.reg_read(UC_X86_REG_RDI), uc.reg_read(UC_X86_REG_RSI)))
            uc.reg_write(UC_X86_REG_RAX, uc.reg_read(UC_X86_REG_RSI))
        elif number == Syscall.EXIT:
            status.append(uc.reg_read(UC_X86_REG_RDI))
            uc.emu_stop()
        else:
            uc.reg_write(UC_X86_REG_RAX, (-38) & (2**64 - 1))      # -ENOSYS

    uc.hook_add(UC_HOOK_INSN, on_syscall, None, 1, 0, UC_X86_INS_SYSCALL)
    uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    uc.emu_start(prog.entry, 0, count=max_insns)
    assert status, f"no exit; stopped at {uc.reg_read(UC_X86_REG_RIP):#x}"
    return status[0], bytes(out)


# ---------------------------------------------------------------------- success
def test_manifest_to_image_and_back(tmp_path: Path) -> None:
    path = project(tmp_path)
    out = tmp_path / "app.vmk"
    image = build(path, out)
    assert read_image(out) == image
    assert image.kernel == KernelSettings(Policy.PER_CONTAINER, 16, 0, 2_000_000, 4096)
    assert image.channels == (ChannelSpec("jobs", 8, 0),)
    init, worker = image.containers
    assert (init.name, init.program, init.memory, init.stack, init.priority) == ("init", "hello", 128 << 10, 16 << 10, 3)
    assert init.ports == ((0x2F8, 0x2F8), (0x3F8, 0x3FF))           # sorted and merged
    assert init.irqs == (4,) and init.autostart
    assert init.handles == ("console.rx", "console.tx", "jobs")
    assert (worker.memory, worker.stack, worker.priority, worker.autostart) == (64 << 10, 16 << 10, 1, False)
    assert image.boot_order() == (init,)
    hello = image.program("hello")
    assert hello.source == "hello.s"
    assert hello.entry == USER_BASE == hello.symbols["_start"]
    assert set(hello.symbols) == {"_start", "failed", "msg", "msg_end"}
    seg, = hello.segments
    assert seg.vaddr == USER_BASE and seg.flags == SegFlag.R | SegFlag.W | SegFlag.X
    assert seg.data[hello.symbols["msg"] - USER_BASE:hello.symbols["msg_end"] - USER_BASE] == \
        b"hello from asm; # kept\n"


def test_the_assembly_program_runs(tmp_path: Path) -> None:
    image = build_image(project(tmp_path))
    assert run(image, "init") == (7, b"hello from asm; # kept\n")


def test_assembly_uses_the_guest_constants_in_decimal(tmp_path: Path) -> None:
    """vmk.inc is predefined; decimal stays decimal (keystone's resolver switches radix to 16: not used here)."""
    prog = assemble("t", "_start: mov eax, SYS_SEND\nmov rax, [rbx + EVENT_OFF_RESULT]\nmov ecx, 32\n"
                         "cmp rax, ERR_ETIMEDOUT\n", "t.s")
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    text = [f"{i.mnemonic} {i.op_str}" for i in md.disasm(prog.segments[0].data, USER_BASE)]
    assert text == ["mov eax, 8", "mov rax, qword ptr [rbx + 0x20]", "mov ecx, 0x20", "cmp rax, -0x6e"]


def test_the_entry_is_the_first_byte_without_start() -> None:
    prog = assemble("t", "nop\nhere: hlt\n", "t.s")
    assert prog.entry == USER_BASE and prog.symbols == {"here": USER_BASE + 1}


def test_builds_are_deterministic(tmp_path: Path) -> None:
    path = project(tmp_path)
    build(path, tmp_path / "a.vmk")
    build(path, tmp_path / "b.vmk")
    assert (tmp_path / "a.vmk").read_bytes() == (tmp_path / "b.vmk").read_bytes()


@needs_gcc
def test_a_c_program_builds_against_vmk_h_and_runs(tmp_path: Path) -> None:
    manifest = MANIFEST.replace('source = "hello.s"', 'source = "hello.c"\ncflags = ["-DUNUSED=1"]')
    image = build_image(project(tmp_path, manifest, hello__c=HELLO_C))
    hello = image.program("hello")
    assert hello.source == "hello.c"
    assert {"_start", "main", "counter", "memcpy"} <= set(hello.symbols)
    assert hello.entry == hello.symbols["_start"] == USER_BASE
    assert [s.flags for s in hello.segments] == [SegFlag.R | SegFlag.X, SegFlag.R | SegFlag.W]
    assert hello.segments[1].memsz > len(hello.segments[1].data)      # .bss
    assert run(image, "init") == (42, b"hello from C\n")


@needs_gcc
def test_several_c_sources(tmp_path: Path) -> None:
    manifest = MANIFEST.replace('source = "hello.s"', 'source = ["main.c", "lib.c"]')
    image = build_image(project(tmp_path, manifest, main__c="int twice(int);\nint main(void) { return twice(21); }\n",
                                lib__c="int twice(int x) { return 2 * x; }\n"))
    assert image.program("hello").source == "main.c, lib.c"
    assert run(image, "init")[0] == 42


def make_elf(vaddr: int = USER_BASE, code: bytes = b"\xf4", *, cls: int = 2, etype: int = 2, machine: int = 62,
             phdrs: list[tuple[int, int, int, int, int]] | None = None) -> bytes:
    """A minimal ELF: header, program headers (type, flags, offset, vaddr, size), then `code`."""
    offset = 64 + 56 * (len(phdrs) if phdrs is not None else 1)
    phdrs = phdrs if phdrs is not None else [(1, 5, offset, vaddr, len(code))]
    ident = b"\x7fELF" + bytes([cls, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, vaddr, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    table = b"".join(struct.pack("<IIQQQQQQ", t, f, o, v, v, s, s, 0x1000) for t, f, o, v, s in phdrs)
    return header + table + code


def test_an_elf_program_is_taken_as_is(tmp_path: Path) -> None:
    manifest = MANIFEST.replace('source = "hello.s"', 'source = "hello.elf"')
    code = bytes.fromhex("bf05000000" "b800000000" "0f05")            # exit(5)
    image = build_image(project(tmp_path, manifest, hello__elf=make_elf(USER_BASE + 0x10, code)))
    hello = image.program("hello")
    assert hello.entry == USER_BASE + 0x10 and hello.segments[0].vaddr == USER_BASE + 0x10
    assert hello.segments[0].flags == SegFlag.R | SegFlag.X
    assert run(image, "init") == (5, b"")


# ---------------------------------------------------------------------- the CLI
def vmk(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmk.tools.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, check=False)


def test_cli_success_is_silent(tmp_path: Path) -> None:
    project(tmp_path)
    proc = vmk("build", "vmk.toml", "-o", "app.vmk", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert read_image(tmp_path / "app.vmk").containers[0].name == "init"
    proc = vmk("build", "vmk.toml", "-o", "app.vmk", "-v", cwd=tmp_path)
    size = (tmp_path / "app.vmk").stat().st_size
    assert proc.stdout == f"app.vmk: 1 programs, 2 containers (1 at boot), 1 channels, {size} bytes\n"


@pytest.mark.parametrize("edit, expected", [
    (("memory = 65536", "memory = 0"), "vmk: vmk.toml:{line}: container 'worker': memory 0 must be a positive "
                                       "multiple of the page size (4096)"),
    (("bogus", "bogus"), None),
])
def test_cli_errors_are_one_line_with_status_2(tmp_path: Path, edit, expected) -> None:
    manifest = MANIFEST.replace(*edit)
    project(tmp_path, manifest)
    if expected is None:                                # no such manifest
        proc = vmk("build", "nope.toml", "-o", "app.vmk", cwd=tmp_path)
        expected = "vmk: nope.toml: cannot read: No such file or directory"
    else:
        proc = vmk("build", "vmk.toml", "-o", "app.vmk", cwd=tmp_path)
        expected = expected.format(line=line_of(manifest, "memory = 0"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == expected + "\n"
    assert not (tmp_path / "app.vmk").exists()


def test_cli_unwritable_output(tmp_path: Path) -> None:
    project(tmp_path)
    proc = vmk("build", "vmk.toml", "-o", "no/such/dir/app.vmk", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "vmk: no/such/dir/app.vmk: cannot write: No such file or directory\n"


def test_cli_needs_an_output(tmp_path: Path) -> None:
    proc = vmk("build", "vmk.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "vmk: the following arguments are required: -o/--output (see 'vmk build --help')\n"


# ---------------------------------------------------------------------- manifest refusals: FILE:LINE
def test_toml_syntax_error_has_the_line(tmp_path: Path) -> None:
    manifest = MANIFEST.replace('msg_size = 8', 'msg_size = 8 8')
    assert error(tmp_path, manifest) == \
        f"{tmp_path}/vmk.toml:{line_of(manifest, 'msg_size')}: Expected newline or end of document after a " \
        "statement (column 14)"


def test_toml_error_at_the_end_of_the_file(tmp_path: Path) -> None:
    manifest = MANIFEST + 'extra = "unterminated\n'
    assert error(tmp_path, manifest) == \
        f"{tmp_path}/vmk.toml:{line_of(manifest, 'extra')}: Illegal character '\\n' (column 22)"


M = "{m}"       # stands for the manifest path in the expected messages


@pytest.mark.parametrize("old, new, needle, after, message", [
    # unknown keys and tables
    ('memory = 65536', 'memroy = 65536', "memroy", "", "unknown key 'memroy' in [[container]] (known: name, program, "
     "memory, stack, priority, ports, irqs, autostart, handles, max_fibers, fiber_stack)"),
    ('channels = 16', 'chanels = 16', "chanels", "", "unknown key 'chanels' in [kernel] (known: policy, channels, "
     "fiber_preemption_ns, timeslice_ns, console_ring, max_fibers, fiber_stack)"),
    ('msg_size = 8', 'msg_size = 8\nsize = 3', "size = 3", "", "unknown key 'size' in [[channel]] (known: name, "
     "msg_size, tag)"),
    ('[kernel]', '[kernal]', "[kernal]", "", "unknown table or key 'kernal' (known: [kernel], [[program]], "
     "[[channel]], [[container]])"),
    ('[[channel]]', '[[channels]]', "[[channels]]", "", "unknown table or key 'channels' (known: [kernel], "
     "[[program]], [[channel]], [[container]])"),
    ('[kernel]', 'version = 2\n[kernel]', "version", "", "unknown table or key 'version' (known: [kernel], "
     "[[program]], [[channel]], [[container]])"),
    ('[[program]]', '[program]', "[program]", "", "program must be an array of tables: [[program]]"),
    # required keys, types and units
    ('memory = 65536\n', '', '[[container]]', 'name = "init"\nprogram', "[[container]] 'worker' has no 'memory' "
     "(required)"),
    ('memory = "128K"', 'memory = "128"', 'memory = "128"', "", "memory must be a size such as \"256K\", \"1M\" or a "
     "number of bytes, not \"128\""),
    ('stack = "16K"', 'stack = "16 parsecs"', "stack", "", "stack must be a size such as \"256K\", \"1M\" or a number "
     "of bytes, not \"16 parsecs\""),
    ('timeslice_ns = "2ms"', 'timeslice_ns = "2"', "timeslice_ns", "", "timeslice_ns must be nanoseconds or a duration "
     "such as \"1ms\", not \"2\""),
    ('policy = "per-container"', 'policy = "fair"', "policy", "", "unknown policy 'fair' (use 'global' or "
     "'per-container')"),
    ('priority = 3', 'priority = "high"', "priority", "", "priority must be an integer, not \"high\""),
    ('irqs = [4]', 'irqs = 4', "irqs", "", "irqs must be a list of IRQ numbers, not 4"),
    ('autostart = false', 'autostart = "no"', "autostart", "", "autostart must be true or false, not \"no\""),
    ('handles = ["jobs"]', 'handles = "jobs"', 'handles = "jobs"', "", "handles must be a list of strings, not "
     "\"jobs\""),
    ('name = "jobs"', 'name = 3', "name = 3", "", "name must be a string, not 3"),
    ('0x2F8]', '"0x2F8-"]', "ports", "", "container 'init': bad port \"0x2F8-\": use a number or a \"FIRST-LAST\" "
     "range such as \"0x3F8-0x3FF\""),
    ('0x2F8]', '0x10000]', "ports", "", "container 'init': port 0x10000 is out of range (0..0xffff)"),
    ('0x2F8]', '"0x2FF-0x2F8"]', "ports", "", "container 'init': port range \"0x2FF-0x2F8\" is backwards"),
    # programs
    ('source = "hello.s"', 'source = "hello.txt"', "source", "", "program 'hello': source 'hello.txt' is not .s "
     "(assembly), .c (C) or .elf"),
    ('source = "hello.s"', 'source = "missing.s"', "source", "", "program 'hello': cannot read {d}/missing.s: no "
     "such file"),
    ('source = "hello.s"', 'source = ["a.s", "b.s"]', "source", "", "program 'hello': only .c sources can be listed "
     "together"),
    ('source = "hello.s"', 'source = "hello.s"\ncflags = ["-O3"]', "cflags", "", "program 'hello': cflags apply to .c "
     "sources only"),
    ('source = "hello.s"', 'source = "hello.s"\n\n[[program]]\nname = "hello"\nsource = "hello.s"', 'name = "hello"',
     "source = \"hello.s\"\n\n[[program]]", "two programs are named 'hello'"),
    # image invariants, mapped back to the manifest
    ('program = "hello"\nmemory = 65536', 'program = "helo"\nmemory = 65536', 'program = "helo"', "",
     "container 'worker': no program is named 'helo'"),
    ('    "jobs",\n]', '    "jbos",\n]', '"jbos"', "", "container 'init': handle 2 names 'jbos', which is neither "
     "console.rx, console.tx nor a declared channel"),
    ('memory = "128K"', 'memory = "16K"', 'memory = "16K"', "", "container 'init': memory 16K is too small: program "
     "'hello' takes 4K and the stack 16K"),
    ('memory = 65536', 'memory = 65536\nirqs = [3, 4]', "irqs = [3, 4]", "", "container 'worker': IRQ 4 is already "
     "granted to container 'init'"),
    ('irqs = [4]', 'irqs = [2]', "irqs", "", "container 'init': IRQ 2 is the PIC cascade and cannot be granted"),
    ('priority = 3', 'priority = 300', "priority", "", "container 'init': priority 300 is out of range (0..255)"),
    ('name = "worker"', 'name = "init"', 'name = "init"', ']\n\n[[container]]', "two containers are named 'init'"),
    ('stack = "16K"', 'stack = "16K"\nautostart = false', '[[container]]', "", "no container has autostart = true: "
     "nothing would run as pid 1"),
    ('msg_size = 8', 'msg_size = 8\n\n[[channel]]\nname = "spare"', 'name = "spare"', "", "channel 'spare' is declared "
     "but no container names it in its handles"),
    ('msg_size = 8', 'msg_size = 5000', "msg_size", "", "channel 'jobs': msg_size 5000 is out of range (0 = any size, "
     "or 1..4096)"),
    ('channels = 16', 'channels = 2', "channels", "", "the channel table holds 2 channels, fewer than the 3 created at "
     "boot (1 declared + console.rx and console.tx)"),
    ('timeslice_ns = "2ms"', 'timeslice_ns = 10', "timeslice_ns", "", "timeslice_ns 10 must be at least 1000"),
])
def test_manifest_refusals(tmp_path: Path, old: str, new: str, needle: str, after: str, message: str) -> None:
    assert old in MANIFEST
    manifest = MANIFEST.replace(old, new, 1)
    line = line_of(manifest, needle, after)
    expected = f"{tmp_path}/vmk.toml:{line}: " + message.replace("{d}", str(tmp_path))
    assert error(tmp_path, manifest) == expected


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"^.*/nope\.toml: cannot read: No such file or directory$"):
        build_image(tmp_path / "nope.toml")


# ---------------------------------------------------------------------- program refusals: SOURCE:LINE
@pytest.mark.parametrize("source, message", [
    ("_start:\n    nop\n    bogus rax\n", "3: invalid mnemonic (KS_ERR_ASM_MNEMONICFAIL): bogus rax"),
    ("nop\nnop\nmov rax, rbx, rcx\nnop\n", "3: invalid operand (KS_ERR_ASM_INVALIDOPERAND): mov rax, rbx, rcx"),
    ("_start:\n    jmp later\n    call nowhere\nlater: ret\n", "3: undefined symbol 'nowhere': call nowhere"),
    ("_start:\n    mov rax, [rbx + SYS_SENT]\n", "2: undefined symbol 'SYS_SENT': mov rax, [rbx + SYS_SENT]"),
    ("_start: nop\nnop ; a NASM comment\n", "2: invalid operand (KS_ERR_ASM_INVALIDOPERAND): nop ; a NASM comment "
     "(';' separates statements in keystone; comments start with '#')"),
    ("a: nop\nb: nop\na: nop\n", "3: invalid symbol redefined (KS_ERR_ASM_SYMBOL_REDEFINED): a: nop"),
    ("_start: nop\n.data\n.quad 1\n", "2: .data is not supported: a .s program is one flat section at 0x400000 "
     "(keystone 0.9.2 crashes on section directives)"),
    ('.include "vmk.inc"\n', "1: .include is not supported by keystone (vmk.inc is already predefined)"),
    ("_start:\n    cmp rax, -EPIPE\n", "2: keystone 0.9.2 mis-encodes this: a negated symbol becomes a memory operand; "
     "define the value first (.equ NAME, -SYMBOL) or use the ERR_* constants: cmp rax, -EPIPE"),
    ("_start:\n    mov rax, [rbx - EVENT_OFF_RESULT]\n", "2: keystone 0.9.2 mis-encodes this: subtracting a symbol "
     "inside [...] gets a wrong displacement; define the value first (.equ NAME, -SYMBOL) or use the ERR_* "
     "constants: mov rax, [rbx - EVENT_OFF_RESULT]"),
    ("nop # ok: café\nmov al, 'é'\n", "2: non-ASCII character 'é' outside a comment"),
    ("# nothing but comments\n", "assembles to no code"),
])
def test_assembly_errors_name_the_source_line(tmp_path: Path, source: str, message: str) -> None:
    got = error(tmp_path, hello__s=source)
    sep = ":" if message[0].isdigit() else ": "
    assert got == f"{tmp_path}/hello.s{sep}{message}"


def test_keystone_crashes_are_contained() -> None:
    """keystone 0.9.2 dies with SIGSEGV on '.text'; the build runs it in a child and survives."""
    result = build_mod._in_child(build_mod._ks_run, ".text\nnop\n", USER_BASE, False)
    assert not result.ok and result.error == "keystone crashed (SIGSEGV)"


def test_elf_refusals(tmp_path: Path) -> None:
    manifest = MANIFEST.replace('source = "hello.s"', 'source = "hello.elf"')
    d = tmp_path
    assert error(d, manifest, hello__elf=b"#!/bin/sh\n") == f"{d}/hello.elf: not an ELF file"
    assert error(d, manifest, hello__elf=make_elf(cls=1)) == \
        f"{d}/hello.elf: ELF32 for EM_X86_64: vmk programs are ELF64 x86-64"
    assert error(d, manifest, hello__elf=make_elf(etype=3)) == \
        f"{d}/hello.elf: position-independent (ET_DYN): link with -static -no-pie"
    assert error(d, manifest, hello__elf=make_elf(phdrs=[(1, 5, 0x4000, USER_BASE, 16)])) == \
        f"{d}/hello.elf: segment 0 (file offset 0x4000+0x10) runs past the end of the file (0x79 bytes): truncated?"
    assert error(d, manifest, hello__elf=make_elf(phdrs=[(3, 4, 0, 0, 0)])) == \
        f"{d}/hello.elf: dynamically linked: vmk programs are static (link with -static)"
    assert error(d, manifest, hello__elf=make_elf(0x100000)) == \
        f"{d}/vmk.toml:{line_of(manifest, 'source')}: program 'hello': segment 0 at 0x100000..0x100001 is outside " \
        "the user range 0x400000..0x7ffff000"


@needs_gcc
def test_c_compile_error_names_the_source_line(tmp_path: Path) -> None:
    manifest = MANIFEST.replace('source = "hello.s"', 'source = "hello.c"')
    bad = HELLO_C.replace("return (int)(counter + 2);", "return (int)(counter + 2)")
    assert error(tmp_path, manifest, hello__c=bad) == \
        f"{tmp_path}/hello.c:{line_of(bad, 'return (int)(counter')}: expected ';' before '}}' token"


@needs_gcc
def test_c_link_errors(tmp_path: Path) -> None:
    manifest = MANIFEST.replace('source = "hello.s"', 'source = "hello.c"')
    assert error(tmp_path, manifest, hello__c="int helper(void);\nint main(void) { return helper(); }\n") == \
        f"{tmp_path}/hello.c: link failed: undefined reference to `helper'"
    assert error(tmp_path, manifest, hello__c="int mian(void) { return 0; }\n") == \
        f"{tmp_path}/hello.c: link failed: undefined reference to `main' (a C program defines int main(void))"


def test_c_without_gcc(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(build_mod.shutil, "which", lambda name: None)
    manifest = MANIFEST.replace('source = "hello.s"', 'source = "hello.c"')
    assert error(tmp_path, manifest, hello__c=HELLO_C) == \
        f"{tmp_path}/hello.c: cannot compile C: gcc is not installed (or give a prebuilt .elf)"
