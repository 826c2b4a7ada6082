"""The ``vmk`` command line.

    vmk boot IMAGE [--serial SPEC] [--serial2 SPEC] [--mem SIZE] [--debugcon SPEC]
                   [--max-time DURATION] [--icount NS] [--append CMDLINE] [--initrd FILE[,FILE]] [-d]
                   [--serial-timing baud|instant] [--io-cost NS] [--no-reboot] [--rtc-base DATE]
                   [--drive file=IMG[,index=N][,format=raw][,media=disk][,snapshot=on]]... [-hda IMG] [-hdb IMG]
                   [--snapshot] [--vga FILE|-]
                   [--gdb [HOST]:PORT [--wait-gdb]]
    vmk build MANIFEST -o IMAGE [-v]
    vmk debug [HOST]:PORT [--batch FILE]
    vmk asm "INSTR; ..." [--addr A] [--bits 64]
    vmk disasm HEXBYTES [--addr A] [--bits 64]

Exit status of ``vmk boot``: the guest's isa-debug-exit status
(``(value << 1) | 1``, as QEMU); 0 when the guest halts the CPU for good;
124 when ``--max-time`` runs out (like ``timeout(1)``); 2 for a usage error or
an image that cannot be booted; 3 for an emulation error (or more than 100
reboots in a row);
130 after Ctrl-C; 70 (sysexits' EX_SOFTWARE) when vmk itself fails (a bug in vmk,
never the guest's doing): the guest's output so far is flushed first, and one
line names what was running and the file the traceback was written to.
A reset of the machine (0xCF9, the keyboard controller's 0xFE, port 0x92) or a
triple fault reboots it, as QEMU: the same image starts again from scratch, with
the RTC's time and CMOS bytes kept; with ``--no-reboot`` (QEMU's ``-no-reboot``)
``vmk boot`` ends with status 0 instead.  A triple fault is reported on stderr either way.
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

MAX_REBOOTS = 100

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
    b.add_argument("--append", "-append", default="", metavar="CMDLINE",
                   help="kernel command line (multiboot, Linux), as QEMU's -append")
    b.add_argument("--initrd", "-initrd", default=None, metavar="FILE[,FILE...]",
                   help="as QEMU's -initrd: a Linux kernel's initial ramdisk, or a multiboot kernel's modules "
                        "(comma-separated)")
    b.add_argument("--idle", choices=("realtime", "skip"), default="realtime",
                   help="while the CPU is halted, let virtual time follow the host clock (realtime, "
                        "default: QEMU's icount sleep=on) or jump to the next timer at once (skip, as tests do)")
    b.add_argument("--no-reboot", "-no-reboot", action="store_true",
                   help="a reset or triple fault ends vmk with status 0 instead of rebooting (QEMU's -no-reboot)")
    b.add_argument("--rtc-base", default=None, metavar="DATE",
                   help="the RTC's date at boot, YYYY-MM-DDTHH:MM:SS UTC (default 2000-01-01T00:00:00), "
                        "or utc / localtime for the host's clock")
    b.add_argument("-rtc", dest="rtc_qemu", default=None, metavar="base=DATE",
                   help="QEMU's spelling: -rtc base=DATE (other -rtc options are accepted and ignored)")
    b.add_argument("-d", "--debug-log", action="store_true",
                   help="print device logs (guest errors, unmodelled features) on stderr")
    b.add_argument("--gdb", default=None, metavar="[HOST]:PORT",
                   help="GDB remote stub on HOST:PORT (host 127.0.0.1 unless given; port 0 picks a free one)")
    b.add_argument("--wait-gdb", action="store_true",
                   help="do not start the CPU until a debugger attaches and continues (QEMU's -S)")
    b.add_argument("--drive", "-drive", action="append", default=[], metavar="file=IMG[,index=N][,...]",
                   help="an IDE disk, as QEMU's -drive: file=IMG, index=0..3 (primary master, primary slave, "
                        "secondary master, secondary slave; default: the first free), format=raw, media=disk, "
                        "if=ide, snapshot=on|off")
    for n, letter in enumerate("abcd"):
        b.add_argument(f"-hd{letter}", dest=f"hd{letter}", default=None, metavar="IMG",
                       help=f"the same as --drive file=IMG,index={n}")
    b.add_argument("--snapshot", "-snapshot", action="store_true",
                   help="disk writes stay in memory; the image files are not changed (QEMU's -snapshot)")
    b.add_argument("--vga", default=None, metavar="FILE|-",
                   help="write the VGA text screen to FILE (- for stdout): each line once, when the cursor "
                        "leaves it, and the cursor's line at the end")

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
    try:
        rtc_base = _rtc_base(args)
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
        drives = _open_drives(args)
    except ValueError as e:
        _close_all(devs, debugcon)
        return _fail(str(e))
    disks = [d for d in drives if d is not None]
    vga_out = None
    if args.vga is not None:
        try:
            vga_out = sys.stdout if args.vga == "-" else open(args.vga, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            _close_all(devs + disks, debugcon)
            return _fail(f"--vga {args.vga}: {e.strerror}")
    closing = devs + disks + ([vga_out] if vga_out is not None and vga_out is not sys.stdout else [])
    cmos = None
    elapsed = 0                      # virtual time of the boots before this one (--max-time counts them all)
    for _boot in range(MAX_REBOOTS + 1):
        try:
            machine = Machine(MachineConfig(mem=args.mem, ns_per_insn=args.icount, serial=devs,
                                            debugcon=debugcon, log=log, realtime_idle=args.idle == "realtime",
                                            serial_timing=args.serial_timing, io_cost_ns=args.io_cost,
                                            rtc_base=rtc_base, cmos=cmos,
                                            drives=drives))
        except ValueError as e:
            _close_all(closing, debugcon)
            return _fail(str(e))
        screen = None
        if vga_out is not None:
            from vmk.machine.devices.vga import ScreenLog

            def vga_write(text: str, f=vga_out) -> None:
                f.write(text)
                f.flush()
            screen = ScreenLog(machine.vga, vga_write)
            machine.vga.on_cursor = screen.update
        until = None if args.max_time is None else max(args.max_time - elapsed, 0)
        status, result, stub = _boot_once(args, machine, devs, debugcon, gdb_addr, until, screen)
        if status is not None:
            _close_all(closing, debugcon)
            return status
        if result.why not in (Why.RESET, Why.TRIPLE_FAULT):
            break
        if result.why == Why.TRIPLE_FAULT:
            sys.stderr.write(f"vmk: {result.message}\n")
        if args.no_reboot or stub is not None:       # under --gdb a reset ends the session
            if result.why == Why.RESET:
                sys.stderr.write(f"vmk: {result.message} (--no-reboot: exit)\n")
            _close_all(closing, debugcon)
            return 0
        # Reboot, as QEMU: a new machine, the same image; the RTC keeps its time and CMOS bytes.
        elapsed += machine.now
        rtc_base, cmos = machine.rtc.seconds(), machine.rtc.nvram()
    else:
        _close_all(closing, debugcon)
        return _fail(f"{MAX_REBOOTS} reboots in a row: the guest resets itself for ever (last: {result.message})",
                     EXIT_FAULT)
    _close_all(closing, debugcon)
    return _boot_status(result, machine, stub)


def _initrd_list(spec: str | None) -> list[str]:
    """--initrd a,b as QEMU splits -initrd: one entry per comma-separated part."""
    return [] if not spec else spec.split(",")


def _rtc_base(args) -> int:
    """--rtc-base DATE or QEMU's -rtc base=DATE[,...] (utc, localtime: the host's clock now)."""
    import time
    from vmk.machine.devices.rtc_cmos import DEFAULT_BASE, parse_rtc_base
    text = args.rtc_base
    if args.rtc_qemu is not None:
        for part in args.rtc_qemu.split(","):
            if part.startswith("base="):
                text = part[len("base="):]
    if text is None:
        return DEFAULT_BASE
    if text == "utc":
        return int(time.time())
    if text == "localtime":
        return int(time.time()) + time.localtime().tm_gmtoff
    return parse_rtc_base(text)


def _close_all(devs, debugcon) -> None:
    for dev in devs + ([debugcon] if debugcon else []):
        dev.close()


def _boot_once(args, machine, devs, debugcon, gdb_addr, until, screen=None):
    """Load the image into ``machine`` and run it: (exit status if it is already decided, result, stub)."""
    stub = None
    result = None
    try:
        vm = None
        try:
            vm = _load_vm_image(machine, args.image)
            boot_info = None if vm is not None else load_kernel(machine, args.image, args.append,
                                                                  _initrd_list(args.initrd))
        except ImageError as e:
            return _fail(str(e)), None, None
        if vm is not None and gdb_addr is None:
            result = vm.run(until=until)
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
                return (_fail(f"--gdb {args.gdb}: cannot listen on {gdb_addr[0]}:{gdb_addr[1]}: {e.strerror}"),
                        None, None)
            sys.stderr.write(f"vmk: gdb stub listening on {host}:{port}\n")
            sys.stderr.flush()
            result = stub.run(until=until)
        else:
            result = machine.run(until=until)
        for uart in machine.uarts:
            uart.flush_tx()          # bytes still in the transmitter reach the back end
        if screen is not None:
            screen.finish()          # the cursor's line (a prompt) too
    except Exception as e:           # a vmk bug (user errors are handled above)
        return _internal_error(e, machine, vm), None, None
    finally:
        if stub is not None:
            stub.close()
    return None, result, stub


def _boot_status(result, machine, stub) -> int:
    """The exit status of ``vmk boot`` for the final run."""
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


_DRIVE_KEYS = {"file", "index", "format", "media", "if", "snapshot"}


def _open_drives(args) -> list:
    """--drive/-hdX as QEMU reads them: four IDE positions (None where absent); ValueError: one line."""
    from vmk.machine.blockdev import DiskImage
    specs: list[tuple[str, dict[str, str]]] = []
    for spec in args.drive:
        opts: dict[str, str] = {}
        for part in spec.split(","):
            key, eq, value = part.partition("=")
            if not eq:
                if not opts and part:
                    key, value = "file", part              # "--drive IMG": the file, as QEMU's -hda
                else:
                    raise ValueError(f"--drive {spec}: {part!r} is not KEY=VALUE")
            if key not in _DRIVE_KEYS:
                raise ValueError(f"--drive {spec}: unknown option {key!r} (known: {', '.join(sorted(_DRIVE_KEYS))})")
            opts[key] = value
        specs.append((f"--drive {spec}", opts))
    for n, letter in enumerate("abcd"):
        path = getattr(args, f"hd{letter}")
        if path is not None:
            specs.append((f"-hd{letter} {path}", {"file": path, "index": str(n)}))
    slots: list = [None] * 4
    wanted: list[tuple[str, dict[str, str], int | None]] = []
    for what, opts in specs:
        if not opts.get("file"):
            raise ValueError(f"{what}: no file=IMAGE")
        for key, ok in (("format", ("raw",)), ("media", ("disk",)), ("if", ("ide",)), ("snapshot", ("on", "off"))):
            if key in opts and opts[key] not in ok:
                raise ValueError(f"{what}: {key}={opts[key]} is not supported (only {', '.join(ok)})")
        index = None
        if "index" in opts:
            try:
                index = int(opts["index"])
            except ValueError:
                index = -1
            if not 0 <= index <= 3:
                raise ValueError(f"{what}: index must be 0..3 (primary master, primary slave, secondary master, "
                                 f"secondary slave), not {opts['index']!r}")
        wanted.append((what, opts, index))
    taken: dict[int, str] = {}
    for what, _, index in wanted:
        if index is not None:
            if index in taken:
                raise ValueError(f"{what}: index {index} is already used by {taken[index]}")
            taken[index] = what
    free = [i for i in range(4) if i not in taken]
    placed: list[tuple[str, dict[str, str], int]] = []
    for what, opts, index in wanted:
        if index is None:
            if not free:
                raise ValueError(f"{what}: all four IDE positions are taken")
            index = free.pop(0)
        placed.append((what, opts, index))
    try:
        for what, opts, index in placed:
            snap = args.snapshot or opts.get("snapshot") == "on"
            try:
                slots[index] = DiskImage(opts["file"], snapshot=snap)
            except OSError as e:
                raise ValueError(f"{what}: cannot open {opts['file']}: {e.strerror}") from None
    except ValueError:
        for d in slots:
            if d is not None:
                d.close()
        raise
    return slots


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
