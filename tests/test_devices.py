"""Legacy devices through the PIO bus at their PC ports. No /dev/kvm needed.

Expected values are written out from the datasheets (or computed with the standard library), not
taken from the devices' own code.
"""
from __future__ import annotations

import calendar
import random

import pytest

from kvmpy.devices.cmos import CmosRtc
from kvmpy.devices.debug_exit import DebugExit
from kvmpy.devices.i8042 import I8042
from kvmpy.devices.post import PostPort
from kvmpy.devices.uart import Uart16550
from kvmpy.outcome import ExitStatus, StopReason, VmStop
from kvmpy.vmexit.bus import PioBus

COM1, I8042_BASE, CMOS_BASE, POST_PORT, DEBUG_EXIT = 0x3F8, 0x60, 0x70, 0x80, 0xF4
SIZES = (1, 2, 4, 8)


class Ports:
    """in/out through a PioBus, the way the vCPU exit handler will reach the devices."""

    def __init__(self) -> None:
        self.bus = PioBus()

    def add(self, device, base):
        self.bus.insert(device, base)
        return device

    def inp(self, port: int, size: int = 1) -> int:
        m = self.bus.lookup(port)
        mask = (1 << (8 * size)) - 1
        if m is None:
            return mask
        return m.device.read(port - m.base, size) & mask

    def out(self, port: int, value: int, size: int = 1) -> None:
        m = self.bus.lookup(port)
        if m is not None:
            m.device.write(port - m.base, size, value & ((1 << (8 * size)) - 1))


class IrqRecorder:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, level: int) -> None:
        self.calls.append(level)


def assert_alternates(calls: list[int]) -> None:
    """A line that is only ever told about changes: 1, 0, 1, 0, ..."""
    assert calls == [1 - i % 2 for i in range(len(calls))]


# ---------------------------------------------------------------------------------------------
# 16550A UART at COM1

RBR = THR = DLL = COM1
IER = DLM = COM1 + 1
IIR = FCR = COM1 + 2
LCR, MCR, LSR, MSR, SCR = COM1 + 3, COM1 + 4, COM1 + 5, COM1 + 6, COM1 + 7


def make_uart(irq=None):
    p = Ports()
    sent: list[bytes] = []
    uart = p.add(Uart16550("COM1", sink=sent.append, irq=irq), COM1)
    return p, uart, sent


def test_uart_reset_state():
    p, _, _ = make_uart()
    # PC16550D reset configuration: LSR = THRE|TEMT, IIR = no interrupt, MSR inputs of a ready
    # null modem (DCD|DSR|CTS), everything else 0.
    assert p.inp(LSR) == 0x60
    assert p.inp(IIR) == 0x01
    assert p.inp(MSR) == 0xB0
    assert [p.inp(r) for r in (IER, LCR, MCR)] == [0, 0, 0]


def test_uart_transmit_goes_to_sink_at_once():
    p, uart, sent = make_uart()
    for ch in b"hi\n":
        p.out(THR, ch)
        assert p.inp(LSR) & 0x60 == 0x60          # THRE and TEMT set again
    assert sent == [b"h", b"i", b"\n"]
    p.out(THR, 0x1234, size=2)                    # wide write: low byte only
    assert sent[-1] == b"\x34"


def test_uart_scratch_register():
    p, _, _ = make_uart()
    for v in range(256):
        p.out(SCR, v)
        assert p.inp(SCR) == v


def test_uart_divisor_latch_round_trip():
    p, _, sent = make_uart()
    p.out(IER, 0x05)
    p.out(LCR, 0x83)                              # DLAB + 8N1
    p.out(DLL, 0x0C)                              # 9600 baud
    p.out(DLM, 0x01)
    assert (p.inp(DLL), p.inp(DLM)) == (0x0C, 0x01)
    assert sent == []                             # DLL writes are not THR writes
    p.out(LCR, 0x03)
    assert p.inp(IER) == 0x05                     # IER untouched by DLM
    assert p.inp(LCR) == 0x03
    p.out(LCR, 0x83)
    assert (p.inp(DLL), p.inp(DLM)) == (0x0C, 0x01)


def test_uart_ier_upper_bits_read_zero():
    p, _, _ = make_uart()
    p.out(IER, 0xFF)
    assert p.inp(IER) == 0x0F
    p.out(MCR, 0xFF)
    assert p.inp(MCR) == 0x1F


