"""Intel 8042 keyboard controller (ports 0x60 and 0x64, IRQ 1 and 12) and the reset line.

How it works
------------
IBM PC/AT Technical Reference, "Keyboard Controller": port 0x64 reads the
status register and takes commands; port 0x60 reads the output buffer and
takes data, either the parameter of the last command (0x60 write command
byte, 0xD1 write output port, 0xD2/0xD3 write the keyboard/auxiliary output
buffer, 0xD4 write to the auxiliary device) or a byte for the keyboard.
Commands finish at once, so the input buffer is never full (IBF = 0).

The output buffer is a FIFO of ``(byte, from_aux)``; its head is what port
0x60 reads.  OBF (status bit 0) says the FIFO is not empty, AUX_OBF (bit 5)
that the head came from the auxiliary (mouse) port.  IRQ 1 is high while the
head is a keyboard or controller byte and command byte bit 0 (INT) is set,
IRQ 12 while it is an auxiliary byte and bit 1 (INT2) is set; ``_update_irq``
alone drives both.  Reading port 0x60 with the FIFO empty returns the last
byte read (as QEMU).

Commands (PC/AT reference, "Commands (I/O Address Hex 64)", and the PS/2
additions): 0x20-0x3F read controller RAM (0x20: the command byte), 0x60-0x7F
write it, 0xA7/0xA8 disable/enable the auxiliary port, 0xA9 and 0xAB
interface tests (0x00: no error), 0xAA self-test (0x55, sets the system flag),
0xAD/0xAE disable/enable the keyboard, 0xC0 read input port, 0xD0 read output
port, 0xD1 write output port, 0xE0 read test inputs, 0xF0-0xFF pulse output
port bits 0-3 low for 6 us: bit 0 is the CPU reset line, so an even command
(0xFE) resets the machine.  Writing the output port with bit 0 = 0 holds the
CPU in reset: also a reset.  Resets go to the ``reset`` callback.

The keyboard and mouse behind the controller are minimal PS/2 devices that
answer the host's commands (ACK 0xFA; reset 0xFF gives 0xAA, and 0x00 for a
mouse; 0xF2 identify gives 0xAB 0x83, or 0xAB 0x41 with translation, and 0x00
for a mouse; 0xEE echo) so that drivers find them; no key is ever pressed.

The power-on state is what QEMU 7.2 shows after SeaBIOS: command byte 0x61
(translate, auxiliary disabled, keyboard interrupt), status 0x1C, output
port 0xCF.

Not modelled
------------
* The A20 gate (output port bit 1): it is stored; the CPU always sees A20.
* Typematic keys, scancode translation of real input, mouse movement,
  parity and timeout errors (status bits 6-7 stay 0), the password commands.
"""
from __future__ import annotations

from collections import deque
from enum import IntEnum, IntFlag
from typing import Callable

from vmk.machine.devices import Log, nolog
from vmk.machine.irq import IrqLine

__all__ = ["I8042", "Status", "CmdByte", "Cmd", "OutPort"]


class Port:
    DATA = 0x00                     # 0x60
    STATUS = 0x04                   # 0x64 (command on write)


class Status(IntFlag):
    """Status register (PC/AT reference, "Status-Register Bit Definition")."""
    OBF = 0x01                      # output buffer full
    IBF = 0x02                      # input buffer full
    SYS = 0x04                      # system flag
    CMD = 0x08                      # A2: the last write was a command (port 0x64)
    UNLOCKED = 0x10                 # inhibit switch: 1 = keyboard not inhibited
    AUX_OBF = 0x20                  # PS/2: the output buffer holds an auxiliary byte
    TIMEOUT = 0x40
    PARITY = 0x80


class CmdByte(IntFlag):
    """Controller command byte (RAM byte 0)."""
    INT = 0x01                      # keyboard output buffer full interrupt (IRQ 1)
    INT2 = 0x02                     # auxiliary output buffer full interrupt (IRQ 12)
    SYS = 0x04                      # system flag (copied into the status register)
    OVERRIDE = 0x08                 # inhibit override
    DISABLE_KBD = 0x10
    DISABLE_AUX = 0x20
    XLATE = 0x40                    # translate scancodes to set 1


class OutPort(IntFlag):
    """Output port (command 0xD0/0xD1)."""
    RESET = 0x01                    # 0 = CPU reset asserted
    A20 = 0x02
    OBF = 0x10                      # output buffer full (keyboard)
    AUX_OBF = 0x20
    KBD_CLOCK = 0x40
    KBD_DATA = 0x80


