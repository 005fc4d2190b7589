"""The virtio-mmio transport: register semantics (virtio 1.2 4.2.2), the device status state
machine (2.1, 3.1.1), error containment (2.1.2), the I/O thread, and, on /dev/kvm, the whole
path: a guest's QueueNotify through a KVM ioeventfd to the I/O thread, and the used-buffer
interrupt back into the guest through KVM_IRQ_LINE or an irqfd.

shared/hostile-inputs.md items 7-10, 12, 13, 25.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.errors import KvmpyError
from kvmpy.memory import GuestMemory
from kvmpy.virtio.device import DeviceType, VirtioDevice
from kvmpy.virtio.iothread import IoThread
from kvmpy.virtio.mmio import (FIRST_IRQ, MMIO_BASE, VirtioMmio, kernel_cmdline_arg,
                               placement)
from kvmpy.virtio.rng import VirtioRng
from kvmpy.vmexit.bus import MmioBus
from virtio_driver import (ACKNOWLEDGE, CONFIG_GENERATION, DEVICE_FEATURES, DEVICE_FEATURES_SEL,
                           DEVICE_ID, DRIVER, DRIVER_FEATURES, DRIVER_FEATURES_SEL, DRIVER_OK,
                           FAILED, FEATURES_OK, F_VERSION_1, INTERRUPT_ACK, INTERRUPT_STATUS,
                           MAGIC, NEEDS_RESET, QUEUE_DESC_LOW, QUEUE_DEVICE_LOW,
                           QUEUE_DRIVER_LOW, QUEUE_NOTIFY, QUEUE_NUM, QUEUE_NUM_MAX,
                           QUEUE_READY, QUEUE_SEL, STATUS, VENDOR_ID, VERSION, IrqRecorder,
                           MmioDriver, Regs)

BASE = MMIO_BASE
kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")


@pytest.fixture
def mem():
    with GuestMemory([(0, 1 << 20)]) as m:
        yield m


class Rig:
    """A device on an MmioBus at BASE with a recording interrupt line and a driver."""

    def __init__(self, mem, device=None):
        self.dev = device or VirtioRng(mem)
        self.irq = IrqRecorder()
        self.transport = VirtioMmio(self.dev, irq=self.irq)
        self.bus = MmioBus()
        self.bus.insert(self.transport, BASE)
        self.drv = MmioDriver(mem, Regs(self.bus, BASE))

    def rd(self, off, size=4):
        return self.drv.read(off, size)

    def wr(self, off, value, size=4):
        self.drv.write(off, value, size)


@pytest.fixture
def rig(mem):
    return Rig(mem)


# -- identification and access widths (item 25) -------------------------------------------------

def test_identification(rig):
    assert rig.rd(MAGIC) == 0x74726976              # "virt"
    assert rig.rd(VERSION) == 2
    assert rig.rd(DEVICE_ID) == DeviceType.ENTROPY
    assert rig.rd(VENDOR_ID) == 0x706D766B
    assert rig.rd(CONFIG_GENERATION) == 0
    assert rig.transport.window == 0x1000


@pytest.mark.parametrize("size", [1, 2, 8])
def test_registers_take_32_bit_accesses_only(rig, size):
    ones = (1 << (8 * size)) - 1
    for off in (MAGIC, VERSION, STATUS, INTERRUPT_STATUS, QUEUE_NUM_MAX):
        assert rig.rd(off, size) == ones
    rig.wr(STATUS, ACKNOWLEDGE, size)
    assert rig.rd(STATUS) == 0
    rig.wr(MAGIC + 1, 0xFFFFFFFF, 4)                  # unaligned
    assert rig.rd(MAGIC + 1, 4) == 0xFFFFFFFF
    assert rig.rd(STATUS) == 0
    assert rig.transport.ignored >= 7


def test_write_only_and_unused_registers_read_all_ones(rig):
    for off in (DEVICE_FEATURES_SEL, DRIVER_FEATURES, QUEUE_SEL, QUEUE_NUM, QUEUE_NOTIFY,
                INTERRUPT_ACK, QUEUE_DESC_LOW, 0x0B0, 0x0C0, 0x0F8):
        assert rig.rd(off) == 0xFFFFFFFF


def test_register_names(rig):
    t = rig.transport
    assert t.register_name(0x050, True) == "QUEUE_NOTIFY"
    assert t.register_name(0x104, False) == "config+0x4"
    assert t.register_name(0x0F4, False) is None


def test_placement_helpers():
    assert placement(0) == (0xD0000000, 5) and placement(2) == (0xD0002000, 7)
    assert placement(3) == (0xD0003000, 9)           # not 8: rtc-cmos claims it unshared
    assert FIRST_IRQ == 5
    with pytest.raises(KvmpyError, match="at most 6"):
        placement(6)
    assert kernel_cmdline_arg(0xD0001000, 6) == "virtio_mmio.device=4K@0xd0001000:6"


# -- features -----------------------------------------------------------------------------------

def test_device_features_words(rig):
    rig.wr(STATUS, ACKNOWLEDGE)
    rig.wr(STATUS, ACKNOWLEDGE | DRIVER)
    f = rig.drv.device_features()
    assert f & F_VERSION_1 and f & (1 << 28) and f & (1 << 29)
    rig.wr(DEVICE_FEATURES_SEL, 2)
    assert rig.rd(DEVICE_FEATURES) == 0
    rig.wr(DEVICE_FEATURES_SEL, 0xFFFFFFFF)
    assert rig.rd(DEVICE_FEATURES) == 0


def test_driver_features_only_between_driver_and_features_ok(rig):
    dev = rig.dev
    rig.wr(DRIVER_FEATURES_SEL, 1)
    rig.wr(DRIVER_FEATURES, 1)                       # before DRIVER: ignored
    assert dev.driver_features == 0
    rig.drv.negotiate()                              # accepts everything offered
    accepted = dev.driver_features
    assert accepted == dev.device_features
    rig.wr(DRIVER_FEATURES_SEL, 0)
    rig.wr(DRIVER_FEATURES, 0)                       # after FEATURES_OK: ignored
    assert dev.driver_features == accepted
    rig.wr(DRIVER_FEATURES_SEL, 7)


# -- status state machine (item 12) -------------------------------------------------------------

A, D, FO, DO = ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK


@pytest.mark.parametrize("steps, final", [
    ([A, A | D, A | D | FO, A | D | FO | DO], A | D | FO | DO),   # the 3.1.1 order
    ([A | D | FO | DO], 0),                                       # all at once from 0: no A
    ([D], 0),                                                     # DRIVER before ACKNOWLEDGE
    ([A, A | D, A | D | DO], A | D),                              # DRIVER_OK before FEATURES_OK
    ([A, A | FO], A),                                             # FEATURES_OK before DRIVER
    ([A, A | D, D], A | D),                                       # clearing ACKNOWLEDGE
    ([A, A | D, A | D | FO, A | D], A | D | FO),                  # clearing FEATURES_OK
    ([A, A | 0x10], A), ([A, A | 0x20], A),                       # undefined bits
    ([A, A | D, A | D | FAILED, A | D | FO], A | D | FAILED),     # nothing after FAILED
    ([A, FAILED], A | FAILED),                                    # FAILED alone is fine
    ([A, A | D, A | D | NEEDS_RESET], A | D),                     # not the driver's bit
])
def test_status_sequences(rig, steps, final):
    for s in steps:
        if s & FO:                                   # accept VERSION_1 first (when allowed)
            rig.wr(DRIVER_FEATURES_SEL, 1)
            rig.wr(DRIVER_FEATURES, F_VERSION_1 >> 32)
        rig.wr(STATUS, s)
    assert rig.rd(STATUS) == final


def test_features_ok_refused_for_unoffered_or_legacy_features(rig):
    for bad in (1 << 40, 0):                         # unoffered bit; VERSION_1 missing
        rig.wr(STATUS, 0)
        rig.wr(STATUS, A)
        rig.wr(STATUS, A | D)
        rig.wr(DRIVER_FEATURES_SEL, 1)
        rig.wr(DRIVER_FEATURES, (bad | (F_VERSION_1 if bad else 0)) >> 32)
        rig.wr(STATUS, A | D | FO)
        assert rig.rd(STATUS) == A | D                # 3.1.1 step 6: the driver sees it clear
        rig.wr(STATUS, A | D | FO | DO)
        assert rig.rd(STATUS) == A | D


def test_reset_clears_everything(rig):
    rig.drv.init()
    vq = rig.drv.queues[0]
    vq.submit(in_=[8])
    rig.drv.notify()
    assert rig.rd(INTERRUPT_STATUS) == 1 and rig.irq.levels[-1] == 1
    rig.wr(STATUS, 0)
    assert rig.rd(STATUS) == 0 and rig.rd(INTERRUPT_STATUS) == 0
    assert rig.irq.levels[-1] == 0
    rig.wr(QUEUE_SEL, 0)
    assert rig.rd(QUEUE_READY) == 0
    assert rig.dev.driver_features == 0
    rig.drv.init()                                   # and it works again
    vq = rig.drv.queues[0]
    vq.submit(in_=[8])
    rig.drv.notify()
    assert len(vq.get_used()) == 1


# -- queue registers (items 7, 8, 9) ------------------------------------------------------------

def setup_regs(rig, size=8, desc=0x10000, avail=0x11000, used=0x12000):
    rig.wr(QUEUE_SEL, 0)
    rig.wr(QUEUE_NUM, size)
    rig.wr(QUEUE_DESC_LOW, desc)
    rig.wr(QUEUE_DRIVER_LOW, avail)
    rig.wr(QUEUE_DEVICE_LOW, used)


def test_queue_registers_ignored_before_features_ok(rig):
    q = rig.dev.queues[0]
    rig.wr(STATUS, A)
    rig.wr(STATUS, A | D)
    setup_regs(rig, size=4, desc=0x5000)
    rig.wr(QUEUE_READY, 1)
    assert (q.size, q.desc_addr, q.ready) == (q.max_size, 0, False)
    assert rig.rd(QUEUE_READY) == 0


def test_queue_registers_ignored_after_driver_ok(rig):
    rig.drv.init(size=8)
    q = rig.dev.queues[0]
    before = (q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready)
    setup_regs(rig, size=2, desc=0x40000, avail=0x41000, used=0x42000)
    rig.wr(QUEUE_DESC_LOW + 4, 0xFFFFFFFF)
    rig.wr(QUEUE_READY, 0)
    assert (q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready) == before


def test_live_queue_cannot_be_moved_before_driver_ok(rig):
    rig.drv.negotiate()
    setup_regs(rig)
    rig.wr(QUEUE_READY, 1)
    q = rig.dev.queues[0]
    assert q.ready
    setup_regs(rig, size=2, desc=0x40000)
    assert (q.size, q.desc_addr) == (8, 0x10000)
    rig.wr(QUEUE_READY, 0)                           # allowed before DRIVER_OK
    assert rig.rd(QUEUE_READY) == 0
    setup_regs(rig, size=2, desc=0x40000)
    assert (q.size, q.desc_addr) == (2, 0x40000)


def test_addresses_take_both_halves(rig):
    rig.drv.negotiate()
    rig.wr(QUEUE_SEL, 0)
    rig.wr(QUEUE_DESC_LOW, 0x1000)
    rig.wr(QUEUE_DESC_LOW + 4, 0x1)
    assert rig.dev.queues[0].desc_addr == 0x1_0000_1000
    rig.wr(QUEUE_DESC_LOW, 0x2000)
    assert rig.dev.queues[0].desc_addr == 0x1_0000_2000


@pytest.mark.parametrize("sel", [1, 2, 0xFFFF, 0xFFFFFFFF])
def test_queue_sel_out_of_range(rig, sel):
    rig.drv.negotiate()
    rig.wr(QUEUE_SEL, sel)
    assert rig.rd(QUEUE_NUM_MAX) == 0 and rig.rd(QUEUE_READY) == 0   # "not available"
    setup_regs_before = [(q.size, q.desc_addr) for q in rig.dev.queues]
    rig.wr(QUEUE_NUM, 4)
    rig.wr(QUEUE_DESC_LOW, 0x1000)
    rig.wr(QUEUE_READY, 1)
    assert [(q.size, q.desc_addr) for q in rig.dev.queues] == setup_regs_before
    rig.wr(QUEUE_SEL, 0)
    assert rig.rd(QUEUE_NUM_MAX) == 256


@pytest.mark.parametrize("value", [1, 0xFFFF, 0xFFFFFFFF])
def test_queue_notify_out_of_range(rig, value):
    rig.drv.init()
    rig.drv.queues[0].submit(in_=[8])
    rig.wr(QUEUE_NOTIFY, value)
    assert rig.drv.queues[0].get_used() == []
    assert not rig.rd(STATUS) & NEEDS_RESET


@pytest.mark.parametrize("size, desc, avail, used", [
    (0, 0x10000, 0x11000, 0x12000),
    (3, 0x10000, 0x11000, 0x12000),
    (512, 0x10000, 0x11000, 0x12000),
    (0x10000, 0x10000, 0x11000, 0x12000),
    (8, 0x10008, 0x11000, 0x12000),
    (8, 0x10000, 0x11001, 0x12000),
    (8, 0x10000, 0x11000, 0x12002),
    (8, 0xD0000000, 0x11000, 0x12000),             # the device's own MMIO window
    (8, 0x10000, 0x11000, 0xFFFF0),                # runs off the end of RAM
])
def test_bad_queue_is_refused_with_needs_reset(rig, size, desc, avail, used):
    # item 7: refuse to activate, DEVICE_NEEDS_RESET, configuration-change interrupt
    rig.drv.negotiate()
    setup_regs(rig, size, desc, avail, used)
    rig.wr(QUEUE_READY, 1)
    assert rig.rd(QUEUE_READY) == 0
    assert rig.rd(STATUS) & NEEDS_RESET
    assert rig.rd(INTERRUPT_STATUS) & 2 and rig.irq.raised == 1
    assert rig.dev.errors["activate"] == 1
    rig.wr(INTERRUPT_ACK, 2)
    assert rig.rd(INTERRUPT_STATUS) == 0 and rig.irq.levels[-1] == 0


# -- interrupts ---------------------------------------------------------------------------------

def test_interrupt_status_and_ack(rig):
    rig.drv.init()
    vq = rig.drv.queues[0]
    vq.submit(in_=[4])
    rig.drv.notify()
    assert rig.rd(INTERRUPT_STATUS) == 1 and rig.irq.levels[-1] == 1
    rig.wr(INTERRUPT_ACK, 2)                         # a bit that is not set: still pending
    assert rig.rd(INTERRUPT_STATUS) == 1 and rig.irq.levels[-1] == 1
    rig.wr(INTERRUPT_ACK, 1)
    assert rig.rd(INTERRUPT_STATUS) == 0 and rig.irq.levels[-1] == 0


def test_no_interrupt_when_the_driver_suppresses_it(rig):
    rig.drv.init(want=F_VERSION_1)                   # no EVENT_IDX: avail.flags decides
    vq = rig.drv.queues[0]
    vq.set_avail_flags(1)                            # VIRTQ_AVAIL_F_NO_INTERRUPT
    vq.submit(in_=[4])
    rig.drv.notify()
    assert len(vq.get_used()) == 1
    assert rig.rd(INTERRUPT_STATUS) == 0 and rig.irq.raised == 0


def test_buffers_made_available_before_driver_ok_are_taken_at_driver_ok(rig):
    drv = rig.drv
    drv.negotiate()
    vq = drv.setup_queue(0)
    vq.submit(in_=[4])
    drv.notify()                                     # before DRIVER_OK: ignored
    assert vq.get_used() == []
    drv.write(STATUS, A | D | FO | DO)
    assert len(vq.get_used()) == 1


# -- errors turn into DEVICE_NEEDS_RESET (items 2, 10, 13) --------------------------------------

class Exploding(VirtioDevice):
    device_type = DeviceType.ENTROPY
    name = "exploding"

    def __init__(self, mem):
        super().__init__(mem, [8])
        self.calls = 0

    def handle_request(self, queue, chain):
        self.calls += 1
        if self.calls == 1:
            raise ZeroDivisionError("bug in a device handler")
        return 0


def test_handler_exception_is_contained(mem, capsys):
    rig = Rig(mem, Exploding(mem))
    rig.drv.init()
    vq = rig.drv.queues[0]
    vq.submit(in_=[4])
    rig.drv.notify()                                  # must not raise
    assert rig.rd(STATUS) & NEEDS_RESET
    assert rig.rd(INTERRUPT_STATUS) == 2              # configuration change
    assert rig.dev.errors["handler"] == 1
    assert "ZeroDivisionError" in rig.dev.last_error
    assert "exploding needs a reset" in capsys.readouterr().err
    vq.submit(in_=[4])
    rig.drv.notify()                                  # ignored until reset
    assert rig.dev.calls == 1
    rig.drv.init()                                    # reset and start again
    vq = rig.drv.queues[0]
    vq.submit(in_=[4])
    rig.drv.notify()
    assert len(vq.get_used()) == 1 and not rig.rd(STATUS) & NEEDS_RESET


def test_descriptor_loop_needs_reset(rig):
    rig.drv.init()
    vq = rig.drv.queues[0]
    vq.write_desc(0, 0x20000, 16, 1 | 2, 1)
    vq.write_desc(1, 0x20000, 16, 1 | 2, 0)          # 0 -> 1 -> 0 -> ...
    vq.publish_raw(0, [0, 1])
    rig.drv.notify()
    assert rig.rd(STATUS) & NEEDS_RESET and rig.dev.errors["ring"] == 1
    assert "loop" in rig.dev.last_error
    assert vq.used_idx() == 0


def test_same_head_twice_needs_reset_and_is_completed_once(mem):
    class Slow(VirtioDevice):
        device_type = DeviceType.ENTROPY

        def __init__(self):
            super().__init__(mem, [8])

        def process_queue(self, queue):   # takes requests but does not complete them yet
            while (c := queue.pop()) is not None:
                self.held = c
            return False

    rig = Rig(mem, Slow())
    rig.drv.init()
    vq = rig.drv.queues[0]
    vq.write_desc(3, 0x20000, 16, 2)
    vq.publish(3)
    rig.drv.notify()
    vq.publish(3)                                     # head 3 again while in flight
    rig.drv.notify()
    assert rig.rd(STATUS) & NEEDS_RESET and "in flight" in rig.dev.last_error
    assert vq.used_idx() == 0


# -- bounded work and memory (item 15) ----------------------------------------------------------

def test_one_notify_does_at_most_queue_size_requests(mem):
    rig = Rig(mem)
    rig.drv.init(size=8)
    vq = rig.drv.queues[0]
    for _ in range(8):
        vq.submit(in_=[1])
    assert rig.dev.notify(0) is True                  # budget spent: "call me again"
    assert vq.used_idx() == 8
    assert rig.dev.notify(0) is False                 # nothing left


def test_flood_without_reading_the_used_ring_keeps_host_memory_flat(mem):
    import tracemalloc

    rig = Rig(mem)
    rig.drv.init(size=8)
    vq = rig.drv.queues[0]
    vq.write_desc(0, 0x30000, 4, 2)                   # one writable 4-byte buffer, reused

    def flood(n):
        for _ in range(n):
            vq.publish(0)
            rig.drv.notify()                          # the driver never reads the used ring

    flood(200)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        flood(5000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert vq.used_idx() == 5200 & 0xFFFF
    assert rig.dev.queues[0].in_flight == 0
    assert grown < 32 * 1024, grown


# -- any register traffic (items 8, 9, 25) ------------------------------------------------------

OFFSETS = st.one_of(st.sampled_from([0x000, 0x004, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034,
                                     0x038, 0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084,
                                     0x090, 0x094, 0x0A0, 0x0A4, 0x0FC, 0x100, 0x104]),
                    st.integers(0, 0xFFF))
VALUES = st.one_of(st.integers(0, 16), st.sampled_from([0xFF, 0xFFFF, 0xFFFFFFFF, 0x10000,
                                                        0xD0000000, 0x1000, 0x2000, 0x3000]),
                   st.integers(0, (1 << 64) - 1))


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), OFFSETS, st.sampled_from([1, 2, 4, 8]), VALUES),
                    max_size=60))
def test_random_register_traffic(ops):
    with GuestMemory([(0, 1 << 20)]) as mem:
        rig = Rig(mem)
        t = rig.transport
        for is_write, off, size, value in ops:
            if is_write:
                t.write(off, size, value & ((1 << (8 * size)) - 1))
            else:
                v = t.read(off, size)
                assert 0 <= v < 1 << (8 * size)
        # whatever happened, a reset and a proper init bring the device back
        rig.drv.init()
        vq = rig.drv.queues[0]
        vq.submit(in_=[8])
        rig.drv.notify()
        assert len(vq.get_used()) == 1


# -- the I/O thread -----------------------------------------------------------------------------

def test_iothread_runs_callbacks_and_contains_errors(capsys):
    calls = []
    with IoThread() as io:
        a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        done = threading.Event()

        def bad():
            os.eventfd_read(a)
            raise RuntimeError("device bug")

        def good():
            os.eventfd_read(b)
            calls.append("b")
            done.set()
        io.add_reader(a, bad)
        io.add_reader(b, good)
        os.eventfd_write(a, 1)
        os.eventfd_write(b, 1)
        assert done.wait(5)
        assert io.alive
        io.remove_reader(a)
        io.remove_reader(b)
        os.close(a)
        os.close(b)
    assert not io.alive
    assert io.errors == 1 and calls == ["b"]
    assert "device bug" in capsys.readouterr().err


def test_iothread_calls_again_when_asked_without_starving_others():
    order = []
    with IoThread() as io:
        busy = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        done = threading.Event()
        rounds = iter(range(5))

        def busy_cb():
            try:
                os.eventfd_read(busy)
            except BlockingIOError:
                pass
            order.append("busy")
            return next(rounds, None) is not None and len(order) < 50   # "more work"

        def other_cb():
            os.eventfd_read(other)
            order.append("other")
            done.set()
        io.add_reader(busy, busy_cb)
        io.add_reader(other, other_cb)
        os.eventfd_write(busy, 1)
        time.sleep(0.01)
        os.eventfd_write(other, 1)
        assert done.wait(5)
        deadline = time.monotonic() + 5
        while order.count("busy") < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        io.remove_reader(busy)
        io.remove_reader(other)
        os.close(busy)
        os.close(other)
    assert order.count("busy") == 6 and "other" in order


def test_iothread_stop_is_idempotent_and_remove_waits_for_the_callback():
    io = IoThread().start()
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    inside, release = threading.Event(), threading.Event()

    def slow():
        os.eventfd_read(fd)
        inside.set()
        release.wait(5)
    io.add_reader(fd, slow)
    os.eventfd_write(fd, 1)
    assert inside.wait(5)
    removed = threading.Event()
    t = threading.Thread(target=lambda: (io.remove_reader(fd), removed.set()))
    t.start()
    assert not removed.wait(0.1)                      # still inside the callback
    release.set()
    assert removed.wait(5)
    t.join()
    os.close(fd)
    io.stop()
    io.stop()
    io.close()
    io.close()
    assert not io.alive


def test_ioeventfd_mode_without_kvm_runs_in_the_iothread(mem):
    # A notify that reaches the transport goes through the eventfd to the I/O thread.
    class FakeVm:
        def __init__(self):
            self.calls = []

        def ioeventfd(self, fd, addr, length, datamatch=None, deassign=False):
            self.calls.append((addr, length, datamatch, deassign))

    rig = Rig(mem)
    rig.drv.init()
    vm = FakeVm()
    threads = []
    real = rig.dev.notify
    rig.dev.notify = lambda i, **k: (threads.append(threading.current_thread().name), real(i, **k))[1]
    with IoThread(name="virtio-io") as io:
        rig.transport.attach_ioeventfds(vm, BASE, io)
        assert vm.calls == [(BASE + 0x50, 4, 0, False)]
        vq = rig.drv.queues[0]
        vq.submit(in_=[8])
        rig.drv.notify()
        assert rig.irq.wait_raised(1)
        assert len(rig.drv.wait_used()) == 1
        rig.transport.close()
    assert vm.calls[-1] == (BASE + 0x50, 4, 0, True)
    assert set(threads) == {"virtio-io"}


# -- on /dev/kvm: guest notify through an ioeventfd, interrupt back into the guest ---------------

# Real mode with DS given a 4 GiB limit by the host ("unreal mode"), so 32-bit addresses reach
# the virtio-mmio window at 0xd0000000. The guest hooks IRQ 5 (8259 vector base 8 + 5 = 0x0d),
# unmasks it, notifies queue 0 and halts. The handler reads InterruptStatus, acknowledges it
# and reports it through isa-debug-exit (status = (isr << 1) | 1).
GUEST = r"""
        .code16
        cli
        xor %ax, %ax
        mov %ax, %ds
        movw $irq5, 0x0d * 4
        movw $0, 0x0d * 4 + 2
        mov $0x11, %al                 /* 8259 ICW1: edge, cascade, ICW4 */
        out %al, $0x20
        mov $0x08, %al                 /* ICW2: vector base 8 */
        out %al, $0x21
        mov $0x04, %al                 /* ICW3 */
        out %al, $0x21
        mov $0x01, %al                 /* ICW4: 8086 mode */
        out %al, $0x21
        mov $0xdf, %al                 /* OCW1: only IRQ 5 */
        out %al, $0x21
        sti
        addr32 movl $0, 0xd0000050     /* QueueNotify = 0: an ioeventfd, no exit */