def test_uart_loopback():
    p, _, sent = make_uart()
    p.out(MCR, 0x10 | 0x0A)                       # LOOP | OUT2 | RTS: Linux's probe
    assert p.inp(MSR) & 0xF0 == 0x90              # DCD (from OUT2) | CTS (from RTS)
    p.out(MCR, 0x10 | 0x0F)
    assert p.inp(MSR) & 0xF0 == 0xF0
    p.out(MCR, 0x10)
    assert p.inp(MSR) & 0xF0 == 0x00
    p.out(THR, 0x41)
    assert sent == []                             # serial output held marking
    assert p.inp(LSR) & 0x01
    assert p.inp(RBR) == 0x41
    assert not p.inp(LSR) & 0x01
    p.out(MCR, 0x00)
    p.out(THR, 0x42)
    assert sent == [b"B"]


def test_uart_feed_sets_data_ready():
    p, uart, _ = make_uart()
    assert uart.feed(b"x") == 1
    assert p.inp(LSR) == 0x61
    assert p.inp(RBR) == ord("x")
    assert p.inp(LSR) == 0x60


def test_uart_character_mode_holds_one_byte_and_reports_overrun():
    p, uart, _ = make_uart()
    assert uart.feed(b"ab") == 1
    assert uart.rx_dropped == 1
    assert p.inp(LSR) == 0x63                     # DR | OE | THRE | TEMT
    assert p.inp(LSR) == 0x61                     # OE cleared by the read
    assert p.inp(RBR) == ord("a")


def test_uart_fifo_bounded_under_flood():
    p, uart, _ = make_uart()
    p.out(FCR, 0x07)                              # enable + clear both FIFOs, trigger 1
    assert p.inp(IIR) & 0xC0 == 0xC0
    rng = random.Random(1)
    flood = bytes(rng.randrange(256) for _ in range(10 * 1024))
    accepted = sum(uart.feed(flood[i:i + 100]) for i in range(0, len(flood), 100))
    assert accepted == 16
    assert uart.rx_dropped == 10 * 1024 - 16
    assert uart.rx_free() == 0
    got = bytes(p.inp(RBR) for _ in range(16))
    assert got == flood[:16]
    assert p.inp(LSR) & 0x01 == 0
    assert uart.rx_free() == 16


def test_uart_fifo_clear_and_disable():
    p, uart, _ = make_uart()
    p.out(FCR, 0x01)
    uart.feed(b"abc")
    p.out(FCR, 0x03)                              # clear RX
    assert p.inp(LSR) & 0x01 == 0
    uart.feed(b"abc")
    p.out(FCR, 0x00)                              # leaving FIFO mode clears it too
    assert p.inp(LSR) & 0x01 == 0
    assert p.inp(IIR) == 0x01


def test_uart_iir_priorities():
    p, uart, _ = make_uart()
    p.out(FCR, 0x01)                              # FIFO on, trigger level 1
    p.out(MCR, 0x10)                              # loopback: DCD/DSR/CTS drop ...
    p.out(MCR, 0x08)                              # ... and come back: delta bits set
    assert uart.feed(bytes(range(17))) == 16      # the 17th overruns
    p.out(IER, 0x0F)                              # all four sources; THRE pending at once
    assert p.inp(IIR) == 0xC6                     # 1st: receiver line status
    assert p.inp(LSR) == 0x63                     # DR | OE | THRE | TEMT
    assert p.inp(IIR) == 0xC4                     # 2nd: received data
    assert [p.inp(RBR) for _ in range(16)] == list(range(16))
    assert p.inp(IIR) == 0xC2                     # 3rd: THR empty, cleared by this read
    assert p.inp(IIR) == 0xC0                     # 4th: modem status
    assert p.inp(MSR) == 0xBB                     # DCD DSR CTS + DDCD DDSR DCTS
    assert p.inp(IIR) == 0xC1
    p.out(THR, 0x20)                              # THR empty again -> THRE again
    assert p.inp(IIR) == 0xC2


def test_uart_trigger_level_and_timeout():
    p, uart, _ = make_uart()
    p.out(FCR, 0xC1)                              # trigger level 14
    p.out(IER, 0x01)
    uart.feed(b"abc")
    assert p.inp(IIR) == 0xCC                     # below the trigger: character timeout
    uart.feed(b"d" * 11)
    assert p.inp(IIR) == 0xC4                     # 14 bytes: trigger level reached
    p.inp(RBR)
    assert p.inp(IIR) == 0xCC
    p.out(FCR, 0x00)                              # character mode: no FIFO bits, no timeout
    uart.feed(b"z")
    assert p.inp(IIR) == 0x04