class Cmd(IntEnum):
    READ_RAM = 0x20                 # 0x20-0x3F
    WRITE_RAM = 0x60                # 0x60-0x7F
    DISABLE_AUX = 0xA7
    ENABLE_AUX = 0xA8
    TEST_AUX = 0xA9
    SELF_TEST = 0xAA
    TEST_KBD = 0xAB
    DISABLE_KBD = 0xAD
    ENABLE_KBD = 0xAE
    READ_INPUT = 0xC0
    READ_OUTPUT = 0xD0
    WRITE_OUTPUT = 0xD1
    WRITE_KBD_OBUF = 0xD2
    WRITE_AUX_OBUF = 0xD3
    WRITE_AUX = 0xD4
    READ_TEST = 0xE0
    PULSE = 0xF0                    # 0xF0-0xFF: bits 3-0 low = pulse that output port bit


RAM_SIZE = 32
RAM_CMD_MASK = 0x1F
SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
ACK = 0xFA
BAT_OK = 0xAA
ECHO = 0xEE
KBD_ID = (0xAB, 0x83)
KBD_ID_XLATED = (0xAB, 0x41)
DEV_RESET = 0xFF
DEV_IDENTIFY = 0xF2
DEV_ECHO = 0xEE
DEV_WITH_PARAMETER = frozenset((0xED, 0xF0, 0xF3))     # set LEDs, scancode set, typematic rate
MOUSE_WITH_PARAMETER = frozenset((0xE8, 0xF3))        # set resolution, sample rate
CMD_BYTE_POWER_ON = int(CmdByte.XLATE | CmdByte.DISABLE_AUX | CmdByte.INT)
STATUS_POWER_ON = int(Status.SYS | Status.CMD | Status.UNLOCKED)
OUTPORT_POWER_ON = 0xCF
PARAMETER_CMDS = frozenset((Cmd.WRITE_OUTPUT, Cmd.WRITE_KBD_OBUF, Cmd.WRITE_AUX_OBUF, Cmd.WRITE_AUX))


