"""kvmpy/virtio/setup.py: devices as the command line asks for them, each served by its own
I/O thread."""
from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from kvmpy.virtio import blk as blk_mod
from kvmpy.virtio.mmio import placement
from kvmpy.virtio.setup import add_virtio_devices
from virtio_driver import F_VERSION_1, MmioDriver, Regs

kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")
HDR = struct.Struct("<IIQ")
T_FLUSH = 4


def _wait_used(vq, n, timeout):
    deadline = time.monotonic() + timeout
    while vq.used_idx() < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@kvm
def test_a_disk_stuck_in_fdatasync_does_not_hold_up_another_device(tmp_path, monkeypatch):
    from kvmpy.builder import Machine

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    gate = threading.Event()
    monkeypatch.setattr(blk_mod.os, "fdatasync", lambda fd: gate.wait(20))   # a slow disk
    monkeypatch.setenv("KVMPY_BLK_ENGINE", "python")    # whose fdatasync is the patched one
    with Machine(16 << 20) as m:
        add_virtio_devices(m, [("disk", str(image)), ("rng", None)], "mmio")
        names = {t.name for t in threading.enumerate()}
        assert {"kvmpy-io-virtio0", "kvmpy-io-virtio1"} <= names
        disk = MmioDriver(m.memory, Regs(m.mmio, placement(0)[0]), area=(0x10000, 0x80000))
        rng = MmioDriver(m.memory, Regs(m.mmio, placement(1)[0]), area=(0x80000, 0x100000))
        disk.init(want=F_VERSION_1)
        rng.init(want=F_VERSION_1)
        try:
            flush = disk.queues[0].submit(out=[HDR.pack(T_FLUSH, 0, 0)], in_=[1])
            disk.notify(0)                      # its I/O thread now waits in fdatasync
            time.sleep(0.1)
            rng.queues[0].submit(in_=[16])
            rng.notify(0)
            assert _wait_used(rng.queues[0], 1, 10)      # served while the disk is stuck
            assert disk.queues[0].used_idx() == 0
        finally:
            gate.set()
        assert _wait_used(disk.queues[0], 1, 10)
        assert flush.written() == b"\0"                  # the FLUSH then completed, OK