def test_uart_irq_line():
    irq = IrqRecorder()
    p, uart, _ = make_uart(irq)
    p.out(IER, 0x01)
    uart.feed(b"a")
    assert irq.calls == []                        # OUT2 clear: the PC's IRQ buffer is off
    p.out(MCR, 0x08)
    assert irq.calls == [1]
    p.inp(RBR)
    assert irq.calls == [1, 0]
    uart.feed(b"b")                               # host thread raises it
    assert irq.calls == [1, 0, 1]
    p.inp(LSR)                                    # unrelated reads do not touch the line
    assert irq.calls == [1, 0, 1]
    p.out(MCR, 0x18)                              # loopback forces OUT2 inactive
    assert irq.calls == [1, 0, 1, 0]
    p.out(MCR, 0x08)
    assert irq.calls == [1, 0, 1, 0, 1]
    p.inp(RBR)
    assert irq.calls == [1, 0, 1, 0, 1, 0]
    p.out(IER, 0x02)                              # ETBEI rising edge with THR empty
    assert irq.calls[-1] == 1
    p.inp(IIR)                                    # reading IIR clears THRE
    assert irq.calls[-1] == 0
    p.out(THR, 0x41)
    assert irq.calls[-1] == 1
    p.out(IER, 0x00)
    assert irq.calls[-1] == 0
    assert_alternates(irq.calls)


def test_uart_wide_and_out_of_window_accesses():
    p, uart, _ = make_uart()
    p.out(SCR, 0x5A)
    assert p.inp(SCR, 2) == 0xFF5A
    assert p.inp(SCR, 4) == 0xFFFFFF5A
    assert p.inp(SCR, 8) == 0xFFFFFFFFFFFFFF5A
    assert uart.read(8, 1) == 0xFF
    uart.write(100, 4, 0xDEADBEEF)
    names = [uart.register_name(o, w) for o in range(8) for w in (False, True)]
    assert names == ["RBR", "THR", "IER", "IER", "IIR", "FCR", "LCR", "LCR",
                     "MCR", "MCR", "LSR", "LSR", "MSR", "MSR", "SCR", "SCR"]
    p.out(LCR, 0x80)
    assert uart.register_name(0, True) == "DLL"
    assert uart.register_name(1, False) == "DLM"


def test_uart_linux_8250_autoconfig_sees_a_16550a():
    """The register dance of Linux's autoconfig() / autoconfig_16550a() (8250_port.c)."""
    p, _, _ = make_uart()
    # Existence test: IER reads back 0, then 0x0f.
    p.out(IER, 0)
    assert p.inp(IER) & 0x0F == 0
    p.out(IER, 0x0F)
    assert p.inp(IER) & 0x0F == 0x0F
    p.out(IER, 0)
    # Loopback test: MCR = LOOP | OUT2 | RTS must show DCD | CTS.
    p.out(MCR, 0x1A)
    assert p.inp(MSR) & 0xF0 == 0x90
    p.out(MCR, 0)
    # FIFO test: IIR bits 7-6 = 3 means a 16550A.
    p.out(FCR, 0x01)
    assert p.inp(IIR) >> 6 == 3
    # No EFR at offset 2 with LCR = 0x80 or 0xbf (16650 tests): IIR shows through, non-zero.
    for lcr in (0x80, 0xBF):
        p.out(LCR, lcr)
        assert p.inp(IIR) != 0
    # Not a 16750: FCR bit 5 does not set IIR bit 5, with or without DLAB.
    p.out(LCR, 0)
    p.out(FCR, 0x21)
    assert p.inp(IIR) & 0xE0 == 0xC0
    p.out(LCR, 0x80)
    p.out(FCR, 0x21)
    assert p.inp(IIR) & 0xE0 == 0xC0
    p.out(LCR, 0)
    # Not an XScale: IER bit 6 (UUE) does not stick.
    p.out(IER, 0x40)
    assert p.inp(IER) == 0
    # serial8250_do_startup's THRE test: THRE must be re-asserted after IER is toggled.
    p.out(IER, 0x02)
    iir1 = p.inp(IIR)
    p.out(IER, 0)
    p.out(IER, 0x02)
    iir2 = p.inp(IIR)
    p.out(IER, 0)
    assert not iir1 & 0x01 and not iir2 & 0x01


