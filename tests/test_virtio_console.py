"""virtio-console: bytes both ways through the test driver, bounded host input."""
import threading

import pytest

from kvmpy.memory import GuestMemory
from kvmpy.vmexit.bus import MmioBus
from kvmpy.virtio.console import RX_BUFFER_MAX, VirtioConsole
from kvmpy.virtio.mmio import VirtioMmio
from virtio_driver import IrqRecorder, MmioDriver, Regs

BASE = 0xD0000000


@pytest.fixture
def setup():
    with GuestMemory([(0, 1 << 20)]) as mem:
        out = []
        irq = IrqRecorder()
        con = VirtioConsole(mem, sink=out.append)
        bus = MmioBus()
        bus.insert(VirtioMmio(con, irq=irq), BASE)
        drv = MmioDriver(mem, Regs(bus, BASE))
        assert drv.read(0x008) == 3          # 5.3.1: console
        drv.init(queues=2)
        yield drv, con, out, irq


def test_guest_to_host(setup):
    drv, con, out, _ = setup
    tx = drv.queues[1]
    tx.submit(out=[b"hello ", b"hvc0\n"])
    drv.notify(1)
    assert b"".join(out) == b"hello hvc0\n"
    assert [n for _, n in tx.get_used()] == [0]


def test_host_to_guest_waits_for_buffers(setup):
    drv, con, _, irq = setup
    rx = drv.queues[0]
    assert con.feed(b"typed early") == 11      # no buffer yet: held
    assert rx.get_used() == []
    a = rx.submit(in_=[4])
    b = rx.submit(in_=[64])
    drv.notify(0)
    got = rx.get_used()
    assert [(r.head, n) for r, n in got] == [(a.head, 4), (b.head, 7)]
    assert a.written()[:4] == b"type" and b.written()[:7] == b"d early"
    assert irq.raised >= 1
    c = rx.submit(in_=[16])
    drv.notify(0)
    con.feed(b"later")                          # a buffer is waiting: delivered at once
    (r, n), = rx.get_used()
    assert r.head == c.head and r.written()[:n] == b"later"


def test_host_flood_is_bounded(setup):
    _, con, _, _ = setup
    taken = con.feed(b"x" * (RX_BUFFER_MAX + 5000))
    assert taken == RX_BUFFER_MAX and con.rx_dropped == 5000 and con.rx_free() == 0


def test_feed_from_another_thread_while_guest_posts(setup):
    drv, con, _, _ = setup
    rx = drv.queues[0]
    t = threading.Thread(target=lambda: [con.feed(bytes([i])) for i in range(100)])
    t.start()
    t.join()
    got = b""
    for _ in range(10):
        rx.submit(in_=[32])
        drv.notify(0)
        got += b"".join(r.written()[:n] for r, n in rx.get_used())
    assert got == bytes(range(100))
