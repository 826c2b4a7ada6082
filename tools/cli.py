"""The ``vmk`` command line.

    vmk boot IMAGE [--serial SPEC] [--serial2 SPEC] [--mem SIZE] [--debugcon SPEC]
                   [--max-time DURATION] [--icount NS] [--append CMDLINE] [--initrd FILE[,FILE]] [-d]
                   [--serial-timing baud|instant] [--io-cost NS] [--no-reboot] [--rtc-base DATE]
                   [--drive file=IMG[,index=N][,format=raw][,media=disk][,snapshot=on]]... [-hda IMG] [-hdb IMG]
                   [--snapshot] [--vga FILE|-] [--trace FILE] [--vcd FILE]
                   [--gdb [HOST]:PORT [--wait-gdb]]
    vmk build MANIFEST -o IMAGE [-v]
    vmk debug [HOST]:PORT [--batch FILE]
    vmk asm "INSTR; ..." [--addr A] [--bits 64]
    vmk disasm HEXBYTES [--addr A] [--bits 64]
    vmk demo [NAME]
    vmk --version

QEMU's spellings of these options work too (``vmk -kernel K -m 256 -serial
stdio -s -S -icount shift=0 -nographic -d guest_errors``): see :func:`_qemu_spellings`.

Exit status of ``vmk boot``: the guest's isa-debug-exit status
(``(value << 1) | 1``, as QEMU); 0 when the guest halts the CPU with interrupts
off; 4 when it halts with interrupts on and nothing can ever wake it (a deadlock:
no timer, no input to come; in a VM image, every fiber blocked); 124 when
``--max-time`` runs out (like ``timeout(1)``); 2 for a usage error or an image
that cannot be booted; 3 for an emulation error (or more than 100 reboots in a
row); 130 after Ctrl-C; 70 (sysexits' EX_SOFTWARE) when vmk itself fails (a bug in vmk,
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
import errno
import os
import re
import sys

# Heavy modules are imported where they are first used (tests/tools/test_lazy_imports.py
# pins it): the ELF loader (pyelftools) by _boot_once, the image format, the
# debugger, the GDB stub, the bench, keystone and capstone by their commands.
from vmk.machine.chardev import parse_chardev
from vmk.machine.pc import IO_COST_PC_NS, Machine, MachineConfig, Why

from .units import format_ns, parse_duration, parse_size

MAX_REBOOTS = 100

__all__ = ["main", "EXIT_USAGE", "EXIT_TIME_LIMIT", "EXIT_FAULT", "EXIT_DEADLOCK", "EXIT_INTERRUPTED", "EXIT_BUG"]

EXIT_USAGE = 2
EXIT_FAULT = 3
EXIT_DEADLOCK = 4             # halted with interrupts on, nothing can wake it (even: never an isa-debug-exit status)
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


def _smp_count(text: str) -> int:
    """--smp N, or QEMU's ``N[,cpus=N][,sockets=N][,maxcpus=N]``.

    Discussion: vmk's CPUs are one per package (CPUID leaf 1 reports one
    logical processor and no HTT), which is QEMU's ``sockets=N``.  Cores or
    threads in a package change what a guest sees: QEMU 7.2 makes plain
    ``-smp 2`` two cores in one socket, and SeaBIOS then lists only each
    package's first CPU in its MP table (xv6 runs on one CPU there, measured).
    So ``cores``/``threads``/``dies``/``clusters`` above 1 are refused in one
    line instead of being ignored."""
    from vmk.machine.smp import MAX_CPUS
    keys: dict[str, str] = {}
    for i, part in enumerate(text.split(",")):
        key, eq, value = part.partition("=")
        if not eq and i == 0:
            key, value = "cpus", part
        elif not eq or key not in ("cpus", "sockets", "cores", "threads", "dies", "clusters", "maxcpus"):
            raise argparse.ArgumentTypeError(f"{part!r}: expected N, cpus=N, sockets=N or maxcpus=N")
        try:
            keys[key] = str(int(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a CPU count" if not eq else
                                             f"{part!r}: {value!r} is not a number") from None
    per_package = [k for k in ("cores", "threads", "dies", "clusters") if int(keys.get(k, "1")) != 1]
    if per_package:
        raise argparse.ArgumentTypeError(f"{per_package[0]}={keys[per_package[0]]}: vmk's CPUs are one per "
                                         f"package (QEMU's sockets=N); give the count alone or as sockets=N")
    n = int(keys.get("cpus", keys.get("sockets", "0")))
    for k in ("sockets", "maxcpus"):
        if k in keys and int(keys[k]) != n:
            raise argparse.ArgumentTypeError(f"{k}={keys[k]} with {n} CPUs: vmk has one CPU per socket and no "
                                             f"CPU hot-plug, so {k} must be the CPU count")
    if not 1 <= n <= MAX_CPUS:
        raise argparse.ArgumentTypeError(f"{n} CPUs: a PC with xAPICs has 1 to {MAX_CPUS}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmk", description="vmk: a bare-metal VM kernel on an emulated x86-64 PC")
    p.add_argument("--version", action="version", version=f"vmk {_version()}")
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
    b.add_argument("--max-time", type=_arg(_duration_with_unit), default=None, metavar="DURATION",
                   help="stop after this much virtual time, with a unit: ns, us, ms or s (e.g. 10s, 500ms); "
                        "exit status 124")
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
    b.add_argument("--trace", default=None, metavar="FILE",
                   help="write a Perfetto trace (protobuf, virtual ns: fibers, syscalls, channel flows, "
                        "interrupts, timer deadlines) to FILE, e.g. run.perfetto-trace; open it in ui.perfetto.dev")
    b.add_argument("--vcd", default=None, metavar="FILE", help="write the IRQ lines' levels to FILE as a VCD (GTKWave)")
    # SMP (issue 12): N CPUs, APs waiting for INIT-SIPI-SIPI (machine/smp.py); QEMU spells it -smp N
    b.add_argument("--smp", "-smp", type=_smp_count, default=1, metavar="N",
                   help="number of CPUs (1-255; default 1): APIC IDs 0..N-1, CPU 0 boots, the others wait for "
                        "INIT-SIPI-SIPI; QEMU's -smp N[,sockets=N] (one CPU per package)")
    b.add_argument("--smp-quantum", type=_arg(parse_duration), default=None, metavar="DURATION",
                   help="with --smp: one CPU's turn in the round-robin, in virtual time (default 10us)")
    b.set_defaults(tracer=None)

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

    de = sub.add_parser("demo", help="print the path of a demo manifest shipped with vmk (no NAME: list them)")
    de.add_argument("name", nargs="?", default=None, help="the demo: console, pipeline")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = _qemu_spellings(sys.argv[1:] if argv is None else list(argv))
    except ValueError as e:
        return _fail(str(e))
    args = parser.parse_args(argv)
    if args.cmd is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.cmd == "boot":
            return _traced_boot(args) if args.trace or args.vcd else cmd_boot(args)
        if args.cmd == "build":
            return cmd_build(args)
        if args.cmd == "asm":
            return cmd_asm(args)
        if args.cmd == "bench":
            from .bench import run_benchmarks
            return run_benchmarks(quick=args.quick, only=args.only)
        if args.cmd == "disasm":
            return cmd_disasm(args)
        if args.cmd == "demo":
            return cmd_demo(args)
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
        return _fail(f"{opt}: {_os_error_text(e) if isinstance(e, OSError) else e}")
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
                                            drives=drives, tracer=args.tracer, cpus=args.smp,
                                            **({} if args.smp_quantum is None
                                               else {"smp_quantum_ns": args.smp_quantum})))
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


def _traced_boot(args) -> int:
    """``vmk boot`` with --trace/--vcd: one recorder across the boot (and its reboots),
    written when the boot ends, however it ends."""
    from vmk.machine.trace import Tracer

    from .trace import perfetto_bytes, vcd_text
    outs = {}
    for opt, path, mode in (("--trace", args.trace, "wb"), ("--vcd", args.vcd, "w")):
        if path is not None:
            try:
                outs[opt] = open(path, mode)        # noqa: SIM115 - closed below, after the boot
            except OSError as e:
                for f in outs.values():
                    f.close()
                return _fail(f"{opt} {path}: {e.strerror}")
    args.tracer = Tracer()
    try:
        return cmd_boot(args)
    finally:
        args.tracer.finish()
        if "--trace" in outs:
            with outs["--trace"] as f:
                f.write(perfetto_bytes(args.tracer))
        if "--vcd" in outs:
            with outs["--vcd"] as f:
                f.write(vcd_text(args.tracer))


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
    from vmk.boot.loader import ImageError, load_kernel, split_initrd
    stub = None
    result = None
    try:
        vm = None
        try:
            vm = _load_vm_image(machine, args.image)
            boot_info = None if vm is not None else load_kernel(machine, args.image, args.append,
                                                                  split_initrd(args.initrd or ""))
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
                return (_fail(f"--gdb {args.gdb}: cannot listen on {gdb_addr[0]}:{gdb_addr[1]}: "
                              f"{_os_error_text(e)}"), None, None)
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
        # cli; hlt is how a bare-metal kernel says it is done (QEMU would sit there: we end, with 0);
        # halted with interrupts on and no timer or input to come is a hang (a VM image: every fiber blocked).
        return EXIT_DEADLOCK if machine.cpu.interrupts_enabled() else 0
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
    if head.startswith(b"\x7fELF"):
        return None                          # a kernel: no need to import the image format (~10 ms)
    from vmk.boot.vmkimage import is_vmk_image, read_image
    if not is_vmk_image(head):
        return None
    from vmk.kernel.pid0 import VMKernel
    return VMKernel(machine, read_image(path))


def cmd_asm(args) -> int:
    from .build import assemble_snippet
    try:
        code = assemble_snippet(args.source, args.addr, args.bits)
    except ValueError as e:
        return _fail(f"cannot assemble {args.source!r}: {e}")
    print(code.hex())
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


# ---------------------------------------------------------------------- QEMU's spellings

_QEMU_LOG_ITEMS = {"out_asm", "in_asm", "op", "op_opt", "op_ind", "op_plugin", "int", "exec", "cpu", "fpu",
                   "mmu", "pcall", "cpu_reset", "unimp", "guest_errors", "page", "nochain", "plugin", "strace",
                   "tid", "vpu", "invalid_mem", "help"}
_QEMU_LOG_MAPPED = {"guest_errors", "unimp"}       # what vmk's device log (-d) reports


def _qemu_spellings(argv: list[str]) -> list[str]:
    """Translate QEMU's options of ``vmk boot`` to vmk's own; ValueError: one line, for what vmk cannot do.

    ``-kernel FILE`` (``vmk -kernel FILE`` means ``vmk boot FILE``), ``-m [size=]SIZE``,
    ``-serial SPEC`` (the first COM1, the next COM2; ``mon:stdio`` is stdio,
    ``none`` is null, a ``tcp:`` server's ``,server,nowait`` options are what vmk
    does anyway), ``-s`` (``--gdb :1234``), ``-S`` (``--wait-gdb``), ``-gdb
    tcp:[HOST]:PORT``, ``-icount [shift=]N[,sleep=on|off][,align=...]`` (``--icount
    2**N``; sleep=off is ``--idle skip``), ``-nographic`` and ``-display none``
    (vmk draws nothing), ``-d guest_errors,unimp`` (``-d``), ``-monitor none``,
    ``-device isa-debug-exit[,iobase=0xf4][,iosize=...]`` (always there).  The
    rest is left to the parser (``-no-reboot``, ``-rtc``, ``-drive``, ``-hdX``,
    ``-snapshot`` are spelled there).
    """
    if not argv or argv[0] != "boot":
        if "-kernel" not in argv or argv[0] in ("build", "debug", "bench", "asm", "disasm", "demo"):
            return argv
        argv = ["boot", *argv]
    out = ["boot"]
    serials = 0
    i = 1

    def value(opt: str) -> str:
        nonlocal i
        i += 1
        if i >= len(argv):
            raise ValueError(f"{opt} needs a value")
        return argv[i]

    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        if tok == "-kernel":
            out.append(value(tok))
        elif tok == "-m":
            out += ["--mem", value(tok).removeprefix("size=").split(",")[0]]
        elif tok == "-serial":
            if serials == 2:
                raise ValueError("-serial: vmk's PC has two UARTs (COM1, COM2)")
            out += ["--serial" if serials == 0 else "--serial2", _qemu_chardev(value(tok))]
            serials += 1
        elif tok == "-s":
            out += ["--gdb", ":1234"]
        elif tok == "-S":
            out.append("--wait-gdb")
        elif tok == "-gdb":
            spec = value(tok)
            if not spec.startswith("tcp:"):
                raise ValueError(f"-gdb {spec}: vmk's stub listens on TCP only: -gdb tcp::PORT (or --gdb :PORT)")
            out += ["--gdb", spec.removeprefix("tcp:").split(",")[0]]
        elif tok == "-icount":
            out += _qemu_icount(value(tok))
        elif tok == "-nographic":
            pass                                  # vmk draws no screen; serial is stdio already
        elif tok == "-display":
            spec = value(tok)
            if spec != "none":
                raise ValueError(f"-display {spec}: vmk draws no screen (see --vga for the text screen)")
        elif tok == "-d":
            out.append("-d")
            if i + 1 < len(argv) and _qemu_log_list(argv[i + 1]):
                i += 1                            # QEMU's -d LIST; else vmk's own -d flag
        elif tok == "-monitor":
            spec = value(tok)
            if spec != "none":
                raise ValueError(f"-monitor {spec}: vmk has no QEMU monitor; its commands are gdb 'monitor' "
                                 "commands: --gdb :PORT, then gdb or 'vmk debug :PORT'")
        elif tok == "-device":
            spec = value(tok)
            name, _, opts = spec.partition(",")
            iobase = dict(o.partition("=")[::2] for o in opts.split(",") if o).get("iobase", "0xf4")
            if name != "isa-debug-exit" or iobase.lower() not in ("0xf4", "244"):
                raise ValueError(f"-device {spec}: vmk's PC is fixed (isa-debug-exit at 0xf4 is always there); "
                                 "disks: -drive / -hda")
        else:
            out.append(tok)
        i += 1
    return out


def _qemu_chardev(spec: str) -> str:
    if spec == "mon:stdio":
        return "stdio"                            # the monitor multiplexer is not there: plain stdio
    if spec == "none":
        return "null"
    if spec.startswith("tcp:"):
        head, *opts = spec.split(",")
        for o in opts:
            if o not in ("server", "server=on", "nowait", "wait=off", "nodelay", "nodelay=on"):
                raise ValueError(f"-serial {spec}: vmk's tcp: back end is a server that does not wait "
                                 f"(server=on,wait=off); {o!r} is not supported")
        return head
    return spec


def _qemu_icount(spec: str) -> list[str]:
    opts = {}
    for i, part in enumerate(spec.split(",")):
        key, eq, val = part.partition("=")
        if not eq and i == 0:
            key, val = "shift", part
        opts[key] = val
    out = []
    shift = opts.pop("shift", "0")
    if not shift.isdigit() or int(shift) > 10:
        raise ValueError(f"-icount {spec}: shift must be 0..10 (2**shift ns per instruction); vmk's time is "
                         "always instruction-counted, so shift=auto has no meaning")
    out += ["--icount", str(1 << int(shift))]
    sleep = opts.pop("sleep", None)               # QEMU's default, on, is vmk's: --idle realtime
    if sleep not in (None, "on", "off"):
        raise ValueError(f"-icount {spec}: sleep must be on or off")
    if sleep is not None:
        out += ["--idle", "realtime" if sleep == "on" else "skip"]
    opts.pop("align", None)                       # host-timing alignment: vmk never runs ahead of itself
    if opts:
        raise ValueError(f"-icount {spec}: {', '.join(opts)} not supported (shift, sleep, align are)")
    return out


def _qemu_log_list(text: str) -> bool:
    """True if ``text`` is QEMU's -d LIST (then it must be what vmk logs); False: not a log list at all."""
    items = text.split(",")
    if not all(i in _QEMU_LOG_ITEMS or i.startswith("trace:") for i in items):
        return False
    unsupported = [i for i in items if i not in _QEMU_LOG_MAPPED]
    if unsupported:
        raise ValueError(f"-d {text}: vmk cannot log {', '.join(unsupported)}; it logs guest_errors and "
                         "unimp (-d); for instructions and interrupts use --gdb")
    return True