def test_uart_host_thread_feed_with_flow_control_loses_nothing():
    import threading
    import time as _time

    p, uart, _ = make_uart()
    p.out(FCR, 0x01)
    data = bytes(random.Random(7).randrange(256) for _ in range(5000))

    def host():
        i = 0
        while i < len(data):
            room = uart.rx_free()
            i += uart.feed(data[i:i + room]) if room else 0
            if not room:
                _time.sleep(0)

    t = threading.Thread(target=host)
    t.start()
    got = bytearray()
    deadline = _time.monotonic() + 30
    while len(got) < len(data) and _time.monotonic() < deadline:
        if p.inp(LSR) & 0x01:
            got.append(p.inp(RBR))
    t.join(5)
    assert bytes(got) == data
    assert uart.rx_dropped == 0


def test_uart_fuzz_never_raises():
    rng = random.Random(0x16550)
    irq = IrqRecorder()
    p, uart, _ = make_uart(irq)
    for _ in range(20_000):
        r = rng.random()
        if r < 0.1:
            p.out(LCR, rng.choice((0x03, 0x83, rng.randrange(256))))   # DLAB toggling
        elif r < 0.2:
            uart.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
        else:
            offset, size = rng.randrange(8), rng.choice(SIZES)
            if rng.random() < 0.5:
                v = p.inp(COM1 + offset, size)
                assert 0 <= v < 1 << (8 * size)
            else:
                p.out(COM1 + offset, rng.randrange(1 << (8 * size)), size)
        assert len(uart._rx) <= 16
    assert_alternates(irq.calls)


# ---------------------------------------------------------------------------------------------
# isa-debug-exit

@pytest.mark.parametrize("value, status", [(0, 0x01), (1, 0x03), (0x41, 0x83), (0xFF, 0xFF)])
def test_debug_exit_status(value, status):
    p = Ports()
    p.add(DebugExit(), DEBUG_EXIT)
    with pytest.raises(VmStop) as stop:
        p.out(DEBUG_EXIT, value)
    assert stop.value.outcome.reason is StopReason.DEBUG_EXIT
    assert stop.value.outcome.status == status


def test_debug_exit_wide_write_and_reads():
    p = Ports()
    dev = p.add(DebugExit(), DEBUG_EXIT)
    assert dev.window == 4
    for port in range(DEBUG_EXIT, DEBUG_EXIT + 4):
        for size in SIZES:
            assert p.inp(port, size) == 0         # QEMU's debug_exit_read returns 0
    with pytest.raises(VmStop) as stop:
        p.out(DEBUG_EXIT + 2, 0x12345601, size=4)
    assert stop.value.outcome.status == 0x03      # ((0x12345601 << 1) | 1) & 0xff


# ---------------------------------------------------------------------------------------------
# i8042

DATA, CMD = I8042_BASE, I8042_BASE + 4


def make_kbd(irq_kbd=None, irq_aux=None):
    p = Ports()
    kbd = p.add(I8042(irq_kbd=irq_kbd, irq_aux=irq_aux), I8042_BASE)
    return p, kbd


def command(p: Ports, cmd: int, arg: int | None = None) -> list[int]:
    """Send a controller command (and its data byte); return every byte it answered."""
    p.out(CMD, cmd)
    if arg is not None:
        p.out(DATA, arg)
    out = []
    while p.inp(CMD) & 0x01:
        out.append(p.inp(DATA))
    return out


def keyboard(p: Ports, *data: int) -> list[int]:
    for b in data:
        p.out(DATA, b)
    out = []
    while p.inp(CMD) & 0x01:
        out.append(p.inp(DATA))
    return out


def test_i8042_linux_probe_sequence():
    """What i8042_controller_check/selftest/init and i8042_check_aux/mux do (i8042.c)."""
    p, kbd = make_kbd()
    kbd.feed_scancodes(b"\x1c\x9c")             # keys pressed before the driver loaded
    assert len(keyboard(p)) == 2                  # i8042_flush
    assert command(p, 0xAA) == [0x55]
    ctr = command(p, 0x20)
    assert ctr == command(p, 0x20) == [0x45]      # read twice, must agree
    ctr = (ctr[0] & ~0x01) | 0x10                 # keyboard interrupt off, interface disabled
    assert command(p, 0x60, ctr) == []
    assert command(p, 0xD3, 0x5A) == [0x5A]       # AUX loopback
    assert command(p, 0xA7) == []
    assert command(p, 0x20)[0] & 0x20             # AUX disable sticks
    assert command(p, 0xA8) == []
    assert not command(p, 0x20)[0] & 0x20
    # Active-multiplexing probe: a plain echo of the third byte means "not a MUX".
    assert [command(p, 0xD3, b)[0] for b in (0xF0, 0x56, 0xA4)] == [0xF0, 0x56, 0xA4]
    command(p, 0x60, 0x45)                        # keyboard port enabled, interrupt on
    assert keyboard(p, 0xF2) == [0xFA, 0xAB, 0x41]  # atkbd_probe: translated MF2 keyboard
    assert keyboard(p, 0xF4) == [0xFA]


