"""The split virtqueue against hostile rings (shared/hostile-inputs.md items 1-7, 10, 11, 15).

No /dev/kvm needed: rings live in a GuestMemory. Guest memory here has a hole (RAM at
0-0x80000 and 0x100000-0x110000) so buffers can straddle it; 0xd0000000 stands for MMIO.
"""
from __future__ import annotations

import os
import struct
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmpy.errors import GuestMemoryError
from kvmpy.memory import GuestMemory
from kvmpy.virtio.queue import (DescriptorChain, Queue, QueueError, Segment,
                                vring_need_event)

NEXT, WRITE, INDIRECT = 1, 2, 4
DESC = struct.Struct("<QIHH")
LOW_END, HIGH = 0x80000, 0x100000
LAYOUT = [(0, LOW_END), (HIGH, 0x10000)]
SIZE = 8
DESC_ADDR, AVAIL_ADDR, USED_ADDR = 0x1000, 0x2000, 0x3000
BUF = 0x10000


@pytest.fixture
def mem():
    with GuestMemory(LAYOUT) as m:
        yield m


def make_queue(mem, size=SIZE, max_size=256, indirect=True, event_idx=False) -> Queue:
    q = Queue(mem, 0, max_size)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = DESC_ADDR, AVAIL_ADDR, USED_ADDR
    q.activate(event_idx=event_idx, indirect=indirect)
    return q


def desc(mem, i, addr, length, flags=0, nxt=0, table=DESC_ADDR):
    mem.write_struct(table + 16 * i, DESC, addr, length, flags, nxt)


def publish(mem, q, *heads, start=0):
    idx = start
    for h in heads:
        mem.write_u16(q.avail_addr + 4 + 2 * (idx % q.size), h)
        idx += 1
    mem.write_u16(q.avail_addr + 2, idx & 0xFFFF)


def used(mem, q, slot):
    return struct.unpack_from("<II", mem.read(q.used_addr + 4 + 8 * slot, 8))


# -- activation (item 7) ------------------------------------------------------------------------

@pytest.mark.parametrize("size, desc_addr, avail_addr, used_addr, why", [
    (0, DESC_ADDR, AVAIL_ADDR, USED_ADDR, "size"),
    (3, DESC_ADDR, AVAIL_ADDR, USED_ADDR, "size"),
    (512, DESC_ADDR, AVAIL_ADDR, USED_ADDR, "size"),            # above max 256
    (0x10000, DESC_ADDR, AVAIL_ADDR, USED_ADDR, "size"),
    (8, DESC_ADDR + 8, AVAIL_ADDR, USED_ADDR, "aligned"),      # desc needs 16
    (8, DESC_ADDR, AVAIL_ADDR + 1, USED_ADDR, "aligned"),      # avail needs 2
    (8, DESC_ADDR, AVAIL_ADDR, USED_ADDR + 2, "aligned"),      # used needs 4
    (8, 0xD0000000, AVAIL_ADDR, USED_ADDR, "not in guest RAM"),  # MMIO
    (8, DESC_ADDR, LOW_END - 4, USED_ADDR, "not in guest RAM"),  # straddles the hole
    (8, DESC_ADDR, AVAIL_ADDR, HIGH + 0x10000 - 8, "not in guest RAM"),  # runs off the end
    (8, (1 << 64) - 16, AVAIL_ADDR, USED_ADDR, "not in guest RAM"),      # wraps 2^64
])
def test_activation_refuses_bad_configuration(mem, size, desc_addr, avail_addr, used_addr, why):
    q = Queue(mem, 0, 256)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, desc_addr, avail_addr, used_addr
    with pytest.raises(QueueError, match=why):
        q.activate()
    assert not q.ready
    assert q.pop() is None   # a queue that is not ready never touches memory


def test_max_size_must_be_a_power_of_two(mem):
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            Queue(mem, 0, bad)


# -- well-formed chains -------------------------------------------------------------------------