def _duration_with_unit(text: str) -> int:
    """--max-time: a duration with its unit; a bare number is refused (was it ns or s?)."""
    if re.fullmatch(r"\s*\d+(\.\d+)?\s*", text):
        raise ValueError(f"bad duration {text!r}: give a unit, ns, us, ms or s (e.g. {text.strip()}s or "
                         f"{text.strip()}ms)")
    return parse_duration(text)


def _os_error_text(e: OSError) -> str:
    """An OSError as a user reads it: the reason, and for the usual ones what to do about it."""
    text = e.strerror or str(e)
    if e.errno == errno.EADDRINUSE:
        return (f"{text}: another program (another vmk, a QEMU?) holds this port; pick another port, "
                "or end that program ('ss -ltnp' names it)")
    if e.errno == errno.EACCES:
        return f"{text}: ports below 1024 need root; pick a port above 1023"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{text}: this host has no such address; use 127.0.0.1 (this host only) or 0.0.0.0 (all)"
    return text


def _version() -> str:
    from vmk import __version__
    return __version__


DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")


def cmd_demo(args) -> int:
    """The demos ship inside the package (vmk/demo/NAME/NAME.toml): print where, for ``vmk build``."""
    names = sorted(n for n in os.listdir(DEMO_DIR) if os.path.isfile(os.path.join(DEMO_DIR, n, f"{n}.toml"))) \
        if os.path.isdir(DEMO_DIR) else []
    if args.name is None:
        for n in names:
            print(f"{n:<10} {os.path.join(DEMO_DIR, n, n + '.toml')}")
        return 0
    if args.name not in names:
        return _fail(f"no demo {args.name!r} (demos: {', '.join(names) or 'none installed'})")
    print(os.path.join(DEMO_DIR, args.name, f"{args.name}.toml"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