1:      hlt
        jmp 1b
irq5:   addr32 movl 0xd0000060, %eax   /* InterruptStatus */
        addr32 movl %eax, 0xd0000064   /* InterruptACK */
        out %al, $0xf4                 /* isa-debug-exit */
"""


def unreal_mode_setup(vcpu):
    from kvmpy.vcpu.modes import setup_real_mode

    setup_real_mode(vcpu, 0x7C00)
    s = vcpu.get_sregs()
    s.ds.limit, s.ds.g = 0xFFFFFFFF, 1
    vcpu.set_sregs(s)


@kvm
@pytest.mark.parametrize("line", ["irq_line", "irqfd"])
def test_guest_notify_and_interrupt_through_kvm(line):
    from kvmpy.asm import assemble
    from kvmpy.builder import Machine
    from kvmpy.devices.debug_exit import DebugExit
    from kvmpy.virtio.irqfd import IrqFd

    with Machine(4 << 20, irqchip=True) as m, IoThread() as io:
        base, gsi = placement(0)
        m.memory.write(0x7C00, assemble(GUEST, 0x7C00))
        m.add_pio_device(DebugExit(), 0xF4)
        irq = m.irq_line(gsi) if line == "irq_line" else IrqFd(m.vm, gsi)
        transport = VirtioMmio(VirtioRng(m.memory), irq=irq)
        m.add_mmio_device(transport, base)
        drv = MmioDriver(m.memory, Regs(m.mmio, base))
        drv.init()
        # Attached after DRIVER_OK only so that the DRIVER_OK kick cannot run the request
        # below before the guest has programmed its PIC (which would drop the interrupt).
        transport.attach_ioeventfds(m.vm, base, io)
        req = drv.queues[0].submit(in_=[32])
        m.start(unreal_mode_setup)
        outcome = m.wait(30)
        mapping = m.mmio.lookup(base)
        try:
            assert outcome.status == (1 << 1) | 1, outcome      # the guest saw isr == 1
            (got, n), = drv.queues[0].get_used()
            assert got is req and n == 32 and req.written() != b"\xaa" * 32
            assert mapping.writes == 1 and mapping.reads == 1   # only the ACK and the ISR read
            assert transport.interrupt_status == 0
        finally:
            transport.close()
            if line == "irqfd":
                irq.close()


@kvm
def test_guest_notify_through_ioeventfd_without_exit():
    from kvmpy.asm import assemble
    from kvmpy.builder import Machine

    notify_and_halt = "\n".join(GUEST.splitlines()[:3] + [
        "        addr32 movl $0, 0xd0000050", "        addr32 movl $0, 0xd0000050",
        "        hlt"])
    with Machine(4 << 20) as m, IoThread() as io:
        m.memory.write(0x7C00, assemble(notify_and_halt, 0x7C00))
        irq = IrqRecorder()
        transport = VirtioMmio(VirtioRng(m.memory), irq=irq)
        m.add_mmio_device(transport, BASE)
        drv = MmioDriver(m.memory, Regs(m.mmio, BASE))
        drv.init()
        transport.attach_ioeventfds(m.vm, BASE, io)
        vq = drv.queues[0]
        reqs = [vq.submit(in_=[16]) for _ in range(3)]
        m.start(unreal_mode_setup)
        assert m.wait(30).status == 0                    # HLT with interrupts off
        assert len(drv.wait_used(count=3)) == 3
        assert irq.wait_raised(1)
        assert all(r.written() != b"\xaa" * 16 for r in reqs)
        assert m.dispatcher.exit_counts().get("MMIO", 0) == 0   # the notifies never exited
        transport.close()