def test_activation_asks_for_notifications(mem):
    """used.flags NO_NOTIFY and a stale avail_event, left by a device that polled before a
    reset, are cleared."""
    avail_event = USED_ADDR + 4 + 8 * SIZE
    mem.write_u16(USED_ADDR, 1)
    mem.write_u16(avail_event, 0x1234)
    q = make_queue(mem)
    assert mem.read_u16(USED_ADDR) == 0 and mem.read_u16(avail_event) == 0
    q.disable_notify()
    assert mem.read_u16(USED_ADDR) == 1
    assert q.enable_notify() is False and mem.read_u16(USED_ADDR) == 0


def test_avail_moved_is_a_look_at_avail_idx(mem):
    q = make_queue(mem, size=4)
    desc(mem, 1, BUF, 8)
    assert not q.avail_moved()
    publish(mem, q, 1)
    assert q.avail_moved()
    assert q.pop().head == 1 and not q.avail_moved()
    q.add_used(1, 0)
    # across the 16-bit wrap: the device at 0xffff, the driver posts one (avail.idx 0)
    q.last_avail = q._avail_seen = 0xFFFF
    publish(mem, q, 1, start=0xFFFF)
    assert mem.read_u16(AVAIL_ADDR + 2) == 0 and q.avail_moved()
    assert q.pop().head == 1 and not q.avail_moved()


def test_chain_readable_then_writable(mem):
    q = make_queue(mem)
    desc(mem, 0, BUF, 16, NEXT, 5)
    desc(mem, 5, BUF + 0x100, 100, NEXT | WRITE, 2)
    desc(mem, 2, BUF + 0x200, 1, WRITE)
    mem.write(BUF, b"0123456789abcdef")
    publish(mem, q, 0)
    c = q.pop()
    assert isinstance(c, DescriptorChain) and c.head == 0
    assert c.readable == [Segment(BUF, 16)]
    assert c.writable == [Segment(BUF + 0x100, 100), Segment(BUF + 0x200, 1)]
    assert (c.read_len, c.write_len) == (16, 101)
    assert c.read(4, 6) == b"456789"
    assert c.write(99, b"xy") == 2                # crosses into the second writable segment
    assert mem.read(BUF + 0x100 + 99, 1) == b"x" and mem.read(BUF + 0x200, 1) == b"y"
    assert q.pop() is None
    q.add_used(0, 101)
    assert used(mem, q, 0) == (0, 101)
    assert mem.read_u16(USED_ADDR + 2) == 1


def test_indices_wrap_around_16_bits(mem):
    q = make_queue(mem, size=4)
    desc(mem, 1, BUF, 8)
    for i in range(70000):   # more than 2^16 requests through a 4-entry ring
        publish(mem, q, 1, start=i)
        c = q.pop()
        assert c is not None and c.head == 1
        q.add_used(1, 0)
    assert q.pop() is None
    assert mem.read_u16(USED_ADDR + 2) == 70000 & 0xFFFF


def test_direct_chain_ending_in_an_indirect_table(mem):
    # 2.7.5.3.2: "zero or more normal chained descriptors followed by a single descriptor
    # with flags&VIRTQ_DESC_F_INDIRECT"
    q = make_queue(mem)
    table = 0x8000
    desc(mem, 0, BUF, 16, NEXT, 1)
    desc(mem, 1, table, 32, INDIRECT | WRITE)    # WRITE on the table descriptor is ignored
    desc(mem, 0, BUF + 0x100, 512, NEXT | WRITE, 1, table=table)
    desc(mem, 1, BUF + 0x400, 1, WRITE, 0, table=table)
    publish(mem, q, 0)
    c = q.pop()
    assert c.readable == [Segment(BUF, 16)]
    assert c.writable == [Segment(BUF + 0x100, 512), Segment(BUF + 0x400, 1)]


def test_zero_length_descriptors_carry_nothing(mem):
    q = make_queue(mem)
    desc(mem, 0, BUF, 0, NEXT, 1)
    desc(mem, 1, BUF, 4, WRITE)
    publish(mem, q, 0)
    c = q.pop()
    assert c.readable == [] and c.writable == [Segment(BUF, 4)]