def test_i8042_self_tests():
    p, _ = make_kbd()
    assert command(p, 0xAA) == [0x55]
    assert p.inp(CMD) & 0x04                      # system flag after a passed self test
    assert command(p, 0xAB) == [0x00]
    assert command(p, 0xA9) == [0x00]
    assert command(p, 0xC0) == [0x80]


def test_i8042_command_byte_round_trip():
    p, _ = make_kbd()
    assert command(p, 0x20) == [0x45]             # XLATE | SYS | KBDINT, as a BIOS leaves it
    for ctr in (0x00, 0x47, 0x65, 0xFF):
        assert command(p, 0x60, ctr) == []
        assert command(p, 0x20) == [ctr]
        assert bool(p.inp(CMD) & 0x04) == bool(ctr & 0x04)   # status SYS follows CTR bit 2
    command(p, 0x60, 0x45)
    command(p, 0xA7)
    assert command(p, 0x20) == [0x65]             # AUX disabled (bit 5)
    command(p, 0xA8)
    command(p, 0xAD)
    assert command(p, 0x20) == [0x55]             # keyboard disabled (bit 4)
    command(p, 0xAE)
    assert command(p, 0x20) == [0x45]
    command(p, 0x7F, 0x99)                        # controller RAM byte 31
    assert command(p, 0x3F) == [0x99]


def test_i8042_status_cmd_bit():
    p, _ = make_kbd()
    p.out(CMD, 0xFF)                              # no-op command
    assert p.inp(CMD) & 0x08
    p.out(DATA, 0xF4)
    assert not p.inp(CMD) & 0x08


def test_i8042_keyboard_commands():
    p, kbd = make_kbd()
    assert keyboard(p, 0xFF) == [0xFA, 0xAA]      # reset: ACK, BAT passed
    assert keyboard(p, 0xF2) == [0xFA, 0xAB, 0x41]   # MF2 ID, 0x83 translated by the 8042
    command(p, 0x60, 0x05)                        # translation off
    assert keyboard(p, 0xF2) == [0xFA, 0xAB, 0x83]
    assert keyboard(p, 0xF0, 0x00) == [0xFA, 0xFA, 0x02]   # current scancode set
    assert keyboard(p, 0xF0, 0x01) == [0xFA, 0xFA]
    assert keyboard(p, 0xF0, 0x00) == [0xFA, 0xFA, 0x01]
    assert keyboard(p, 0xED, 0x07) == [0xFA, 0xFA]
    assert kbd.leds == 0x07
    assert keyboard(p, 0xF3, 0x20) == [0xFA, 0xFA]
    assert keyboard(p, 0xF5) == [0xFA]
    assert keyboard(p, 0xF4) == [0xFA]
    assert keyboard(p, 0xEE) == [0xEE]
    assert keyboard(p, 0xFE) == [0xEE]            # resend the last byte
    assert keyboard(p, 0x12) == [0xFE]            # not a command


def test_i8042_aux_port_without_a_mouse():
    p, _ = make_kbd()
    p.out(CMD, 0xD3)
    p.out(DATA, 0x5A)
    assert p.inp(CMD) & 0x21 == 0x21              # OBF | AUXDATA
    assert p.inp(DATA) == 0x5A
    p.out(CMD, 0xD2)
    p.out(DATA, 0x33)
    assert p.inp(CMD) & 0x21 == 0x01              # keyboard data
    assert p.inp(DATA) == 0x33
    p.out(CMD, 0xD4)
    p.out(DATA, 0xFF)                             # reset the (absent) mouse
    assert p.inp(CMD) & 0x61 == 0x61              # OBF | AUXDATA | TIMEOUT
    assert p.inp(DATA) == 0xFE
    assert p.inp(CMD) & 0x61 == 0


