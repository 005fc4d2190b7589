"""QEMU's isa-debug-exit (hw/misc/debugexit.c): a port that ends the VM with a chosen status.

A guest write of value ``v`` ends the VM; ``kvmpy run`` then exits with ``(v << 1) | 1``
(masked to 8 bits by the process status), exactly as QEMU does, so test guests written for
``qemu -device isa-debug-exit,iobase=0xf4,iosize=0x04`` work unchanged. The status is always odd,
so it never collides with kvmpy's own even statuses (see :mod:`kvmpy.outcome`).

Reads return 0, as QEMU's ``debug_exit_read`` does: a guest can probe for the device by reading
it (QEMU's maintainers point at this as the only way to detect it), so all-ones would make the
port look absent.

The value is the whole access (1, 2, 4 or 8 bytes, little-endian), as QEMU passes it; only its low
byte can survive into the exit status. The device does not know its port: the builder places it.
"""
from __future__ import annotations

from kvmpy.outcome import Outcome, VmStop
from kvmpy.vmexit.bus import BusDevice


class DebugExit(BusDevice):
    name = "debug-exit"

    #: What a guest read returns (QEMU hw/misc/debugexit.c, debug_exit_read).
    READ_VALUE = 0

    def __init__(self, window: int = 4):
        # QEMU's default iosize is 2 (at 0x501); kvmpy follows the common iobase=0xf4,iosize=4.
        if window <= 0:
            raise ValueError(f"debug-exit window must be positive, not {window}")
        self.window = window

    def read(self, offset: int, size: int) -> int:
        return self.READ_VALUE

    def write(self, offset: int, size: int, value: int) -> None:
        raise VmStop(Outcome.debug_exit(value & ((1 << (8 * max(size, 1))) - 1)))

    def register_name(self, offset: int, is_write: bool) -> str | None:
        return "EXIT"