def test_a_chain_may_use_every_descriptor(mem):
    q = make_queue(mem)
    for i in range(SIZE):
        desc(mem, i, BUF + 16 * i, 16, NEXT if i < SIZE - 1 else 0, i + 1)
    publish(mem, q, 0)
    assert len(q.pop().readable) == SIZE


# -- hostile chains (items 1-5) -----------------------------------------------------------------

def pop_error(mem, q, head=0, match=None):
    publish(mem, q, head)
    with pytest.raises(QueueError, match=match):
        q.pop()


def test_next_out_of_range(mem):
    q = make_queue(mem)
    desc(mem, 0, BUF, 16, NEXT, SIZE)
    pop_error(mem, q, match="outside the descriptor table")


def test_head_out_of_range(mem):
    q = make_queue(mem)
    pop_error(mem, q, head=0xFFFF, match="not below the queue size")


@pytest.mark.parametrize("cycle", [1, 2, SIZE])
def test_descriptor_loop_terminates(mem, cycle):
    q = make_queue(mem)
    for i in range(cycle):
        desc(mem, i, BUF, 16, NEXT, (i + 1) % cycle)
    pop_error(mem, q, match="loop")


def test_loop_inside_an_indirect_table(mem):
    q = make_queue(mem)
    table = 0x8000
    desc(mem, 0, table, 16 * 4, INDIRECT)
    for i in range(4):
        desc(mem, i, BUF, 1, NEXT, (i + 1) % 4, table=table)
    pop_error(mem, q, match="loop")


def test_total_length_2_to_the_32():
    # Two 2 GiB buffers (both in RAM: the same one twice) add up to 2^32 bytes.
    with GuestMemory([(0, 0x80000000 + 0x20000)]) as big:
        q = make_queue(big)
        desc(big, 0, BUF, 0x80000000, NEXT, 1)
        desc(big, 1, BUF, 0x80000000 - 1, NEXT, 2)
        desc(big, 2, BUF, 1)
        pop_error(big, q, match="2\\^32")


def test_readable_after_writable(mem):
    q = make_queue(mem)
    desc(mem, 0, BUF, 16, WRITE | NEXT, 1)
    desc(mem, 1, BUF, 16)
    pop_error(mem, q, match="readable descriptor after")


@pytest.mark.parametrize("addr, length", [
    (LOW_END - 8, 16),                 # runs into the hole
    (LOW_END + 0x1000, 16),            # inside the hole
    (HIGH + 0x10000 - 1, 2),           # off the end of RAM
    (0xD0000000, 4),                   # MMIO: the device's own registers
    (0xD0000050, 4),                   # its QueueNotify (no re-entry, CVE-2019-18960 class)
    ((1 << 64) - 8, 16),               # wraps past 2^64
    ((1 << 64) - 1, 0),                # zero-length, still not RAM
])
def test_buffer_outside_ram(mem, addr, length):
    q = make_queue(mem)
    desc(mem, 0, addr, length)
    pop_error(mem, q, match="not in guest RAM")


def test_indirect_not_negotiated(mem):
    q = make_queue(mem, indirect=False)
    desc(mem, 0, 0x8000, 16, INDIRECT)
    pop_error(mem, q, match="not negotiated")


@pytest.mark.parametrize("flags, length, match", [
    (INDIRECT | NEXT, 16, "INDIRECT and NEXT"),
    (INDIRECT, 0, "multiple of 16"),
    (INDIRECT, 24, "multiple of 16"),
    (INDIRECT, 16 * 65536, "65535"),
])
def test_bad_indirect_descriptor(mem, flags, length, match):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, length, flags, 1)
    desc(mem, 1, BUF, 16)
    pop_error(mem, q, match=match)


def test_indirect_inside_indirect(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 32, INDIRECT)
    desc(mem, 0, 0x9000, 16, INDIRECT, table=0x8000)
    desc(mem, 0, BUF, 16, table=0x9000)
    pop_error(mem, q, match="inside an indirect table")