def test_i8042_empty_reads_and_unassigned_offsets():
    p, kbd = make_kbd()
    assert p.inp(CMD) & 0x01 == 0
    for _ in range(100):
        p.inp(DATA)                               # harmless
    command(p, 0xAA)
    assert p.inp(DATA) == 0x55                    # the last byte stays on the bus
    status = p.inp(CMD)
    for port in (0x61, 0x62, 0x63):
        for size in SIZES:
            assert p.inp(port, size) == (1 << (8 * size)) - 1
            p.out(port, 0xFE, size)               # not the command port: no reset
    assert p.inp(CMD) == status
    assert kbd.register_name(0, False) == "DATA"
    assert kbd.register_name(4, False) == "STATUS"
    assert kbd.register_name(4, True) == "COMMAND"
    assert kbd.register_name(2, True) is None


def test_i8042_reset_only_through_fe():
    p, _ = make_kbd()
    with pytest.raises(VmStop) as stop:
        p.out(CMD, 0xFE)
    assert stop.value.outcome.reason is StopReason.RESET
    assert stop.value.outcome.status == ExitStatus.OK
    p, _ = make_kbd()
    for cmd in list(range(0xF0, 0xFE)) + [0xFF]:
        p.out(CMD, cmd)                           # pulse commands: recorded, not acted on
    p.out(CMD, 0xD1)
    p.out(DATA, 0x00)                             # output port with the reset bit low
    p.out(DATA, 0xFE)                             # 0xFE as data goes to the keyboard ...
    assert keyboard(p) == [0xFA]                  # ... as "resend": it repeats its last ACK


def test_i8042_irq1():
    irq = IrqRecorder()
    p, _ = make_kbd(irq_kbd=irq)
    p.out(DATA, 0xFF)
    assert irq.calls == [1]
    assert p.inp(DATA) == 0xFA
    assert irq.calls == [1, 0, 1]                 # a new edge for the second byte
    assert p.inp(DATA) == 0xAA
    assert irq.calls == [1, 0, 1, 0]
    command(p, 0x60, 0x44)                        # KBDINT off
    irq.calls.clear()
    p.out(DATA, 0xFF)
    assert irq.calls == []
    p.out(CMD, 0x60)                              # on again with bytes waiting
    p.out(DATA, 0x45)
    assert irq.calls == [1]


def test_i8042_irq12_for_aux_bytes():
    kirq, airq = IrqRecorder(), IrqRecorder()
    p, _ = make_kbd(kirq, airq)
    command(p, 0x60, 0x47)
    p.out(CMD, 0xD3)
    p.out(DATA, 0xA5)
    assert (kirq.calls, airq.calls) == ([], [1])
    assert p.inp(DATA) == 0xA5
    assert (kirq.calls, airq.calls) == ([], [1, 0])


def test_i8042_scancode_feed_is_bounded():
    irq = IrqRecorder()
    p, kbd = make_kbd(irq_kbd=irq)
    assert kbd.feed_scancodes(bytes([0x1E, 0x9E]) * 500) == 16
    assert kbd.dropped == 1000 - 16
    assert irq.calls == [1]
    got = keyboard(p)
    assert got == [0x1E, 0x9E] * 8
    keyboard(p, 0xF5)                             # scanning off: nothing accepted
    assert kbd.feed_scancodes(b"\x1e") == 0
    keyboard(p, 0xF4)
    command(p, 0xAD)                              # interface disabled: nothing accepted
    assert kbd.feed_scancodes(b"\x1e") == 0
    command(p, 0xAE)
    assert kbd.feed_scancodes(b"\x1e") == 1


def test_i8042_storm_never_raises_and_only_fe_resets():
    rng = random.Random(8042)
    irq = IrqRecorder()
    p, kbd = make_kbd(irq_kbd=irq, irq_aux=irq)
    resets = 0
    for _ in range(20_000):
        r = rng.random()
        port = I8042_BASE + rng.randrange(5)
        size = rng.choice(SIZES)
        if r < 0.05:
            kbd.feed_scancodes(bytes(rng.randrange(256) for _ in range(rng.randrange(20))))
        elif r < 0.5:
            v = p.inp(port, size)
            assert 0 <= v < 1 << (8 * size)
        else:
            value = rng.randrange(1 << (8 * size))
            try:
                p.out(port, value, size)
            except VmStop as stop:
                assert port == CMD and value & 0xFF == 0xFE
                assert stop.outcome.reason is StopReason.RESET
                resets += 1
            else:
                assert not (port == CMD and value & 0xFF == 0xFE)
        assert len(kbd._out) <= 32
    assert resets > 0


# ---------------------------------------------------------------------------------------------
# CMOS RTC

