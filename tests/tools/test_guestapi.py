"""vmk.h and vmk.inc (tools/guestapi.py): up to date, faithful to the syscall table, usable by gcc and keystone."""
from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_INS_SYSCALL,
    UC_X86_REG_R10,
    UC_X86_REG_RAX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
)
from vmk.boot.vmkimage import STACK_TOP, USER_BASE
from vmk.kernel.syscall_table import (
    EVENT_LAYOUT,
    EVENT_SIZE,
    MAX_MSG_HANDLES,
    MSG_LAYOUT,
    MSG_SIZE,
    SYSCALLS,
    Errno,
    EventKind,
    MsgFlag,
)
from vmk.tools import guestapi

HEADER = guestapi.INCLUDE_DIR / "vmk.h"
INC = guestapi.INCLUDE_DIR / "vmk.inc"
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def test_committed_files_equal_a_fresh_generation() -> None:
    assert guestapi.stale_files() == [], "run: python -m vmk.tools.guestapi"
    assert HEADER.read_text() == guestapi.generate_header()
    assert INC.read_text() == guestapi.generate_inc()


def test_check_mode_and_regeneration(tmp_path: Path, capsys) -> None:
    assert guestapi.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "vmk.h is out of date" in capsys.readouterr().err
    assert guestapi.main(["--dir", str(tmp_path)]) == 0
    assert guestapi.main(["--check", "--dir", str(tmp_path)]) == 0
    assert guestapi.write_guest_api(tmp_path) == []             # nothing to rewrite
    (tmp_path / "vmk.inc").write_text("# edited\n")
    assert guestapi.stale_files(tmp_path) == [tmp_path / "vmk.inc"]


def _defines(text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 0) for m in re.finditer(r"^#define (\w+) (-?(?:0x)?[0-9A-Fa-f]+)U?L?$",
                                                               text, re.M)}


def _equates(text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2), 0) for m in re.finditer(r"^\.equ (\w+), (-?(?:0x)?[0-9A-Fa-f]+)$", text, re.M)}


def _expected() -> dict[str, int]:
    out = {f"SYS_{s.name.upper()}": s.number for s in SYSCALLS}
    out |= {e.name: int(e) for e in Errno}
    out |= {f"EV_{k.name}": int(k) for k in EventKind}
    out |= {"VMK_USER_BASE": USER_BASE, "VMK_STACK_TOP": STACK_TOP}
    out |= {f"VMK_MSG_{m.name}": int(m) for m in MsgFlag} | {"VMK_MAX_MSG_HANDLES": MAX_MSG_HANDLES}
    return out


def test_header_agrees_with_the_table() -> None:
    text = HEADER.read_text()
    defines = _defines(text)
    assert defines == _expected() | {"VMK_EVENT_SIZE": EVENT_SIZE, "VMK_MSG_SIZE": MSG_SIZE, "VMK_MAX_EVENTS": 64}
    fields = re.search(r"struct vmk_event \{\n(.*?)\n\};", text, re.S).group(1)
    ctype = {"I": "uint32_t", "q": "int64_t", "Q": "uint64_t"}
    assert [ln.strip() for ln in fields.splitlines()] == [f"{ctype[c]} {n};" for n, c in EVENT_LAYOUT]
    fields = re.search(r"struct vmk_msg \{\n(.*?)\n\};", text, re.S).group(1)
    ctype |= {"buf": "const void *", "handles": "int64_t *"}
    assert [ln.strip() for ln in fields.splitlines()] == [
        f"{ctype[n]}{n};" if n in ctype else f"{ctype[c]} {n};" for n, c in MSG_LAYOUT]
    for spec in SYSCALLS:
        params = ", ".join(spec.args) or "void"
        m = re.search(rf"^static inline .*\bvmk_{spec.name}\((.*)\)$", text, re.M)
        assert m and m.group(1) == params, spec.name
        if spec.returns == "void":
            assert "noreturn" in m.group(0)


def test_inc_agrees_with_the_table() -> None:
    equates = _equates(INC.read_text())
    offsets = {"kind": 0, "flags": 4, "handle": 8, "arg0": 16, "arg1": 24, "result": 32}
    msg = {"buf": 0, "len": 8, "tag": 16, "handles": 24, "nhandles": 32, "flags": 40}
    assert equates == _expected() | {f"ERR_{e.name}": -int(e) for e in Errno} | \
        {f"EVENT_OFF_{n.upper()}": off for n, off in offsets.items()} | {"EVENT_SIZE": EVENT_SIZE} | \
        {f"MSG_OFF_{n.upper()}": off for n, off in msg.items()} | {"MSG_SIZE": MSG_SIZE}