def test_indirect_table_outside_ram(mem):
    q = make_queue(mem)
    desc(mem, 0, LOW_END - 16, 32, INDIRECT)
    pop_error(mem, q, match="indirect table at")


def test_indirect_next_outside_its_table(mem):
    q = make_queue(mem)
    desc(mem, 0, 0x8000, 32, INDIRECT)
    desc(mem, 0, BUF, 16, NEXT, 2, table=0x8000)     # table has 2 entries
    pop_error(mem, q, match="outside the indirect table")


# -- available ring (items 6, 10, 15) -----------------------------------------------------------

def test_avail_index_too_far_ahead(mem):
    q = make_queue(mem)
    desc(mem, 0, BUF, 16)
    mem.write_u16(AVAIL_ADDR + 2, SIZE + 1)
    with pytest.raises(QueueError, match="ahead"):
        q.pop()
    mem.write_u16(AVAIL_ADDR + 2, 0xFFFF)          # "behind" is also far ahead, mod 2^16
    with pytest.raises(QueueError, match="ahead"):
        q.pop()


def test_exactly_size_entries_ahead_is_fine(mem):
    q = make_queue(mem)
    for i in range(SIZE):
        desc(mem, i, BUF, 16)
    publish(mem, q, *range(SIZE))
    assert [q.pop().head for _ in range(SIZE)] == list(range(SIZE))
    assert q.pop() is None


def test_same_head_twice_in_flight(mem):
    q = make_queue(mem)
    desc(mem, 3, BUF, 16)
    publish(mem, q, 3, 3)
    assert q.pop().head == 3
    with pytest.raises(QueueError, match="still in flight"):
        q.pop()


def test_head_reusable_after_completion(mem):
    q = make_queue(mem)
    desc(mem, 3, BUF, 16)
    publish(mem, q, 3, 3)
    q.add_used(q.pop().head, 0)
    assert q.pop().head == 3


def test_completing_a_head_not_in_flight_is_refused(mem):
    q = make_queue(mem)
    with pytest.raises(QueueError):
        q.add_used(0, 0)
    with pytest.raises(QueueError):
        q.add_used(SIZE, 0)


# -- each descriptor read once (item 11) --------------------------------------------------------

def count_descriptor_reads(q, mem, rewrite=False) -> dict[int, int]:
    """Wrap the queue's one descriptor-reading function: count reads per guest address and,
    with ``rewrite``, let the driver rewrite each descriptor right after the device read it
    (TOCTOU). Returns the live count."""
    reads: dict[int, int] = {}
    real = q._unpack_desc

    def unpack(mapping, offset):
        gpa = next(r.gpa for r in mem.regions if r.mapping is mapping) + offset
        reads[gpa] = reads.get(gpa, 0) + 1
        value = real(mapping, offset)
        if rewrite:
            mem.write_struct(gpa, DESC, 0xD0000000, 0xFFFFFFFF, NEXT, 0)
        return value
    q._unpack_desc = unpack
    return reads


def test_each_descriptor_is_read_once(mem):
    q = make_queue(mem)
    reads = count_descriptor_reads(q, mem)
    desc(mem, 0, BUF, 16, NEXT, 1)
    desc(mem, 1, 0x8000, 32, INDIRECT)
    desc(mem, 0, BUF, 16, NEXT | WRITE, 1, table=0x8000)
    desc(mem, 1, BUF, 16, WRITE, table=0x8000)
    publish(mem, q, 0)
    q.pop()
    assert reads == {DESC_ADDR: 1, DESC_ADDR + 16: 1, 0x8000: 1, 0x8010: 1}


def test_rewriting_a_descriptor_after_it_was_read_changes_nothing(mem):
    q = make_queue(mem)
    count_descriptor_reads(q, mem, rewrite=True)
    desc(mem, 0, BUF, 16, NEXT, 1)
    desc(mem, 1, BUF + 16, 8, WRITE)
    publish(mem, q, 0)
    c = q.pop()
    assert c.readable == [Segment(BUF, 16)] and c.writable == [Segment(BUF + 16, 8)]


