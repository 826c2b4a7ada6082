"""The ``vmk`` command line.

    vmk boot IMAGE [--serial SPEC] [--serial2 SPEC] [--mem SIZE] [--debugcon SPEC]
                   [--max-time DURATION] [--icount NS] [--append CMDLINE] [-d]
                   [--serial-timing baud|instant] [--io-cost NS]
                   [--gdb [HOST]:PORT [--wait-gdb]]
    vmk build MANIFEST -o IMAGE [-v]
    vmk debug [HOST]:PORT [--batch FILE]
    vmk asm "INSTR; ..." [--addr A] [--bits 64]
    vmk disasm HEXBYTES [--addr A] [--bits 64]

Exit status of ``vmk boot``: the guest's isa-debug-exit status
(``(value << 1) | 1``, as QEMU); 0 when the guest halts the CPU for good;
124 when ``--max-time`` runs out (like ``timeout(1)``); 2 for a usage error or
an image that cannot be booted; 3 for a triple fault or an emulation error;
130 after Ctrl-C; 70 (sysexits' EX_SOFTWARE) when vmk itself fails (a bug in vmk,
never the guest's doing): the guest's output so far is flushed first, and one
line names what was running and the file the traceback was written to.
Every user error is one line on stderr, never a traceback.
With ``--gdb``, a kill from the debugger ends ``vmk boot`` with status 0 (as
QEMU).  ``vmk debug`` exits 0, or 1 when a ``--batch`` command failed.
``vmk build`` prints nothing (``-v``: a one-line summary) and exits 0, or 2
with one line naming the manifest or source FILE:LINE.
"""
from __future__ import annotations

import argparse
import os
import sys

from vmk.boot.loader import ImageError, load_kernel
from vmk.machine.chardev import parse_chardev
from vmk.machine.pc import IO_COST_PC_NS, Machine, MachineConfig, Why

from .units import format_ns, parse_duration, parse_size

__all__ = ["main", "EXIT_USAGE", "EXIT_TIME_LIMIT", "EXIT_FAULT", "EXIT_INTERRUPTED", "EXIT_BUG"]

EXIT_USAGE = 2
EXIT_FAULT = 3
EXIT_TIME_LIMIT = 124
EXIT_INTERRUPTED = 130
EXIT_BUG = 70                 # sysexits.h EX_SOFTWARE: an internal error of vmk


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:         # one line, status 2, like every vmk user error
        self.exit(EXIT_USAGE, f"vmk: {message} (see 'vmk {self.prog.split()[-1]} --help')\n"
                  if " " in self.prog else f"vmk: {message} (see 'vmk --help')\n")