INDEX, CDATA = CMOS_BASE, CMOS_BASE + 1
# Thursday 29 February 2024, 13:45:30 UTC.
T0 = calendar.timegm((2024, 2, 29, 13, 45, 30, 0, 0, 0))


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_cmos(t=T0, **kw):
    p = Ports()
    clock = FakeClock(t)
    rtc = p.add(CmosRtc(clock=clock, **kw), CMOS_BASE)
    return p, rtc, clock


def cmos_read(p: Ports, index: int) -> int:
    p.out(INDEX, index)
    return p.inp(CDATA)


def cmos_write(p: Ports, index: int, value: int) -> None:
    p.out(INDEX, index)
    p.out(CDATA, value)


TIME_REGS = (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)


def test_cmos_status_registers():
    p, _, _ = make_cmos()
    assert cmos_read(p, 0x0A) == 0x26
    assert cmos_read(p, 0x0B) == 0x02
    assert cmos_read(p, 0x0C) == 0x00
    assert cmos_read(p, 0x0D) == 0x80
    cmos_write(p, 0x0A, 0xA6)                     # UIP is read-only
    assert cmos_read(p, 0x0A) == 0x26
    cmos_write(p, 0x0D, 0x00)                     # D is read-only
    assert cmos_read(p, 0x0D) == 0x80


