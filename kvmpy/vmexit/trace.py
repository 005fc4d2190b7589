"""Exit traces: one JSON object per line, one line per exit (``kvmpy run --trace FILE``).

Fields: ``t`` (seconds since the VM started), ``vcpu``, ``reason`` (KVM_EXIT_* name without the
prefix), ``rip``; for IO ``port``, ``size``, ``dir`` ("in"/"out"), ``count``, ``data`` (a list
when count > 1); for MMIO ``addr``, ``size``, ``dir``, ``data``; for accesses to a device
``device`` and, when the device names it, ``register``. Unclaimed accesses have
``device: "unassigned"``. Numbers are plain JSON integers.

Tracing reads the registers on every exit (KVM_GET_REGS), so it is slow by design; without
``--trace`` nothing here runs.
"""
from __future__ import annotations

import json
import threading
import time


class Tracer:
    def __init__(self, out):   # a text file
        self._out = out
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.records = 0

    def record(self, vcpu, entry: dict) -> None:
        entry["t"] = round(time.monotonic() - self._t0, 6)
        entry["vcpu"] = vcpu.id
        try:
            entry["rip"] = vcpu.get_regs().rip
        except Exception:  # the vCPU may be gone (trace of a late exit): keep the line
            entry["rip"] = None
        line = json.dumps(entry, separators=(",", ":"))
        with self._lock:
            self._out.write(line + "\n")
            self.records += 1

    def close(self) -> None:
        with self._lock:
            self._out.flush()