# -- interrupt suppression (2.7.7, 2.7.10) ------------------------------------------------------

def test_vring_need_event():
    assert vring_need_event(0, 1, 0)            # crossed event 0
    assert not vring_need_event(5, 3, 0)        # not reached yet
    assert vring_need_event(5, 6, 5)
    assert not vring_need_event(5, 7, 6)        # already past before
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap
    assert not vring_need_event(3, 3, 3)        # nothing new


def test_no_interrupt_flag(mem):
    q = make_queue(mem)
    desc(mem, 0, BUF, 16)
    assert not q.needs_interrupt()              # nothing added yet
    publish(mem, q, 0)
    q.add_used(q.pop().head, 0)
    mem.write_u16(AVAIL_ADDR, 1)                # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not q.needs_interrupt()
    mem.write_u16(AVAIL_ADDR, 0)
    publish(mem, q, 0, start=1)
    q.add_used(q.pop().head, 0)
    assert q.needs_interrupt()
    assert not q.needs_interrupt()              # already told


def test_event_idx(mem):
    q = make_queue(mem, event_idx=True)
    used_event = AVAIL_ADDR + 4 + 2 * SIZE
    avail_event = USED_ADDR + 4 + 8 * SIZE
    for i in range(SIZE):
        desc(mem, i, BUF, 16)
    mem.write_u16(used_event, 2)                # interrupt me when used.idx passes 2
    publish(mem, q, 0)
    assert q.pop().head == 0
    assert q.pop() is None
    assert mem.read_u16(avail_event) == 1       # device asks to be notified from index 1 on
    q.add_used(0, 0)
    assert q.needs_interrupt()                  # the first one is always signalled
    for i in range(1, 4):
        publish(mem, q, i, start=i)
        q.add_used(q.pop().head, 0)
        # used.idx goes 2, 3, 4: only the step that crosses used_event=2 (2 -> 3) interrupts
        assert q.needs_interrupt() == (i == 2), i


# -- property: any ring contents ----------------------------------------------------------------

class StrictMemory:
    """A GuestMemory proxy with nothing but ``check`` and ``contains``: the queue must locate
    every range it touches through GuestMemory.check (the one bounds check), and a range it
    located must be RAM. Any other way into guest memory fails the test (AttributeError, which
    pop does not convert)."""

    def __init__(self, mem):
        self.check, self.contains = mem.check, mem.contains


ADDRS = st.one_of(st.integers(0, LOW_END + 0x200), st.integers(HIGH - 0x20, HIGH + 0x10020),
                  st.sampled_from([0xD0000000, (1 << 64) - 16, (1 << 64) - 1]),
                  st.just(0x8000), st.just(0x9000))
LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from([0x80000000, 0xFFFFFFFF, 16 * 65536]),
                    st.integers(0, 0xFFFFFFFF))


def drain(q, mem) -> int:
    """Pop and complete until the ring is empty or broken; the number completed."""
    completed = 0
    for _ in range(q.size + 2):          # always terminates: bounded by construction
        try:
            c = q.pop()
        except QueueError:
            break
        if c is None:
            break
        assert all(mem.contains(s.addr, s.len) for s in c.readable + c.writable)
        assert c.read_len + c.write_len < 1 << 32
        q.add_used(c.head, c.write_len)
        completed += 1
        q.needs_interrupt()
    return completed


WILD = st.tuples(ADDRS, LENGTHS, st.integers(0, 7), st.integers(0, 0xFFFF))


def descriptors(n_next: int):
    """Mostly plausible descriptors (``next`` mostly below ``n_next``), so that many chains get
    through and the rules are exercised along chains, not only at their first descriptor."""
    plain = st.tuples(st.integers(BUF, BUF + 0x1000), st.integers(0, 64),
                      st.sampled_from([0, 0, NEXT, WRITE, WRITE, NEXT | WRITE]),
                      st.integers(0, n_next))
    table = st.tuples(st.sampled_from([0x8000, 0x9000]), st.integers(1, 9).map(lambda n: 16 * n),
                      st.sampled_from([INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT]),
                      st.integers(0, n_next))
    return st.one_of(plain, plain, plain, plain, table, WILD)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16]), event_idx=st.booleans(),
       indirect=st.booleans())
