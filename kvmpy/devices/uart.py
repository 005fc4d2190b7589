"""16550A UART (a PC COM port), as the National/TI PC16550D datasheet (TI SNLS378C) describes it.

What it models: the whole register set (RBR/THR, IER, IIR/FCR, LCR with DLAB, MCR with loopback,
LSR, MSR, SCR, DLL/DLM), the 16-byte receive FIFO with its four trigger levels, interrupt
identification with the datasheet's priorities, and the interrupt line as a PC wires it.

What it deliberately does not model: time. There is no baud clock, so
- each byte written to THR goes to ``sink`` at once, and THRE/TEMT are set again before the guest
  can look (the TX FIFO exists only as FCR bits); the divisor latch is stored but changes nothing;
- the character-timeout interrupt, which hardware raises after four character times with data
  below the trigger level, is raised at once;
- no parity, framing or break errors are ever received (the host link is byte-exact); the only
  receive error is overrun (LSR.OE), when ``feed`` or a loopback THR write finds the FIFO full.
The modem inputs are a null modem that is always ready: DCD, DSR and CTS asserted, RI not.

Interrupt line: ``irq(level)`` is called with 1 or 0 only when the level changes, so the line is
a level that a PIC/IOAPIC edge input sees as one rising edge per new interrupt condition. The
level is "an interrupt is pending (IIR bit 0 = 0) AND MCR.OUT2 AND NOT loopback": on the PC the
UART's OUT2 pin gates the IRQ driver (Linux sets OUT2 for every ISA port with an IRQ), and in
loopback the datasheet forces the modem-control output pins, OUT2 included, inactive.

Accesses wider than one byte: a read returns the addressed register in the low byte and 0xff in
the others, and a write uses only the low byte. (An ISA bus would split the cycle into one byte
access per port; no guest relies on that for a UART, and one register per access keeps side
effects such as popping the FIFO to the register the guest named.)

Threads: ``feed`` and ``rx_free`` run on a host thread, ``read``/``write`` on vCPU threads; one
lock covers all state. ``irq`` is called with that lock held, so line changes keep their order.
``sink`` is called after it is released, from the vCPU thread whose THR write it carries: a
sink that waits for a slow reader then holds up only that vCPU (as a real UART's full
transmitter would), not host input, which is how Ctrl-A x reaches kvmpy while the console's
reader is stalled. So the sink must be thread-safe (two vCPUs may write THR at once; their
OUTs are both still in progress then, so either order is one the guest allows). Neither may
call back into this device.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from kvmpy.vmexit.bus import BusDevice

# Register offsets (PC16550D, "Register Summary" table). DLAB is LCR bit 7.
RBR = THR = DLL = 0     # receiver buffer (read) / transmitter holding (write); DLL if DLAB
IER = DLM = 1           # interrupt enable; divisor latch MSB if DLAB
IIR = FCR = 2           # interrupt identification (read) / FIFO control (write)
LCR = 3                 # line control
MCR = 4                 # modem control
LSR = 5                 # line status
MSR = 6                 # modem status
SCR = 7                 # scratch

# IER, "Interrupt Enable Register": bits 4-7 are always 0 on the 16550.
IER_ERBFI = 0x01        # received data available (and, in FIFO mode, character timeout)
IER_ETBEI = 0x02        # transmitter holding register empty
IER_ELSI = 0x04         # receiver line status
IER_EDSSI = 0x08        # modem status
IER_MASK = 0x0F

# IIR, "Interrupt Identification Register" and the "Interrupt Control Functions" table.
# Listed by priority, highest first. Bit 0 = 0 means an interrupt is pending.
IIR_RLSI = 0x06         # 1st: receiver line status (OE/PE/FE/BI); cleared by reading LSR
IIR_RDI = 0x04          # 2nd: received data available / trigger level reached; read RBR
IIR_CTI = 0x0C          # 2nd: character timeout (FIFO mode only); read RBR
IIR_THRI = 0x02         # 3rd: THR empty; cleared by reading IIR (if the source) or writing THR
IIR_MSI = 0x00          # 4th: modem status; cleared by reading MSR
IIR_NO_INT = 0x01
IIR_FIFO = 0xC0         # bits 6-7 are set when FCR bit 0 is set; bits 4-5 are always 0

# FCR, "FIFO Control Register". Bits 1-7 are programmed only when bit 0 is 1 in the same write.
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA = 0x08          # RXRDY/TXRDY mode select: no pins here, so no effect
RX_TRIGGER = (1, 4, 8, 14)  # FCR bits 7-6 -> receiver FIFO trigger level in bytes

LCR_DLAB = 0x80         # divisor latch access bit

# MCR, "MODEM Control Register": bits 5-7 are permanently 0.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR, "Line Status Register".
LSR_DR = 0x01           # data ready
LSR_OE = 0x02           # overrun error
LSR_PE = 0x04           # parity error
LSR_FE = 0x08           # framing error
LSR_BI = 0x10           # break interrupt
LSR_THRE = 0x20         # THR (TX FIFO) empty
LSR_TEMT = 0x40         # THR and transmitter shift register both empty
LSR_FIFOERR = 0x80      # FIFO mode: a PE/FE/BI character is in the RX FIFO (never, here)
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR, "MODEM Status Register": deltas in bits 0-3 (cleared by reading MSR), inputs in 4-7.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04         # trailing edge of RI: the RI bit went from 1 to 0
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FIFO_SIZE = 16          # "16 bytes (plus 3 bits of error data per byte in the RCVR FIFO)"

# The modem inputs when not in loopback: a null modem that is always ready.
_NULL_MODEM = MSR_DCD | MSR_DSR | MSR_CTS


_BYTE = tuple(bytes((i,)) for i in range(256))   # THR bytes for the sink, made once


def _widen(byte: int, size: int) -> int:
    """An 8-bit register read with a ``size``-byte access: the byte, then 0xff in the others."""
    return byte | (((1 << (8 * max(size, 1))) - 1) & ~0xFF)


class Uart16550(BusDevice):
    """One 16550A at an I/O base chosen by the builder (COM1 is 0x3f8, IRQ 4)."""

    window = 8

    def __init__(self, name: str = "COM1", sink: Callable[[bytes], object] | None = None,
                 irq: Callable[[int], None] | None = None):
        self.name = name
        self._sink = sink
        self._irq = irq
        self._lock = threading.Lock()
        self._tx: int | None = None    # the byte this THR write sends (under _lock)
        self.rx_dropped = 0     # bytes lost to a full RX FIFO (feed, loopback) or fed in loopback
        self.tx_errors = 0      # THR bytes the sink failed to take (it raised OSError)
        # Reset values: PC16550D "UART Reset Configuration" table.
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0           # not affected by reset on hardware; we start at 0
        # The divisor latch is undefined after reset. It starts at 1 (115200 baud from the PC's
        # 1.8432 MHz clock) because Linux's probe_baud() divides by it when the console is
        # handed over from earlycon without options.
        self._dll = 1
        self._dlm = 0
        self._fifo_enabled = False
        self._trigger = 1
        self._rx: deque[int] = deque()
        self._rbr = 0           # last byte read from the receiver (what an empty RBR returns)
        self._lsr_errors = 0    # sticky LSR error bits, cleared by reading LSR
        self._thr_ipending = False
        self._msr_inputs = _NULL_MODEM
        self._msr_deltas = 0
        self._line = 0

    # -- host side -------------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Receive ``data`` from the host; return how many bytes fit in the RX FIFO.

        Bytes that do not fit are dropped, counted in ``rx_dropped``, and reported to the guest
        as an overrun (LSR.OE). In loopback the receiver input is disconnected (datasheet,
        "MCR bit 4"), so everything is dropped. A caller that must not lose input offers at most
        ``rx_free()`` bytes and keeps the rest.
        """
        with self._lock:
            if self._mcr & MCR_LOOP:
                self.rx_dropped += len(data)
                return 0
            accepted = self._receive(data)
            self._update_irq()
            return accepted

    def rx_free(self) -> int:
        """How many bytes ``feed`` would accept now."""
        with self._lock:
            if self._mcr & MCR_LOOP:
                return 0
            return max(0, self._rx_capacity() - len(self._rx))

    # -- guest side ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if not 0 <= offset < self.window:
                return (1 << (8 * max(size, 1))) - 1
            value = self._read_register(offset)
            self._update_irq()
        return _widen(value, size)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if not 0 <= offset < self.window:
                return
            self._write_register(offset, value & 0xFF)
            self._update_irq()
            byte = self._tx
            if byte is None:
                return
            self._tx = None
        try:                          # outside the state lock (module docstring)
            self._sink(_BYTE[byte])
        except OSError:
            self.tx_errors += 1

    def register_name(self, offset: int, is_write: bool) -> str | None:
        dlab = bool(self._lcr & LCR_DLAB)
        if offset == 0:
            return "DLL" if dlab else ("THR" if is_write else "RBR")
        if offset == 1:
            return "DLM" if dlab else "IER"
        if offset == 2:
            return "FCR" if is_write else "IIR"
        return {3: "LCR", 4: "MCR", 5: "LSR", 6: "MSR", 7: "SCR"}.get(offset)

    # -- registers (lock held) -------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self._dll
            if self._rx:
                self._rbr = self._rx.popleft()
            return self._rbr
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            # IIR is readable whatever DLAB says (Linux's 16650/16750 probes rely on that).
            ident = self._interrupt_id()
            if ident == IIR_THRI:
                self._thr_ipending = False
            return ident | (IIR_FIFO if self._fifo_enabled else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            lsr = self._lsr()
            self._lsr_errors = 0
            return lsr
        if offset == MSR:
            msr = self._msr_inputs | self._msr_deltas
            self._msr_deltas = 0
            return msr
        return self._scr

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value & IER_MASK)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & MCR_MASK
            self._set_modem_inputs()
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes are ignored: the datasheet reserves LSR writes for factory test,
        # and MSR's bits are inputs and their deltas.

    def _transmit(self, byte: int) -> None:
        # Writing THR clears the THRE interrupt; the byte then leaves at once, so THR is empty
        # again and the THRE interrupt is pending again.
        self._thr_ipending = False
        if self._mcr & MCR_LOOP:
            # Loopback: the transmitter output is looped to the receiver input and the serial
            # output is held marking, so nothing reaches the sink.
            self._receive(bytes((byte,)))
        elif self._sink is not None:
            self._tx = byte           # sent by write() once the state lock is released
        self._thr_ipending = True

    def _write_ier(self, ier: int) -> None:
        # Enabling ETBEI while THR is empty raises a THRE interrupt at once; disabling it drops a
        # pending one. Not in the datasheet, but what 16550s do and what QEMU's serial.c models
        # (Windows and Linux's THRE re-assertion test in serial8250_do_startup rely on it).
        if (self._ier ^ ier) & IER_ETBEI:
            self._thr_ipending = bool(ier & IER_ETBEI)   # THRE is always 1 here
        self._ier = ier

    def _write_fcr(self, fcr: int) -> None:
        enable = bool(fcr & FCR_ENABLE)
        if enable != self._fifo_enabled:
            # Changing FCR bit 0 clears both FIFOs.
            self._rx.clear()
        self._fifo_enabled = enable
        if not enable:
            return
        if fcr & FCR_CLEAR_RX:
            self._rx.clear()
        # FCR_CLEAR_TX: the TX FIFO is always empty. FCR_DMA: no RXRDY/TXRDY pins.
        self._trigger = RX_TRIGGER[fcr >> 6]

    def _set_modem_inputs(self) -> None:
        if self._mcr & MCR_LOOP:
            # Loopback wiring, datasheet "MCR bit 4": DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
            mcr = self._mcr
            new = ((MSR_DSR if mcr & MCR_DTR else 0) | (MSR_CTS if mcr & MCR_RTS else 0)
                   | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))
        else:
            new = _NULL_MODEM
        changed = self._msr_inputs ^ new
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if changed & MSR_RI and not new & MSR_RI:
            self._msr_deltas |= MSR_TERI
        self._msr_inputs = new

    # -- state (lock held) -----------------------------------------------------------------

    def _rx_capacity(self) -> int:
        # 16450 (character) mode has a one-byte receiver buffer; FIFO mode has 16 bytes.
        return FIFO_SIZE if self._fifo_enabled else 1

    def _receive(self, data: bytes) -> int:
        room = max(0, self._rx_capacity() - len(self._rx))
        taken = data[:room]
        self._rx.extend(taken)
        lost = len(data) - len(taken)
        if lost:
            # Datasheet "LSR bit 1": in FIFO mode an overrun happens when the FIFO is full and
            # another character arrives; that character is lost, the FIFO is kept.
            self.rx_dropped += lost
            self._lsr_errors |= LSR_OE
        return len(taken)

    def _lsr(self) -> int:
        return (LSR_DR if self._rx else 0) | self._lsr_errors | LSR_THRE | LSR_TEMT

    def _interrupt_id(self) -> int:
        """The highest-priority enabled interrupt, as IIR bits 0-3."""
        ier = self._ier
        if ier & IER_ELSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_ERBFI and self._rx:
            if not self._fifo_enabled or len(self._rx) >= self._trigger:
                return IIR_RDI
            return IIR_CTI      # below the trigger level: the timeout has "already" elapsed
        if ier & IER_ETBEI and self._thr_ipending:
            return IIR_THRI
        if ier & IER_EDSSI and self._msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        pending = self._interrupt_id() != IIR_NO_INT
        gate = self._mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
        level = 1 if pending and gate else 0
        if level != self._line:
            self._line = level
            if self._irq is not None:
                self._irq(level)
