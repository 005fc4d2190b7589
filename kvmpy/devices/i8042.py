"""The PC keyboard controller (Intel 8042 as in the IBM PC/AT and PS/2) with a keyboard behind it.

Ports (base 0x60, window 5): offset 0 is the data port (0x60), offset 4 the status (read) and
command (write) port (0x64). Offsets 1-3 (0x61-0x63) are not this device's: 0x61 is the PC's
system control port B, which kvmpy does not model, so they read all-ones and drop writes.

What it models: enough for Linux's i8042 and atkbd probes (drivers/input/serio/i8042.c,
drivers/input/keyboard/atkbd.c) and for firmware-style polling: the status register, the
controller's 32-byte RAM whose byte 0 is the command byte (CTR), controller commands 0x20-0x3f /
0x60-0x7f (RAM read/write), 0xA7/0xA8 (AUX disable/enable), 0xA9 (AUX test -> 0x00), 0xAA (self
test -> 0x55), 0xAB (keyboard test -> 0x00), 0xAD/0xAE (keyboard disable/enable), 0xC0 (input port
-> 0x80, as QEMU), 0xD0/0xD1 (output port), 0xD2/0xD3 (write keyboard/AUX output buffer), 0xD4
(write to the AUX device), 0xDD/0xDF (A20 bit), 0xFE (reset); and a keyboard answering 0xFF
(reset -> FA AA), 0xFE (resend), 0xF6/0xF5/0xF4, 0xF2 (identify -> FA AB 83), 0xEE (echo),
0xED/0xF3/0xF0 with their argument byte, 0xF7-0xFD (set-3 key types, acknowledged).

What it deliberately does not model:
- Resets other than command 0xFE. Hardware also resets on 0xF0-0xFD with bit 0 clear (pulse
  output-port bits) and on a 0xD1 write with bit 0 clear; QEMU follows it. kvmpy treats only 0xFE
  as a reset (hostile-inputs item 23: only 0xFE resets), and only records the others.
- A mouse. Nothing is attached to the AUX port: a byte sent with 0xD4 is answered with 0xFE and
  the status timeout bit, as a controller with no device reports. 0xD3 (AUX loopback) works, so
  Linux's loopback tests pass; Linux then tests AUX IRQ delivery, which passes only if
  ``irq_aux`` is wired (otherwise Linux waits 250 ms and drops the AUX port; the builder wires
  it to IRQ 12).
- Scancode translation. Bytes given to ``feed_scancodes`` are delivered as they are: they are what
  the guest reads from port 0x60 (set 1 while CTR.XLATE is set, which is the default). Only the
  keyboard's own replies are translated, as the controller would (ID 0x83 -> 0x41, set numbers).
- A20 and timing: A20 is only a bit in the output port; every command completes at once (IBF is
  never set).

Interrupts: IRQ1 (``irq_kbd``) is high while a keyboard or controller byte sits in the output
buffer and the CTR enables it (KBDINT set, KBDDIS clear, as QEMU's kbd_update_irq); IRQ12
(``irq_aux``) likewise for AUX bytes with CTR.AUXINT. When the guest reads a byte and another
follows, the line is lowered and raised again, so an edge-triggered input (the ISA IRQs are
edge-triggered) sees one edge per byte, as the real controller's gap between bytes gives.
``irq_*`` are called only on a change, with the device lock held; they must not re-enter it.

The output queue is bounded: host scancodes are accepted only while the queue holds fewer than 16
bytes (the keyboard's own buffer size), replies to the guest's commands up to 32; the excess is
dropped and counted in ``dropped``.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from kvmpy.outcome import ExitStatus, Outcome, StopReason, VmStop
from kvmpy.vmexit.bus import BusDevice

DATA = 0                # offset of port 0x60
STATUS = COMMAND = 4    # offset of port 0x64

# Status register (IBM PS/2 Hardware Interface Technical Reference, "Keyboard/Auxiliary Device
# Controller"; names as Linux's drivers/input/serio/i8042.h).
STR_OBF = 0x01          # output buffer full: a byte waits at port 0x60
STR_IBF = 0x02          # input buffer full: never, commands complete at once
STR_SYSFLAG = 0x04      # system flag, copied from CTR bit 2 (set by a passed self test)
STR_CMDDAT = 0x08       # the last write went to port 0x64 (1) or 0x60 (0)
STR_KEYLOCK = 0x10      # 1 = keyboard not inhibited by the keylock switch
STR_AUXDATA = 0x20      # the byte in the output buffer is from the AUX device
STR_TIMEOUT = 0x40      # the AUX/keyboard device did not answer
STR_PARITY = 0x80

# Command byte, controller RAM byte 0 ("CTR" in Linux).
CTR_KBDINT = 0x01       # IRQ1 on keyboard output
CTR_AUXINT = 0x02       # IRQ12 on AUX output
CTR_SYSFLAG = 0x04
CTR_IGNKEYLOCK = 0x08
CTR_KBDDIS = 0x10       # keyboard interface disabled (clock held low)
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40        # translate keyboard scancode set 2 to set 1
# What a PC BIOS leaves for the OS: translation on, system flag set, keyboard interrupt on
# (no AUX interrupt: nothing is attached there).
CTR_DEFAULT = CTR_XLATE | CTR_SYSFLAG | CTR_KBDINT

# Output port (controller port P2) as QEMU's pckbd.c: bit 0 = CPU reset line (1 = running),
# bit 1 = A20 gate, bits 4/5 = keyboard/AUX output buffer full; 0xcc are the bits firmware leaves
# set after the 0xdd/0xdf A20 commands.
OUT_RESET = 0x01
OUT_A20 = 0x02
OUT_OBF = 0x10
OUT_AUX_OBF = 0x20
OUT_DEFAULT = OUT_RESET | OUT_A20 | 0xCC

INPUT_PORT = 0x80       # 0xC0 reply: keyboard not inhibited (as QEMU)
SELF_TEST_OK = 0x55     # 0xAA reply
INTERFACE_OK = 0x00     # 0xA9 / 0xAB reply: no clock or data line stuck

KBD_ACK = 0xFA
KBD_RESEND = 0xFE       # also "invalid command"
KBD_BAT_OK = 0xAA       # basic assurance test passed (after reset)
KBD_ECHO = 0xEE
KBD_ID = (0xAB, 0x83)   # MF2 keyboard
AUX_NO_DEVICE = 0xFE

# The controller's set-2 -> set-1 translation of the replies our keyboard sends (the first four
# entries of the 8042 translation table, and 0x83, the MF2 ID byte / F7 key).
_XLATE_REPLY = {0x01: 0x43, 0x02: 0x41, 0x03: 0x3F, 0x83: 0x41}

_F_AUX = 1              # byte came from the AUX port
_F_TIMEOUT = 2          # byte reports a device timeout

HOST_LIMIT = 16         # a PS/2 keyboard buffers 16 bytes
QUEUE_LIMIT = 32        # replies: a command adds at most 3, so this only bounds a hostile guest

_RESET = Outcome(StopReason.RESET, ExitStatus.OK,
                 "guest reset the machine through the i8042 (command 0xfe)")


class I8042(BusDevice):
    name = "i8042"
    window = 5

    def __init__(self, irq_kbd: Callable[[int], None] | None = None,
                 irq_aux: Callable[[int], None] | None = None):
        self._irq_kbd = irq_kbd
        self._irq_aux = irq_aux
        self._lock = threading.Lock()
        self.dropped = 0
        self._ram = bytearray(32)
        self._ram[0] = CTR_DEFAULT
        self._status = STR_KEYLOCK | STR_SYSFLAG
        self._outport = OUT_DEFAULT
        self._out: deque[tuple[int, int]] = deque()     # (byte, _F_* flags); head = output buffer
        self._last_read = 0
        self._pending_cmd: int | None = None            # controller command awaiting a data byte
        self._kbd_line = 0
        self._aux_line = 0
        # The keyboard.
        self._kbd_arg_cmd: int | None = None            # keyboard command awaiting its argument
        self._kbd_last = KBD_ACK                        # for 0xFE (resend)
        self._scanning = True
        self._scancode_set = 2
        self.leds = 0
        self.typematic = 0x2B   # power-on default: 10.9 chars/s, 500 ms delay
        self.last_pulse: int | None = None              # last 0xF0-0xFD command, not acted on

    # -- host side -------------------------------------------------------------------------

    def feed_scancodes(self, data: bytes) -> int:
        """Queue bytes from the host keyboard; return how many were accepted.

        The bytes reach the guest as they are (see the module docstring on translation). Nothing
        is accepted while the keyboard is not scanning (after 0xF5) or its interface is disabled
        (CTR.KBDDIS); otherwise up to 16 bytes wait in the queue. The rest is dropped and counted.
        """
        with self._lock:
            if not self._scanning or self._ram[0] & CTR_KBDDIS:
                accepted = 0
            else:
                accepted = max(0, min(len(data), HOST_LIMIT - len(self._out)))
                for b in data[:accepted]:
                    self._out.append((b, 0))
            self.dropped += len(data) - accepted
            self._update_irq()
            return accepted

    # -- guest side ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA:
                value = self._read_data()
            elif offset == STATUS:
                value = self._read_status()
            else:
                return (1 << (8 * max(size, 1))) - 1
        return value | (((1 << (8 * max(size, 1))) - 1) & ~0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == DATA:
                self._status &= ~STR_CMDDAT
                self._write_data(value & 0xFF)
            elif offset == COMMAND:
                self._status |= STR_CMDDAT
                self._write_command(value & 0xFF)
            else:
                return
            self._update_irq()

    def register_name(self, offset: int, is_write: bool) -> str | None:
        if offset == DATA:
            return "DATA"
        if offset == STATUS:
            return "COMMAND" if is_write else "STATUS"
        return None

    # -- controller (lock held) ------------------------------------------------------------

    def _read_status(self) -> int:
        status = self._status & ~(STR_OBF | STR_AUXDATA | STR_TIMEOUT)
        if self._out:
            _, flags = self._out[0]
            status |= STR_OBF
            if flags & _F_AUX:
                status |= STR_AUXDATA
            if flags & _F_TIMEOUT:
                status |= STR_TIMEOUT
        return status

    def _read_data(self) -> int:
        if not self._out:
            # Empty: the controller still drives the last byte (QEMU does the same for EMM386).
            return self._last_read
        self._last_read, _ = self._out.popleft()
        self._update_irq(pulse=True)
        return self._last_read

    def _queue(self, byte: int, flags: int = 0) -> None:
        if len(self._out) < QUEUE_LIMIT:
            self._out.append((byte, flags))
        else:
            self.dropped += 1

    def _write_command(self, cmd: int) -> None:
        self._pending_cmd = None        # a new command cancels one still waiting for data
        ctr = self._ram[0]
        if 0x20 <= cmd <= 0x3F:
            self._queue(self._ram[cmd - 0x20])
        elif 0x60 <= cmd <= 0x7F or cmd in (0xD1, 0xD2, 0xD3, 0xD4):
            self._pending_cmd = cmd
        elif cmd == 0xA7:
            self._ram[0] = ctr | CTR_AUXDIS
        elif cmd == 0xA8:
            self._ram[0] = ctr & ~CTR_AUXDIS
        elif cmd in (0xA9, 0xAB):
            self._queue(INTERFACE_OK)
        elif cmd == 0xAA:
            self._status |= STR_SYSFLAG
            self._queue(SELF_TEST_OK)
        elif cmd == 0xAD:
            self._ram[0] = ctr | CTR_KBDDIS
        elif cmd == 0xAE:
            self._ram[0] = ctr & ~CTR_KBDDIS
        elif cmd == 0xC0:
            self._queue(INPUT_PORT)
        elif cmd == 0xD0:
            obf = 0
            if self._out:
                obf = OUT_AUX_OBF if self._out[0][1] & _F_AUX else OUT_OBF
            self._queue((self._outport & ~(OUT_OBF | OUT_AUX_OBF)) | obf)
        elif cmd == 0xDD:
            self._outport &= ~OUT_A20
        elif cmd == 0xDF:
            self._outport |= OUT_A20
        elif cmd == 0xFE:
            raise VmStop(_RESET)
        elif 0xF0 <= cmd <= 0xFD:
            self.last_pulse = cmd       # would pulse output-port bits; see the module docstring
        # Anything else (0xFF no-op, vendor commands) is ignored.

    def _write_data(self, value: int) -> None:
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd is None:
            self._keyboard_command(value)
        elif 0x60 <= cmd <= 0x7F:
            self._ram[cmd - 0x60] = value
            if cmd == 0x60:
                # CTR bit 2 is copied to the status register's system flag.
                self._status = (self._status & ~STR_SYSFLAG) | (value & CTR_SYSFLAG)
        elif cmd == 0xD1:
            # Bit 0 low would reset the CPU on hardware; kvmpy resets only on 0xFE.
            self._outport = value
        elif cmd == 0xD2:
            self._queue(value)
        elif cmd == 0xD3:
            self._queue(value, _F_AUX)
        elif cmd == 0xD4:
            self._queue(AUX_NO_DEVICE, _F_AUX | _F_TIMEOUT)

    # -- keyboard (lock held) --------------------------------------------------------------

    def _reply(self, *data: int) -> None:
        for b in data:
            if self._ram[0] & CTR_XLATE:
                b = _XLATE_REPLY.get(b, b)
            self._kbd_last = b
            self._queue(b)

    def _keyboard_defaults(self) -> None:
        self.typematic = 0x2B
        self._scancode_set = 2

    def _keyboard_command(self, value: int) -> None:
        arg_cmd, self._kbd_arg_cmd = self._kbd_arg_cmd, None
        if arg_cmd == 0xED:                 # set LEDs: scroll, num, caps lock in bits 0-2
            self.leds = value & 0x07
            self._reply(KBD_ACK)
        elif arg_cmd == 0xF3:               # typematic rate and delay
            self.typematic = value & 0x7F
            self._reply(KBD_ACK)
        elif arg_cmd == 0xF0:               # scancode set: 0 asks, 1-3 select
            if value == 0:
                self._reply(KBD_ACK, self._scancode_set)
            elif value in (1, 2, 3):
                self._scancode_set = value
                self._reply(KBD_ACK)
            else:
                self._reply(KBD_RESEND)
        elif value == 0xFF:                 # reset: ACK, then the self-test result
            self._keyboard_defaults()
            self._scanning = True
            self.leds = 0
            self._reply(KBD_ACK, KBD_BAT_OK)
        elif value == 0xFE:                 # resend the last byte
            self._queue(self._kbd_last)   # already translated when it was sent
        elif value == 0xF6:                 # set defaults
            self._keyboard_defaults()
            self._reply(KBD_ACK)
        elif value == 0xF5:                 # set defaults and stop scanning
            self._keyboard_defaults()
            self._scanning = False
            self._reply(KBD_ACK)
        elif value == 0xF4:                 # start scanning
            self._scanning = True
            self._reply(KBD_ACK)
        elif value == 0xF2:                 # identify
            self._reply(KBD_ACK, *KBD_ID)
        elif value == 0xEE:                 # echo (no ACK)
            self._reply(KBD_ECHO)
        elif value in (0xED, 0xF3, 0xF0):   # commands that take an argument byte
            self._kbd_arg_cmd = value
            self._reply(KBD_ACK)
        elif 0xF7 <= value <= 0xFD:         # scancode-set-3 key types: accepted, ignored
            self._reply(KBD_ACK)
        else:
            self._reply(KBD_RESEND)

    # -- interrupts (lock held) ------------------------------------------------------------

    def _update_irq(self, pulse: bool = False) -> None:
        ctr = self._ram[0]
        kbd = aux = 0
        if self._out:
            if self._out[0][1] & _F_AUX:
                aux = 1 if ctr & CTR_AUXINT else 0
            elif ctr & CTR_KBDINT and not ctr & CTR_KBDDIS:
                kbd = 1
        if pulse:
            # A byte was taken: drop the line so the next byte makes a fresh edge.
            self._set_kbd_line(0)
            self._set_aux_line(0)
        self._set_kbd_line(kbd)
        self._set_aux_line(aux)

    def _set_kbd_line(self, level: int) -> None:
        if level != self._kbd_line:
            self._kbd_line = level
            if self._irq_kbd is not None:
                self._irq_kbd(level)

    def _set_aux_line(self, level: int) -> None:
        if level != self._aux_line:
            self._aux_line = level
            if self._irq_aux is not None:
                self._irq_aux(level)