def test_random_ring_contents(data, size, event_idx, indirect):
    table = data.draw(st.lists(descriptors(size), min_size=size, max_size=size))
    indirect1 = data.draw(st.lists(descriptors(9), min_size=9, max_size=9))
    indirect2 = data.draw(st.lists(descriptors(9), min_size=9, max_size=9))
    head = st.integers(0, size - 1)
    ring = data.draw(st.lists(st.one_of(head, head, head, st.integers(0, 0xFFFF)),
                              min_size=size, max_size=size))
    avail = st.integers(1, size)
    avail_idx = data.draw(st.one_of(avail, avail, avail, st.integers(0, 0xFFFF)))
    with GuestMemory(LAYOUT) as mem:
        for i, d in enumerate(table):
            desc(mem, i, *d)
        for i, d in enumerate(indirect1):
            desc(mem, i, *d, table=0x8000)
        for i, d in enumerate(indirect2):
            desc(mem, i, *d, table=0x9000)
        for i, h in enumerate(ring):
            mem.write_u16(AVAIL_ADDR + 4 + 2 * i, h)
        mem.write_u16(AVAIL_ADDR + 2, avail_idx)
        q = Queue(StrictMemory(mem), 0, 16)
        q.size, q.desc_addr, q.avail_addr, q.used_addr = size, DESC_ADDR, AVAIL_ADDR, USED_ADDR
        q.activate(event_idx=event_idx, indirect=indirect)
        completed = drain(q, mem)
        assert completed <= size
        assert mem.read_u16(USED_ADDR + 2) == completed


FIELDS = ("addr", "len", "flags", "next")
MUTATION = st.tuples(st.sampled_from(["desc", "indirect", "ring", "idx", "used_event"]),
                     st.integers(0, 15), st.sampled_from(FIELDS),
                     st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF),
                               st.sampled_from([0xD0000000, LOW_END - 4, 1 << 63,
                                                0xFFFFFFFF, 16 * 65536])))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([2, 4, 8, 16]), event_idx=st.booleans(), indirect=st.booleans(),
       chains=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()),
                       min_size=1, max_size=16),
       mutations=st.lists(MUTATION, max_size=4))
def test_mutated_valid_ring(size, event_idx, indirect, chains, mutations):
    """A well-formed ring (chains of R readable then W writable buffers, some through indirect
    tables) with a few fields overwritten by the hostile driver."""
    with GuestMemory(LAYOUT) as mem:
        q = Queue(StrictMemory(mem), 0, 16)
        q.size, q.desc_addr, q.avail_addr, q.used_addr = size, DESC_ADDR, AVAIL_ADDR, USED_ADDR
        q.activate(event_idx=event_idx, indirect=indirect)
        free, heads, tables = list(range(size)), [], []
        for n, (r, w, via_table) in enumerate(chains):
            bufs = [(BUF + 0x100 * n + 16 * i, 16, WRITE if i >= r else 0)
                    for i in range(max(r + w, 1))]
            if via_table and indirect:
                if not free:
                    break
                table = 0x8000 + 0x200 * n
                for i, (a, ln, f) in enumerate(bufs):
                    desc(mem, i, a, ln, f | (NEXT if i + 1 < len(bufs) else 0), i + 1,
                         table=table)
                head = free.pop()
                desc(mem, head, table, 16 * len(bufs), INDIRECT)
                tables.append(table)
            else:
                if len(bufs) > len(free):
                    break
                ids = [free.pop() for _ in bufs]
                for i, (a, ln, f) in enumerate(bufs):
                    more = i + 1 < len(bufs)
                    desc(mem, ids[i], a, ln, f | (NEXT if more else 0), ids[i + 1] if more else 0)
                head = ids[0]
            heads.append(head)
        publish(mem, q, *heads)
        for target, i, field, value in mutations:
            if target in ("desc", "indirect"):
                table = DESC_ADDR if target == "desc" or not tables else tables[i % len(tables)]
                entry = list(mem.read_struct(table + 16 * (i % size), DESC))
                entry[FIELDS.index(field)] = value & (0xFFFFFFFF if field == "len" else
                                                      0xFFFF if field in ("flags", "next")
                                                      else (1 << 64) - 1)
                mem.write_struct(table + 16 * (i % size), DESC, *entry)
            elif target == "ring":
                mem.write_u16(AVAIL_ADDR + 4 + 2 * (i % size), value & 0xFFFF)
            elif target == "idx":
                mem.write_u16(AVAIL_ADDR + 2, value & 0xFFFF)
            else:
                mem.write_u16(AVAIL_ADDR + 4 + 2 * size, value & 0xFFFF)
        completed = drain(q, mem)
        assert completed <= size
        assert mem.read_u16(USED_ADDR + 2) == completed
        if not mutations:
            assert completed == len(heads)
        event(f"completed {'all' if completed == len(heads) else 'some' if completed else 'none'}")


