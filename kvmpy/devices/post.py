"""The POST diagnostic port (0x80).

Firmware writes power-on self-test progress codes here, and Linux writes to it as an I/O delay
(``outb(0, 0x80)`` in ``native_io_delay``; on 32-bit x86 the 8250 probe also writes it, as a port
"which should be safe" to poke). On a PC board only a POST card decodes it.

Like QEMU (hw/i386/pc.c, ``ioport80_read``/``ioport80_write``) writes have no effect on the guest
and reads return all-ones. Unlike QEMU we keep the last value written (``last``) and a count, for
traces and for tests that report progress through this port; the guest cannot see either.
"""
from __future__ import annotations

from kvmpy.vmexit.bus import BusDevice


class PostPort(BusDevice):
    name = "post"
    window = 1

    def __init__(self) -> None:
        self.last: int | None = None    # last byte written, None before the first write
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * max(size, 1))) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        # A single int assignment: safe to read from another thread without a lock.
        self.last = value & 0xFF
        self.writes += 1

    def register_name(self, offset: int, is_write: bool) -> str | None:
        return "POST"