class I8042:
    def __init__(self, irq_kbd: IrqLine, irq_aux: IrqLine, reset: Callable[[str], None],
                 log: Log = nolog) -> None:
        self._irq_kbd = irq_kbd
        self._irq_aux = irq_aux
        self._reset_request = reset
        self.log = log
        self.reset()

    def reset(self) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.ram[0] = CMD_BYTE_POWER_ON
        self.status = STATUS_POWER_ON
        self.outport = OUTPORT_POWER_ON
        self.queue: deque[tuple[int, bool]] = deque()
        self.last = 0
        self.pending: int | None = None        # a command waiting for its data byte
        self.kbd_param: int | None = None      # a keyboard command waiting for its parameter
        self.aux_param: int | None = None
        self._update_irq()

    # -- output buffer and interrupts -------------------------------------------------
    def _put(self, data: int, aux: bool = False) -> None:
        self.queue.append((data & 0xFF, aux))
        self._update_irq()

    def _update_irq(self) -> None:
        head = self.queue[0] if self.queue else None
        cmd = self.ram[0]
        self._irq_kbd.set(head is not None and not head[1] and bool(cmd & CmdByte.INT))
        self._irq_aux.set(head is not None and head[1] and bool(cmd & CmdByte.INT2))

    def _status(self) -> int:
        s = self.status & ~(Status.OBF | Status.AUX_OBF | Status.IBF)
        if self.queue:
            s |= Status.OBF | (Status.AUX_OBF if self.queue[0][1] else 0)
        return s

    # -- registers -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == Port.STATUS:
            return self._status()
        if offset != Port.DATA:
            return 0xFF
        if self.queue:
            self.last = self.queue.popleft()[0]
            self._update_irq()
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == Port.STATUS:
            self.status |= Status.CMD
            self._command(value)
        elif offset == Port.DATA:
            self.status &= ~Status.CMD
            self._data(value)

    def _command(self, c: int) -> None:
        self.pending = None
        if Cmd.READ_RAM <= c < Cmd.READ_RAM + RAM_SIZE:
            self._put(self.ram[c & RAM_CMD_MASK])
        elif Cmd.WRITE_RAM <= c < Cmd.WRITE_RAM + RAM_SIZE or c in PARAMETER_CMDS:
            self.pending = c
        elif c == Cmd.DISABLE_AUX:
            self._set_cmd_byte(self.ram[0] | CmdByte.DISABLE_AUX)
        elif c == Cmd.ENABLE_AUX:
            self._set_cmd_byte(self.ram[0] & ~CmdByte.DISABLE_AUX)
        elif c in (Cmd.TEST_AUX, Cmd.TEST_KBD):
            self._put(INTERFACE_OK)
        elif c == Cmd.SELF_TEST:
            self.status |= Status.SYS
            self._put(SELF_TEST_OK)
        elif c == Cmd.DISABLE_KBD:
            self._set_cmd_byte(self.ram[0] | CmdByte.DISABLE_KBD)
        elif c == Cmd.ENABLE_KBD:
            self._set_cmd_byte(self.ram[0] & ~CmdByte.DISABLE_KBD)
        elif c in (Cmd.READ_INPUT, Cmd.READ_TEST):
            self._put(0x00)
        elif c == Cmd.READ_OUTPUT:
            out = self.outport & ~(OutPort.OBF | OutPort.AUX_OBF)
            if self.queue:
                out |= OutPort.AUX_OBF if self.queue[0][1] else OutPort.OBF
            self._put(out)
        elif c >= Cmd.PULSE:
            if not c & OutPort.RESET:
                self._reset_request("keyboard controller command 0x%02X" % c)
        else:
            self.log(f"unknown command {c:#04x} ignored")

    def _set_cmd_byte(self, v: int) -> None:
        self.ram[0] = v & 0xFF
        self.status = (self.status & ~Status.SYS) | (v & CmdByte.SYS)
        self._update_irq()

    def _data(self, v: int) -> None:
        c, self.pending = self.pending, None
        if c is None:
            self._set_cmd_byte(self.ram[0] & ~CmdByte.DISABLE_KBD)   # a byte for the keyboard enables it
            self._keyboard(v)
        elif Cmd.WRITE_RAM <= c < Cmd.WRITE_RAM + RAM_SIZE:
            if c == Cmd.WRITE_RAM:
                self._set_cmd_byte(v)
            else:
                self.ram[c & RAM_CMD_MASK] = v
        elif c == Cmd.WRITE_OUTPUT:
            self.outport = v
            if not v & OutPort.RESET:
                self._reset_request("keyboard controller output port (reset line low)")
            elif not v & OutPort.A20:
                self.log("A20 masking (output port bit 1 = 0) is not modelled")
        elif c == Cmd.WRITE_KBD_OBUF:
            self._put(v)
        elif c == Cmd.WRITE_AUX_OBUF:
            self._put(v, aux=True)
        elif c == Cmd.WRITE_AUX:
            self._set_cmd_byte(self.ram[0] & ~CmdByte.DISABLE_AUX)
            self._mouse(v)

    # -- the devices behind the controller ---------------------------------------------------
    def _keyboard(self, v: int) -> None:
        if self.kbd_param is not None:
            self.kbd_param = None
            self._put(ACK)
            return
        if v == DEV_ECHO:
            self._put(ECHO)
            return
        self._put(ACK)
        if v == DEV_RESET:
            self._put(BAT_OK)
        elif v == DEV_IDENTIFY:
            for b in KBD_ID_XLATED if self.ram[0] & CmdByte.XLATE else KBD_ID:
                self._put(b)
        elif v in DEV_WITH_PARAMETER:
            self.kbd_param = v

    def _mouse(self, v: int) -> None:
        if self.aux_param is not None:
            self.aux_param = None
            self._put(ACK, aux=True)
            return
        self._put(ACK, aux=True)
        if v == DEV_RESET:
            self._put(BAT_OK, aux=True)
            self._put(0x00, aux=True)
        elif v == DEV_IDENTIFY:
            self._put(0x00, aux=True)
        elif v in MOUSE_WITH_PARAMETER:
            self.aux_param = v

    # -- snapshots ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"ram": bytes(self.ram), "status": self.status, "outport": self.outport,
                "queue": list(self.queue), "last": self.last, "pending": self.pending,
                "kbd_param": self.kbd_param, "aux_param": self.aux_param}

    def restore(self, state: dict) -> None:
        self.ram = bytearray(state["ram"])
        self.status = state["status"]
        self.outport = state["outport"]
        self.queue = deque((b, a) for b, a in state["queue"])
        self.last = state["last"]
        self.pending = state["pending"]
        self.kbd_param = state["kbd_param"]
        self.aux_param = state["aux_param"]
        self._update_irq()