def test_guest_memory_error_never_escapes_pop(mem, monkeypatch):
    q = make_queue(mem)
    desc(mem, 0, BUF, 16)
    publish(mem, q, 0)

    def boom(*a):
        raise GuestMemoryError("simulated")
    monkeypatch.setattr(mem, "check", boom)
    with pytest.raises(QueueError, match="not in guest RAM"):
        q.pop()


# -- the walk's region cache: a buffer after one in another region is still checked ------------

@pytest.mark.parametrize("first", [BUF, HIGH + 0x100], ids=["low region", "high region"])
@pytest.mark.parametrize("addr, length", [
    (LOW_END - 8, 16),                 # runs from the low region into the hole
    (LOW_END + 0x1000, 16),            # inside the hole (below the high region)
    (HIGH - 8, 16),                    # runs from the hole into the high region
    (HIGH + 0x10000 - 1, 2),           # off the end of RAM
    (0xD0000000, 4),                   # MMIO
    ((1 << 64) - 8, 16),               # wraps past 2^64
])
def test_buffer_outside_ram_after_a_good_one(mem, first, addr, length):
    q = make_queue(mem)
    desc(mem, 0, first, 16, NEXT, 1)   # located first: the walk remembers its region
    desc(mem, 1, addr, length)
    pop_error(mem, q, match="not in guest RAM")
    q2 = make_queue(mem)               # and across requests: a good chain, then the bad one
    desc(mem, 2, first, 16)
    publish(mem, q2, 2)
    assert q2.pop() is not None
    desc(mem, 3, addr, length)
    publish(mem, q2, 3, start=1)
    with pytest.raises(QueueError, match="not in guest RAM"):
        q2.pop()


def test_a_chain_across_regions_reads_each_buffer_from_its_own(mem):
    q = make_queue(mem)
    mem.write(BUF, b"low-")
    mem.write(HIGH + 0x10, b"high-")
    mem.write(BUF + 0x100, b"low-again")
    desc(mem, 0, BUF, 4, NEXT, 1)
    desc(mem, 1, HIGH + 0x10, 5, NEXT, 2)
    desc(mem, 2, BUF + 0x100, 9, NEXT, 3)
    desc(mem, 3, LOW_END - 4, 4, WRITE)   # the last 4 bytes of the low region: still RAM
    publish(mem, q, 0)
    chain = q.pop()
    assert chain.read() == b"low-high-low-again"
    assert chain.readable == [Segment(BUF, 4), Segment(HIGH + 0x10, 5), Segment(BUF + 0x100, 9)]
    assert chain.write(0, b"tail") == 4 and mem.read(LOW_END - 4, 4) == b"tail"
    assert chain.unpack(struct.Struct("<4s5s")) == (b"low-", b"high-")   # spans two buffers
    with pytest.raises(ValueError):
        chain.unpack(struct.Struct("<20s"))                             # past the readable part


