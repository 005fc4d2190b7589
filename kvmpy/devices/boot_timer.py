"""Firecracker-compatible boot timer: the guest writes 123 when it has booted (e.g. from its init)
and kvmpy logs the time since the kvmpy process started.

Firecracker's devices/src/pseudo/boot_timer.rs: MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE = 123,
written to its boot-timer MMIO page. kvmpy offers the same device both at MMIO 0xC0000000 and at
port 0x3F0 (for guests that can only do port I/O). Reads return all-ones, like the unassigned
floppy port it shares.
"""
from __future__ import annotations

import os
import sys
import time

from kvmpy.vmexit.bus import BusDevice

MAGIC_BOOT_COMPLETE = 123


def process_age() -> float:
    """Seconds since this process started (from /proc: starttime in clock ticks since boot)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.process_time()


class BootTimer(BusDevice):
    name = "boot-timer"

    def __init__(self, window: int = 1, log=None):
        self.window = window
        self.boot_time: float | None = None
        self._t0 = time.monotonic() - process_age()
        self._log = log if log is not None else (
            lambda msg: print(msg, file=sys.stderr, flush=True))

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == MAGIC_BOOT_COMPLETE and self.boot_time is None:
            self.boot_time = time.monotonic() - self._t0
            self._log(f"kvmpy: guest boot time {self.boot_time * 1000:.1f} ms since kvmpy "
                      "started")

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1
