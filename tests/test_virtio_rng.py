"""virtio-rng through the virtio-mmio transport, driven by tests/virtio_driver.py. No /dev/kvm."""
from __future__ import annotations

import pytest

from kvmpy.memory import GuestMemory
from kvmpy.virtio.mmio import VirtioMmio
from kvmpy.virtio.rng import VirtioRng
from kvmpy.vmexit.bus import MmioBus
from virtio_driver import DEVICE_ID, F_EVENT_IDX, F_INDIRECT_DESC, IrqRecorder, MmioDriver, Regs

BASE = 0xD0000000


def make(mem, **kw):
    irq = IrqRecorder()
    rng = VirtioRng(mem, **kw)
    transport = VirtioMmio(rng, irq=irq)
    bus = MmioBus()
    bus.insert(transport, BASE)
    return MmioDriver(mem, Regs(bus, BASE)), rng, irq


@pytest.fixture
def mem():
    with GuestMemory([(0, 1 << 20)]) as m:
        yield m


@pytest.mark.parametrize("want", [None, 0, F_INDIRECT_DESC, F_EVENT_IDX])
@pytest.mark.parametrize("indirect", [False, True])
def test_random_bytes(mem, want, indirect):
    drv, rng, irq = make(mem)
    assert drv.read(DEVICE_ID) == 4                     # 5.4.1: entropy device
    drv.init(want=None if want is None else want | (1 << 32))
    vq = drv.queues[0]
    indirect = indirect and bool(drv.features & F_INDIRECT_DESC)
    a = vq.submit(in_=[64], indirect=indirect)
    b = vq.submit(in_=[16, 16], indirect=indirect)
    drv.notify()
    got = dict((r.head, (r, n)) for r, n in vq.get_used())
    assert got[a.head][1] == 64 and got[b.head][1] == 32
    assert a.written() != b"\xaa" * 64                  # overwritten (not the poison)
    assert len(set(a.written())) > 8                    # and not a constant
    assert irq.raised >= 1 and drv.ack_interrupt() == 1  # used-buffer interrupt
    assert irq.levels[-1] == 0                           # acked: line lowered
    assert rng.bytes_served == 96


def test_request_is_capped_and_never_allocated_up_front():
    # hostile-inputs 18: a 0xffffffff-byte buffer (real RAM here: 4 GiB, mapped NORESERVE)
    asked = []

    def source(n):
        asked.append(n)
        return bytes(n)

    with GuestMemory([(0, (4 << 30) + (1 << 20))]) as mem:
        drv, rng, _ = make(mem, source=source)
        drv.init()
        vq = drv.queues[0]
        vq.write_desc(0, 1 << 20, 0xFFFFFFFF, 2)         # one WRITE descriptor
        vq.publish_raw(0)
        drv.notify()
        (_, length), = vq.get_used()
    assert asked == [65536] and length == 65536


def test_cap_spans_segments(mem):
    drv, rng, _ = make(mem, max_bytes=1000)
    drv.init()
    vq = drv.queues[0]
    r = vq.submit(in_=[600, 600, 600])
    drv.notify()
    (_, n), = vq.get_used()
    assert n == 1000
    data = r.written()
    assert data[1000:] == b"\xaa" * 800                 # the rest untouched


def test_readable_buffers_are_ignored(mem):
    drv, rng, _ = make(mem)
    drv.init()
    vq = drv.queues[0]
    vq.submit(out=[b"driver-readable"])
    drv.notify()
    (_, n), = vq.get_used()
    assert n == 0 and rng.bytes_served == 0


def test_short_getrandom_reports_what_was_written(mem):
    drv, rng, _ = make(mem, source=lambda n: b"\x01\x02\x03")
    drv.init()
    vq = drv.queues[0]
    r = vq.submit(in_=[64])
    drv.notify()
    (_, n), = vq.get_used()
    assert n == 3 and r.written()[:4] == b"\x01\x02\x03\xaa"