# -- used.idx is published once per batch, and also when a bad chain ends the batch ---------------

def test_used_idx_is_published_when_a_bad_chain_ends_the_batch(mem):
    from kvmpy.virtio.device import VirtioDevice

    class Counting(VirtioDevice):
        device_type = 4
        name = "counting"

        def __init__(self):
            super().__init__(mem, [SIZE], indirect_desc=False, event_idx=False)
            self.done = 0

        def handle_request(self, queue, chain):
            self.done += 1
            assert mem.read_u16(USED_ADDR + 2) == 0     # not published per request
            return 0

    dev = Counting()
    signals = []
    dev.interrupt = signals.append
    q = dev.queues[0]
    q.size, q.desc_addr, q.avail_addr, q.used_addr = SIZE, DESC_ADDR, AVAIL_ADDR, USED_ADDR
    dev.status = 1 | 2 | 8 | 4                          # ACKNOWLEDGE, DRIVER, FEATURES_OK, OK
    assert dev.queue_ready(0)
    desc(mem, 0, BUF, 16)
    desc(mem, 1, BUF, 16)
    desc(mem, 2, BUF, 16, NEXT, SIZE)                   # next out of range: a broken ring
    publish(mem, q, 0, 1, 2)
    dev.notify(0)
    assert dev.done == 2
    assert mem.read_u16(USED_ADDR + 2) == 2             # the two completed ones are visible
    assert [used(mem, q, i)[0] for i in range(2)] == [0, 1]
    assert dev.status & 64                              # DEVICE_NEEDS_RESET


# -- concurrent readers of what the device stores (the driver runs on another CPU) --------------

RACE_CHILD_SECONDS = 0.4


def _watch_u16(mem, gpa: int, allowed: set[int], seconds: float) -> tuple[int, int]:
    """Fork a process that reads the 16-bit field at ``gpa`` (one 16-bit load, as a guest
    does) for ``seconds``; (pid, pipe) whose reply is how many reads saw a value not in
    ``allowed``."""
    region, off = mem.check(gpa, 2)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:       # pragma: no cover - the child
        bad = 0
        view = memoryview(region.mapping).cast("H")
        i = off // 2
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(2000):
                if view[i] not in allowed:
                    bad += 1
        os.write(w, str(bad).encode())
        os._exit(0)
    os.close(w)
    return pid, r


def test_ring_stores_are_single_stores_a_concurrent_driver_never_sees_torn():
    """used.idx and avail_event are stored with one 16-bit store: a driver reading them at the
    same time sees the old or the new value, never a torn one or a transient 0. (struct's
    pack_into zeroes its bytes first and then writes them one at a time: a Linux guest reading
    used.idx then could take 0 for the index and complete stale ring entries.)"""
    with GuestMemory(LAYOUT, shared=True) as mem:
        q = make_queue(mem, event_idx=True)
        a, b = 0x12FF, 0x3400          # differ in both bytes; neither is 0
        q.used_idx = a
        q.publish_used()
        avail_event = USED_ADDR + 4 + 8 * q.size
        mem.write_u16(avail_event, a)
        for field, store in ((USED_ADDR + 2, "used"), (avail_event, "event")):
            pid, r = _watch_u16(mem, field, {a, b}, RACE_CHILD_SECONDS)
            end = time.monotonic() + RACE_CHILD_SECONDS
            while time.monotonic() < end:
                for v in (b, a) * 500:
                    if store == "used":
                        q.used_idx = v
                        q.publish_used()
                    else:              # pop() on an empty ring stores avail_event = last_avail
                        q.last_avail = q._avail_seen = v
                        mem.write_u16(AVAIL_ADDR + 2, v)
                        assert q.pop() is None
            with os.fdopen(r) as f:
                bad = int(f.read())
            os.waitpid(pid, 0)
            assert bad == 0, f"{store}: {bad} torn reads"