def test_inc_assembles_with_keystone() -> None:
    import keystone
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
    code, _ = ks.asm(INC.read_text() + "mov eax, SYS_SEND\nmov rax, [rbx + EVENT_OFF_RESULT]\ncmp rax, ERR_EPIPE\n",
                     0, as_bytes=True)
    assert code == bytes.fromhex("b808000000" "488b4320" "4883f8e0")


@needs_gcc
def test_inc_assembles_with_gnu_as(tmp_path: Path) -> None:
    src = tmp_path / "t.S"
    src.write_text('.intel_syntax noprefix\n.include "vmk.inc"\nmov eax, SYS_SEND\nmov rax, [rbx + EVENT_OFF_RESULT]\n'
                   "cmp rax, ERR_EPIPE\n")
    proc = subprocess.run(["gcc", "-c", f"-I{guestapi.INCLUDE_DIR}", "-o", str(tmp_path / "t.o"), str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    text = ELFFile(io.BytesIO((tmp_path / "t.o").read_bytes())).get_section_by_name(".text").data()
    assert text == bytes.fromhex("b808000000" "488b4320" "4883f8e0")


@needs_gcc
def test_header_compiles_cleanly(tmp_path: Path) -> None:
    src = tmp_path / "all.c"
    calls = "\n".join(f"long call_{s.name}(void) {{ return (long)&vmk_{s.name}; }}" for s in SYSCALLS)
    calls += "\n" + "\n".join(f"long call_{n}(void) {{ return (long)&{n}; }}"
                              for n in ("vmk_sync_ops", "vmk_send_tagged", "vmk_send_handle", "vmk_recv_handle"))
    src.write_text(f'#include "vmk.h"\n{calls}\n')
    for std in ("-std=c11", "-std=gnu17"):
        proc = subprocess.run(["gcc", "-ffreestanding", "-nostdlib", std, "-Wall", "-Wextra", "-Werror", "-pedantic",
                               "-Wno-pedantic", "-O2", "-c", f"-I{guestapi.INCLUDE_DIR}", "-o", str(tmp_path / "all.o"),
                               str(src)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr


@needs_gcc
def test_wrappers_put_arguments_in_the_syscall_registers(tmp_path: Path) -> None:
    """Compile calls to the wrappers and run them on raw Unicorn, recording each syscall's registers."""
    src = tmp_path / "calls.c"
    src.write_text('#include "vmk.h"\n'
                   "long f(void) {\n"
                   "    long a = vmk_send(5, (void *)0x1234, 8);\n"
                   "    long b = vmk_spawn(\"sh\", 2, (const long *)0x5678, 3);\n"
                   "    long c = vmk_time();\n"
                   "    vmk_exit(a + b + c);\n"
                   "}\n")
    obj = tmp_path / "calls.o"
    proc = subprocess.run(["gcc", "-ffreestanding", "-nostdlib", "-fno-pic", "-mno-red-zone", "-O2", "-c",
                           f"-I{guestapi.INCLUDE_DIR}", "-o", str(obj), str(src)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    elf = ELFFile(io.BytesIO(obj.read_bytes()))
    code = elf.get_section_by_name(".text").data()
    f_offset = next(s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name == "f")
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(USER_BASE, 0x10000)
    uc.mem_write(USER_BASE, code)
    uc.mem_map(0x7000_0000, 0x10000)
    calls: list[tuple[int, ...]] = []
    regs = (UC_X86_REG_RAX, UC_X86_REG_RDI, UC_X86_REG_RSI, UC_X86_REG_RDX, UC_X86_REG_R10)

    def on_syscall(uc: Uc, _user) -> None:
        calls.append(tuple(uc.reg_read(r) for r in regs))
        number = uc.reg_read(UC_X86_REG_RAX)
        uc.reg_write(UC_X86_REG_RAX, {8: 10, 14: 20, 12: 30}.get(number, 0))
        if number == 0:
            uc.emu_stop()

    uc.hook_add(UC_HOOK_INSN, on_syscall, None, 1, 0, UC_X86_INS_SYSCALL)
    uc.reg_write(UC_X86_REG_RSP, 0x7000_8000)
    uc.emu_start(USER_BASE + f_offset, USER_BASE + len(code), count=1000)
    send, spawn, time, exit_ = calls
    assert send == (8, 5, 0x1234, 8, send[4])
    assert spawn[0] == 14 and spawn[2:] == (2, 0x5678, 3)
    assert time[0] == 12
    assert exit_[:2] == (0, 60)                                 # exit(a + b + c)