def _arg(parse):
    def conv(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = parse.__name__.replace("parse_", "")
    return conv


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmk", description="vmk: a bare-metal VM kernel on an emulated x86-64 PC")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    b = sub.add_parser("boot", help="boot a kernel image (multiboot ELF, ELF64) on the emulated PC")
    b.add_argument("image", help="kernel image file")
    b.add_argument("--serial", default="stdio", metavar="SPEC",
                   help="COM1 back end: stdio|null|file:PATH|tcp:HOST:PORT|pty (default stdio)")
    b.add_argument("--serial2", default="null", metavar="SPEC", help="COM2 back end (default null)")
    b.add_argument("--serial-timing", choices=("baud", "instant"), default="baud",
                   help="UART transmit timing: bytes leave at the programmed baud rate as on a PC16550D (baud, "
                        "default), or at the THR write with the IRQ not gated on MCR.OUT2, as QEMU (instant: "
                        "for kernels that poll LSR.THRE)")
    b.add_argument("--io-cost", type=int, default=IO_COST_PC_NS, metavar="NS",
                   help=f"virtual ns an IN/OUT instruction takes beyond --icount: the ISA/LPC bus cycle "
                        f"(default {IO_COST_PC_NS}, a PC's ~1 us; 0: free, as QEMU's icount)")
    b.add_argument("--debugcon", default=None, metavar="SPEC", help="port 0xE9 debug console back end")
    b.add_argument("--mem", type=_arg(parse_size), default=128 << 20, metavar="SIZE",
                   help="guest RAM: MiB, or with K/M/G suffix (default 128)")
    b.add_argument("--max-time", type=_arg(parse_duration), default=None, metavar="DURATION",
                   help="stop after this much virtual time (e.g. 10s, 500ms); exit status 124")
    b.add_argument("--icount", type=int, default=1, metavar="NS",
                   help="virtual nanoseconds per instruction (default 1: a 1 GHz CPU)")
    b.add_argument("--append", default="", metavar="CMDLINE", help="kernel command line (multiboot)")
    b.add_argument("--idle", choices=("realtime", "skip"), default="realtime",
                   help="while the CPU is halted, let virtual time follow the host clock (realtime, "
                        "default: QEMU's icount sleep=on) or jump to the next timer at once (skip, as tests do)")
    b.add_argument("-d", "--debug-log", action="store_true",
                   help="print device logs (guest errors, unmodelled features) on stderr")
    b.add_argument("--gdb", default=None, metavar="[HOST]:PORT",
                   help="GDB remote stub on HOST:PORT (host 127.0.0.1 unless given; port 0 picks a free one)")
    b.add_argument("--wait-gdb", action="store_true",
                   help="do not start the CPU until a debugger attaches and continues (QEMU's -S)")

    bu = sub.add_parser("build", help="build a vmk image (VM kernel settings + containers) from a manifest")
    bu.add_argument("manifest", help="the manifest (TOML); program sources are relative to it")
    bu.add_argument("-o", "--output", required=True, metavar="IMAGE", help="the image file to write")
    bu.add_argument("-v", "--verbose", action="store_true", help="print a one-line summary")

    dbg = sub.add_parser("debug", help="the vmk debugger shell, attached to 'vmk boot --gdb [HOST]:PORT'")
    dbg.add_argument("address", metavar="[HOST]:PORT", help="where the GDB stub listens (e.g. :1234)")
    dbg.add_argument("--batch", default=None, metavar="FILE",
                     help="run the commands in FILE and exit; non-zero status on the first failing command")

    be = sub.add_parser("bench", help="measure emulator speed, as ratios to a reference measured in the same run")
    be.add_argument("--quick", action="store_true", help="shorter runs (less precise)")
    be.add_argument("only", nargs="*", help="run only the benchmarks whose names contain these words")

    a = sub.add_parser("asm", help="assemble x86 instructions (keystone) and print the bytes")
    a.add_argument("source")
    a.add_argument("--addr", type=lambda s: int(s, 0), default=0)
    a.add_argument("--bits", type=int, choices=(16, 32, 64), default=64)

    d = sub.add_parser("disasm", help="disassemble hex bytes (capstone)")
    d.add_argument("hexbytes")
    d.add_argument("--addr", type=lambda s: int(s, 0), default=0)
    d.add_argument("--bits", type=int, choices=(16, 32, 64), default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.cmd == "boot":
            return cmd_boot(args)
        if args.cmd == "build":
            return cmd_build(args)
        if args.cmd == "asm":
            return cmd_asm(args)
        if args.cmd == "bench":
            from .bench import run_benchmarks
            return run_benchmarks(quick=args.quick, only=args.only)
        if args.cmd == "disasm":
            return cmd_disasm(args)
        if args.cmd == "debug":
            from .debugshell import main as debug_main
            return debug_main(args.address, batch=args.batch)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_USAGE


def _fail(msg: str, status: int = EXIT_USAGE) -> int:
    sys.stderr.write(f"vmk: {msg}\n")
    return status


def cmd_boot(args) -> int:
    if args.icount < 1:
        return _fail(f"--icount must be at least 1 ns per instruction, not {args.icount}")
    if args.io_cost < 0:
        return _fail(f"--io-cost must be 0 or more ns, not {args.io_cost}")
    if args.wait_gdb and not args.gdb:
        return _fail("--wait-gdb needs --gdb [HOST]:PORT")
    gdb_addr = None
    if args.gdb:
        from .gdbstub import parse_listen_address
        try:
            gdb_addr = parse_listen_address(args.gdb)
        except ValueError as e:
            return _fail(str(e))
    devs = []
    opt = "--serial"
    try:
        for spec, opt in ((args.serial, "--serial"), (args.serial2, "--serial2")):  # noqa: B007 - opt names the failing option
            devs.append(parse_chardev(spec))
        opt = "--debugcon"
        debugcon = parse_chardev(args.debugcon) if args.debugcon else None
    except (ValueError, OSError) as e:
        for dev in devs:
            dev.close()
        return _fail(f"{opt}: {e}")
    for dev in devs:
        path = getattr(dev, "path", None)
        if path and type(dev).__name__ == "PtyChar":
            sys.stderr.write(f"vmk: serial on {path}\n")
    log = (lambda msg: sys.stderr.write(f"vmk: {msg}\n")) if args.debug_log else None
    try:
        machine = Machine(MachineConfig(mem=args.mem, ns_per_insn=args.icount, serial=devs,
                                        debugcon=debugcon, log=log, realtime_idle=args.idle == "realtime",
                                        serial_timing=args.serial_timing, io_cost_ns=args.io_cost))
    except ValueError as e:
        return _fail(str(e))
    stub = None
    try:
        vm = None
        try:
            vm = _load_vm_image(machine, args.image)
            boot_info = None if vm is not None else load_kernel(machine, args.image, args.append)
        except ImageError as e:
            return _fail(str(e))
        if vm is not None and gdb_addr is None:
            result = vm.run(until=args.max_time)
        elif gdb_addr is not None:
            from .gdbstub import GdbStub
            from .kernelview import view_for
            if vm is not None:
                from .vmview import VMKernelView, attach
                first = vm.image.boot_order()[0]
                stub = GdbStub(machine, host=gdb_addr[0], port=gdb_addr[1], wait=args.wait_gdb,
                               view=VMKernelView(vm), symbols=dict(vm.image.program(first.program).symbols))
                attach(stub, vm)
            else:
                stub = GdbStub(machine, host=gdb_addr[0], port=gdb_addr[1], wait=args.wait_gdb,
                               view=view_for(machine, boot_info), symbols=boot_info.symbols)
            try:
                host, port = stub.listen()
            except OSError as e:
                return _fail(f"--gdb {args.gdb}: cannot listen on {gdb_addr[0]}:{gdb_addr[1]}: {e.strerror}")
            sys.stderr.write(f"vmk: gdb stub listening on {host}:{port}\n")
            sys.stderr.flush()
            result = stub.run(until=args.max_time)
        else:
            result = machine.run(until=args.max_time)
        for uart in machine.uarts:
            uart.flush_tx()          # bytes still in the transmitter reach the back end
    except Exception as e:           # a vmk bug (user errors are handled above)
        return _internal_error(e, machine, vm)
    finally:
        if stub is not None:
            stub.close()
        for dev in devs + ([debugcon] if debugcon else []):
            dev.close()
    t = format_ns(machine.now)
    if result.why == Why.EXIT:
        return result.exit_status or 0
    if result.why == Why.TIME_LIMIT:
        return _fail(f"virtual time limit reached (t={t}, {machine.instructions} instructions)",
                     EXIT_TIME_LIMIT)
    if result.why == Why.DEAD:
        sys.stderr.write(f"vmk: {result.message}\n")
        return 0
    if result.why == Why.INTERRUPTED:
        return _fail(f"interrupted (t={t})", EXIT_INTERRUPTED)
    if stub is not None and stub.killed:
        sys.stderr.write(f"vmk: killed by the debugger (t={t})\n")
        return 0
    return _fail(result.message, EXIT_FAULT)


def _internal_error(exc: BaseException, machine, vm) -> int:
    """vmk failed: save the guest's output, write the traceback to a file, say so in one line."""
    import tempfile
    import traceback
    try:
        if vm is not None:
            vm.salvage_console()
        else:
            for uart in machine.uarts:
                uart.flush_tx()
    except Exception as again:      # noqa: BLE001 - the report below matters more
        exc.add_note(f"(saving the console output failed too: {again!r})")
    where = ""
    cur = getattr(vm, "current", None)
    notes = "; ".join(getattr(exc, "__notes__", ()))
    if cur is not None and cur.container is not None and not notes:
        where = f"; pid {cur.container.pid} ({cur.container.name}) fiber {cur.fid} was on the CPU"
    kind = type(exc).__qualname__
    if type(exc).__module__ not in ("builtins", "__main__"):
        kind = f"{type(exc).__module__}.{kind}"
    try:
        fd, path = tempfile.mkstemp(prefix="vmk-bug-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"vmk internal error at t={machine.now} ns, {machine.instructions} instructions, "
                    f"RIP {machine.cpu.rip:#x}\n")
            traceback.print_exception(exc, file=f)
        saved = f"traceback in {path}"
    except OSError as e:
        saved = f"the traceback could not be saved ({e.strerror})"
    sys.stdout.flush()
    sys.stderr.write(f"vmk: internal error (a bug in vmk, not in the guest): {kind}: {exc}"
                     f"{' ' + notes if notes else ''}{where}; {saved}\n")
    return EXIT_BUG


def cmd_build(args) -> int:
    from .build import BuildError, build
    try:
        image = build(args.manifest, args.output)
    except BuildError as e:
        return _fail(str(e))
    if args.verbose:
        size = os.path.getsize(args.output)
        print(f"{args.output}: {len(image.programs)} programs, {len(image.containers)} containers "
              f"({len(image.boot_order())} at boot), {len(image.channels)} channels, {size} bytes")
    return 0


def _load_vm_image(machine, path: str):
    """A vmk image (built by ``vmk build``) boots the VM kernel; anything else is a bare-metal kernel."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None                          # load_kernel reports it
    from vmk.boot.vmkimage import is_vmk_image, read_image
    if not is_vmk_image(head):
        return None
    from vmk.kernel.pid0 import VMKernel
    return VMKernel(machine, read_image(path))


def cmd_asm(args) -> int:
    import keystone
    mode = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}[args.bits]
    try:
        enc, _ = keystone.Ks(keystone.KS_ARCH_X86, mode).asm(args.source, args.addr)
    except keystone.KsError as e:
        return _fail(f"cannot assemble {args.source!r}: {e}")
    print(bytes(enc or b"").hex())
    return 0


def cmd_disasm(args) -> int:
    import capstone
    try:
        code = bytes.fromhex(args.hexbytes.replace(" ", ""))
    except ValueError:
        return _fail(f"bad hex bytes {args.hexbytes!r}: use pairs of hex digits, e.g. 'b8 01 00 00 00'")
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[args.bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    end = args.addr
    for ins in md.disasm(code, args.addr):
        print(f"{ins.address:#018x}: {ins.bytes.hex():<20} {ins.mnemonic} {ins.op_str}".rstrip())
        end = ins.address + ins.size
    if end - args.addr < len(code):
        print(f"{end:#018x}: {code[end - args.addr:].hex():<20} (bad)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