def test_cmos_time_bcd_24h():
    p, _, _ = make_cmos()
    # sec, min, hour, weekday (Sunday = 1, so Thursday = 5), day, month, year, century
    assert [cmos_read(p, r) for r in TIME_REGS] == [0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_cmos_time_binary_24h():
    p, _, _ = make_cmos()
    cmos_write(p, 0x0B, 0x06)
    assert [cmos_read(p, r) for r in TIME_REGS] == [30, 45, 13, 5, 29, 2, 24, 20]


@pytest.mark.parametrize("hour, bcd, binary", [
    (0, 0x12, 12),             # midnight is 12 AM
    (1, 0x01, 1),
    (11, 0x11, 11),
    (12, 0x92, 0x80 | 12),     # noon is 12 PM
    (13, 0x81, 0x81),
    (23, 0x91, 0x80 | 11),
])
def test_cmos_time_12h(hour, bcd, binary):
    t = calendar.timegm((2024, 2, 29, hour, 0, 0, 0, 0, 0))
    p, _, _ = make_cmos(t)
    cmos_write(p, 0x0B, 0x00)                     # BCD, 12-hour
    assert cmos_read(p, 0x04) == bcd
    cmos_write(p, 0x0B, 0x04)                     # binary, 12-hour
    assert cmos_read(p, 0x04) == binary


def test_cmos_follows_the_clock():
    p, _, clock = make_cmos()
    clock.t += 3600 * 24 + 61                     # 1 March 2024, 13:46:31, a Friday
    assert [cmos_read(p, r) for r in TIME_REGS] == [0x31, 0x46, 0x13, 0x06, 0x01, 0x03, 0x24, 0x20]


def test_cmos_index_masking_and_all_256_indices():
    p, rtc, _ = make_cmos()
    for i in range(0x0E, 0x80):
        if i != 0x32:
            cmos_write(p, i, (i * 7) & 0xFF)
    for i in range(256):
        p.out(INDEX, i)
        assert rtc.nmi_disabled == (i >= 0x80)
        v = p.inp(CDATA)
        j = i & 0x7F
        assert v == cmos_read(p, j)
        if 0x0E <= j < 0x80 and j != 0x32:
            assert v == (j * 7) & 0xFF
    assert p.inp(INDEX) == 0xFF                   # the index register is write-only
    p.out(INDEX, 0x8E)
    p.out(CDATA, 0x77)
    assert cmos_read(p, 0x0E) == 0x77
    assert p.inp(CDATA, 2) == 0xFF77


def test_cmos_guest_sets_time():
    p, _, clock = make_cmos()
    cmos_write(p, 0x0B, 0x82)                     # SET, 24 h, BCD
    for reg, value in ((0x32, 0x20), (0x09, 0x30), (0x08, 0x01), (0x07, 0x15),
                       (0x04, 0x08), (0x02, 0x00), (0x00, 0x00)):
        cmos_write(p, reg, value)
    clock.t += 100                                # frozen while SET
    assert cmos_read(p, 0x00) == 0x00
    cmos_write(p, 0x0B, 0x02)                     # run again from 2030-01-15 08:00:00
    clock.t += 5
    assert [cmos_read(p, r) for r in TIME_REGS] == [0x05, 0x00, 0x08, 0x03, 0x15, 0x01, 0x30, 0x20]
    # 2030-01-15 is a Tuesday: weekday 3 with Sunday = 1.
    cmos_write(p, 0x02, 0x59)                     # a write while running moves one field
    assert [cmos_read(p, r) for r in (0x00, 0x02, 0x04)] == [0x05, 0x59, 0x08]


def test_cmos_set_clears_uie():
    p, _, _ = make_cmos()
    cmos_write(p, 0x0B, 0x92)                     # SET | UIE | 24 h
    assert cmos_read(p, 0x0B) == 0x82


def test_cmos_alarm_registers_store():
    p, _, _ = make_cmos()
    for reg, v in ((0x01, 0x11), (0x03, 0x22), (0x05, 0x33)):
        cmos_write(p, reg, v)
        assert cmos_read(p, reg) == v


def test_cmos_hostile_time_writes():
    p, _, _ = make_cmos()
    for b in (0x02, 0x06, 0x00, 0x04):
        cmos_write(p, 0x0B, 0x80 | b)
        for reg in TIME_REGS:
            cmos_write(p, reg, 0xFF)
        cmos_write(p, 0x0B, b)
        cmos_write(p, 0x0B, 0x80 | b)
        for reg in TIME_REGS:
            cmos_write(p, reg, 0x00)
        cmos_write(p, 0x0B, b)
        for reg in TIME_REGS:
            assert 0 <= cmos_read(p, reg) <= 0xFF


def test_cmos_memory_sizes():
    p, _, _ = make_cmos(mem_size=512 << 20)
    regs = (0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5B, 0x5C, 0x5D)
    mem = {i: cmos_read(p, i) for i in regs}
    assert mem == {0x15: 0x80, 0x16: 0x02,                    # 640 KiB base memory
                   0x17: 0xFF, 0x18: 0xFF, 0x30: 0xFF, 0x31: 0xFF,   # 511 MiB, capped at 65535 KiB
                   0x34: 0x00, 0x35: 0x1F,                    # (512-16) MiB / 64 KiB = 7936
                   0x5B: 0, 0x5C: 0, 0x5D: 0}
    p, _, _ = make_cmos(mem_size=6 << 30, lowmem_end=3 << 30)
    assert (cmos_read(p, 0x34), cmos_read(p, 0x35)) == (0x00, 0xBF)   # (3072-16) MiB / 64 KiB
    assert [cmos_read(p, i) for i in (0x5B, 0x5C, 0x5D)] == [0x00, 0xC0, 0x00]   # 3 GiB / 64 KiB
    p, _, _ = make_cmos(mem_size=16 << 20)
    assert [cmos_read(p, i) for i in (0x17, 0x18, 0x34, 0x35)] == [0x00, 0x3C, 0, 0]   # 15360 KiB


def test_cmos_fuzz_never_raises():
    rng = random.Random(146818)
    p, _, clock = make_cmos()
    for _ in range(20_000):
        port, size = CMOS_BASE + rng.randrange(2), rng.choice(SIZES)
        if rng.random() < 0.5:
            assert 0 <= p.inp(port, size) < 1 << (8 * size)
        else:
            p.out(port, rng.randrange(1 << (8 * size)), size)
        clock.t += rng.random()


# ---------------------------------------------------------------------------------------------
# POST port

def test_post_port():
    p = Ports()
    post = p.add(PostPort(), POST_PORT)
    assert post.last is None
    p.out(POST_PORT, 0x42)
    p.out(POST_PORT, 0x1234, size=2)
    assert post.last == 0x34
    assert post.writes == 2
    assert p.inp(POST_PORT) == 0xFF               # as QEMU's ioport80_read
    assert p.inp(POST_PORT, 4) == 0xFFFFFFFF
    assert post.register_name(0, True) == "POST"


# ---------------------------------------------------------------------------------------------
# Every device, every port of its window, every size

def test_every_port_every_size():
    p = Ports()
    p.add(I8042(), I8042_BASE)
    p.add(CmosRtc(clock=FakeClock(T0)), CMOS_BASE)
    p.add(PostPort(), POST_PORT)
    p.add(DebugExit(), DEBUG_EXIT)
    p.add(Uart16550(), COM1)
    rng = random.Random(25)
    for m in p.bus.mappings:
        for port in range(m.base, m.end):
            for size in SIZES:
                assert 0 <= p.inp(port, size) < 1 << (8 * size)
                value = rng.randrange(1 << (8 * size))
                try:
                    p.out(port, value, size)
                except VmStop:
                    assert m.name == "debug-exit" or (port == CMD and value & 0xFF == 0xFE)
