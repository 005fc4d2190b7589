"""virtio-blk's two engines: the C data path (kvmpy/virtio/fastblk.c) and the Python device.

The C engine takes IN/OUT/FLUSH of well-formed chains and defers everything else to Python;
tests/test_virtio_blk.py runs every device test on both. Here: that the C engine really is what
runs the ordinary requests, that deferral in the middle of a batch keeps order and results, and
a differential property test: random (mostly plausible, partly hostile) rings and requests give
byte-for-byte the same guest memory, image file, used ring, counters and device state with
either engine.
"""
from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmpy.errors import KvmpyError
from kvmpy.memory import GuestMemory
from kvmpy.virtio.blk import VirtioBlk
from kvmpy.virtio.device import POLL_ROUNDS
from kvmpy.virtio.fastblk import BlkFastPath
from kvmpy.virtio.mmio import VirtioMmio
from kvmpy.vmexit.bus import MmioBus
from virtio_driver import (DESC, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, INDIRECT, NEEDS_RESET,
                           NEXT, WRITE, MmioDriver, Regs)

BASE = 0xD0000000
SECTORS = 64
HDR = struct.Struct("<IIQ")
RANGE = struct.Struct("<QII")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR = 0, 1
F_FLUSH = 1 << 9
# two RAM regions with a hole between them: buffers are located region by region
LAYOUT = [(0, 0x100000), (0x200000, 0x100000)]
HIGH = 0x200000


def image_bytes(n: int = SECTORS * 512) -> bytes:
    return bytes((i * 13 + i // 512) & 0xFF for i in range(n))


class Rig:
    def __init__(self, mem, path, engine, want=None, ro=False, size=None, poll_us=0):
        self.dev = VirtioBlk(mem, str(path), ro=ro, engine=engine, serial="same",
                             poll_us=poll_us)
        self.transport = VirtioMmio(self.dev)
        bus = MmioBus()
        bus.insert(self.transport, BASE)
        self.drv = MmioDriver(mem, Regs(bus, BASE), area=(0x10000, 0x100000))
        self.drv.init(want, size=size)
        self.vq = self.drv.queues[0]

    def close(self):
        self.transport.close()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(image_bytes())
    return p


def counting_run(done: list[int]):
    """BlkFastPath.run, adding the requests the C engine completed to ``done[0]``."""
    real = BlkFastPath.run

    def run(self, *a, **k):
        n, why = real(self, *a, **k)
        done[0] += n
        return n, why
    return run


def count_c_requests(monkeypatch) -> list[int]:
    """Requests completed by the C engine, summed over its calls."""
    done = [0]
    monkeypatch.setattr(BlkFastPath, "run", counting_run(done))
    return done


@pytest.mark.parametrize("indirect", [False, True])
def test_c_engine_runs_ordinary_requests_without_python(image, monkeypatch, indirect):
    c_done = count_c_requests(monkeypatch)
    monkeypatch.setattr(VirtioBlk, "handle_request",
                        lambda *a: pytest.fail("the Python device ran a request"))
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c")
        new = bytes(range(256)) * 8
        reqs = [r.vq.submit(out=[HDR.pack(T_IN, 0, 3)], in_=[1024, 512, 1], indirect=indirect),
                r.vq.submit(out=[HDR.pack(T_OUT, 0, 10), new[:1000], new[1000:]], in_=[1],
                            indirect=indirect),
                r.vq.submit(out=[HDR.pack(T_FLUSH, 0, 0)], in_=[1], indirect=indirect),
                r.vq.submit(out=[HDR.pack(T_IN, 0, 10)], in_=[2049], indirect=indirect)]
        r.drv.notify()
        used = dict((req.head, n) for req, n in r.vq.get_used())
        assert c_done[0] == 4
        assert [used[q.head] for q in reqs] == [1537, 1, 1, 2049]
        assert reqs[0].written() == image_bytes()[3 * 512:6 * 512] + b"\0"
        assert reqs[3].written() == new + b"\0"     # status in the data buffer's last byte
        assert image.read_bytes()[10 * 512:14 * 512] == new
        assert r.dev.stats["reads"] == 2 and r.dev.stats["writes"] == 1
        assert r.dev.stats["flushes"] == 1
        r.close()


def test_deferred_requests_keep_their_place_in_the_batch(image, monkeypatch):
    c_done = count_c_requests(monkeypatch)
    python = []
    real = VirtioBlk.handle_request
    monkeypatch.setattr(VirtioBlk, "handle_request",
                        lambda self, q, chain: python.append(chain.head) or real(self, q, chain))
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c", ro=False)
        reqs = [r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1]),
                r.vq.submit(out=[HDR.pack(T_GET_ID, 0, 0)], in_=[20, 1]),      # Python's
                r.vq.submit(out=[HDR.pack(T_IN, 0, 1)], in_=[512, 1]),
                r.vq.submit(out=[HDR.pack(T_IN, 0, SECTORS)], in_=[512, 1]),   # IOERR: Python
                r.vq.submit(out=[HDR.pack(T_IN, 0, 2)], in_=[512, 1])]
        r.drv.notify()
        got = r.vq.get_used()
        assert [req for req, _ in got] == reqs                  # completed in order
        assert python == [reqs[1].head, reqs[3].head]
        assert c_done[0] == 3
        assert [req.written()[-1] for req in reqs] == [S_OK, S_OK, S_OK, S_IOERR, S_OK]
        assert reqs[4].written()[:512] == image_bytes()[1024:1536]
        assert r.dev.stats["reads"] == 3 and r.dev.stats["ioerr"] == 1
        r.close()


def test_a_bad_chain_after_good_ones(image):
    """The C engine completes what precedes a broken chain; Python reports the broken one."""
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c")
        good = r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        r.vq.write_desc(5, 0x150000, 16, 0)                  # in the hole between regions
        r.vq.publish_raw(5)
        r.drv.notify()
        assert r.vq.used_idx() == 1 and good.written()[-1] == S_OK
        assert r.drv.status() & NEEDS_RESET
        assert "not in guest RAM" in r.dev.last_error
        r.close()


# Chains the C engine must leave to Python (which refuses them), each with a FLUSH header that the
# C engine would otherwise take whatever the buffers: (what, features, write(vq, mem), words of
# the error). Buffers at 0x40000.. in RAM; 0x150000 is in the hole between regions.
def _nested_indirect(vq, mem):
    inner, outer = 0x43000, 0x44000
    vq.write_desc(0, 0x40000, 16, NEXT, 1, table=inner)
    vq.write_desc(1, 0x41000, 512, WRITE | NEXT, 2, table=inner)
    vq.write_desc(2, 0x42000, 1, WRITE, 0, table=inner)
    vq.write_desc(0, inner, 48, INDIRECT, 0, table=outer)
    vq.write_desc(0, outer, 16, INDIRECT)
    return 0


def _readable_after_writable(vq, mem):
    vq.write_desc(0, 0x40000, 16, NEXT, 1)
    vq.write_desc(1, 0x42000, 1, WRITE | NEXT, 2)
    vq.write_desc(2, 0x41000, 512, NEXT, 3)
    vq.write_desc(3, 0x43000, 1, WRITE, 0)
    return 0


def _empty_loop_in_indirect(vq, mem):
    vq.write_desc(0, 0x40000, 16, NEXT, 1, table=0x43000)
    vq.write_desc(1, 0x41000, 0, WRITE | NEXT, 1, table=0x43000)    # 1 -> 1 -> ...
    vq.write_desc(0, 0x43000, 32, INDIRECT)
    return 0


def _empty_loop(vq, mem):
    vq.write_desc(0, 0x40000, 16, NEXT, 1)
    vq.write_desc(1, 0x41000, 0, WRITE | NEXT, 1)
    return 0


def _plain(*descs):
    def write(vq, mem):
        for i, d in enumerate(descs):
            vq.write_desc(i, *d)
        return 0
    return write


def _head_out_of_range(vq, mem):
    _plain((0x40000, 16, NEXT, 1), (0x42000, 1, WRITE))(vq, mem)
    return vq.size


HOSTILE = [
    ("nested indirect", F_INDIRECT_DESC, _nested_indirect, "inside an indirect table"),
    ("readable after writable", 0, _readable_after_writable, "after a device-writable"),
    ("empty loop in an indirect table", F_INDIRECT_DESC, _empty_loop_in_indirect, "a loop"),
    ("empty loop", 0, _empty_loop, "a loop"),
    ("next out of range", 0, _plain((0x40000, 16, NEXT, 300)), "outside the descriptor table"),
    ("head out of range", 0, _head_out_of_range, "not below the queue size"),
    ("buffer in the hole", 0, _plain((0x40000, 16, NEXT, 1), (0x150000, 512, WRITE | NEXT, 2),
                                     (0x42000, 1, WRITE)), "not in guest RAM"),
    ("buffer past the end", 0, _plain((0x40000, 16, NEXT, 1), (HIGH + 0x100000 - 8, 16, WRITE)),
     "not in guest RAM"),
    ("indirect not negotiated", 0, _plain((0x43000, 48, INDIRECT)), "not negotiated"),
    ("indirect with next", F_INDIRECT_DESC, _plain((0x43000, 48, INDIRECT | NEXT, 1)),
     "both INDIRECT and NEXT"),
    ("indirect length", F_INDIRECT_DESC, _plain((0x43000, 40, INDIRECT)), "multiple of 16"),
]


@pytest.mark.parametrize("what, features, write, words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_chains_are_left_to_python(image, monkeypatch, what, features, write, words):
    c_done = count_c_requests(monkeypatch)
    errors = {}
    for engine in ("c", "python"):
        with GuestMemory(LAYOUT) as mem:
            r = Rig(mem, image, engine, want=F_VERSION_1 | features)
            r.vq.free = list(range(100, 110))       # the hostile chain writes descriptors 0..3
            good = r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
            # a FLUSH, which the C engine would take with any buffers: it must refuse the chain
            mem.write(0x40000, HDR.pack(T_FLUSH, 0, 0))
            r.vq.publish_raw(write(r.vq, mem))
            r.drv.notify()
            assert good.written()[-1] == S_OK and r.vq.used_idx() == 1
            assert r.drv.status() & NEEDS_RESET
            errors[engine] = r.dev.last_error
            r.close()
    assert c_done[0] == 1                           # the good request only
    assert errors["c"] == errors["python"] and words in errors["c"]


def test_a_chain_of_2_to_the_32_bytes_is_left_to_python(image):
    """Two 4 GiB - 1 buffers (RAM reserved, never touched): Python refuses the total."""
    with GuestMemory([(0, 5 << 30)]) as mem:
        r = Rig(mem, image, "c")
        vq = r.vq
        mem.write(0x40000, HDR.pack(T_FLUSH, 0, 0))
        vq.write_desc(0, 0x40000, 16, NEXT, 1)
        vq.write_desc(1, 0x100000, 0xFFFFFFFF, WRITE | NEXT, 2)
        vq.write_desc(2, 0x100000, 0xFFFFFFFF, WRITE, 0)
        vq.publish_raw(0, [0, 1, 2])
        r.drv.notify()
        assert r.drv.status() & NEEDS_RESET and "2^32" in r.dev.last_error
        assert r.dev.stats["flushes"] == 0
        r.close()


def test_unmapped_guest_memory_is_contained(image):
    mem = GuestMemory(LAYOUT)
    r = Rig(mem, image, "c")
    r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
    mem.close()                                           # the C code must not touch it now
    assert r.dev.notify(0) is False
    assert r.dev.errors["handler"] == 1 and r.dev.status & NEEDS_RESET   # no crash
    r.close()


def test_polling_catches_a_request_made_after_the_interrupt(image):
    """The I/O thread's notify (poll=True) watches the ring after signalling the completions: a
    request the driver makes then is served in the same call, without a notify."""
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c", poll_us=1000)
        first = r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        later = []

        def interrupt(bits):   # the driver answers the interrupt with a new request
            if not later:
                later.append(r.vq.submit(out=[HDR.pack(T_IN, 0, 1)], in_=[512, 1]))
        r.dev.interrupt = interrupt
        assert r.dev.notify(0, poll=True) is False       # both served; then 1 ms of nothing
        assert first.written()[-1] == S_OK
        assert later[0].written() == image_bytes()[512:1024] + b"\0"
        assert r.vq.used_idx() == 2
        third = r.vq.submit(out=[HDR.pack(T_IN, 0, 2)], in_=[512, 1])
        r.dev.interrupt = lambda bits: r.vq.submit(out=[HDR.pack(T_IN, 0, 3)], in_=[512, 1])
        assert r.dev.notify(0) is False                  # a vCPU thread's notify never polls
        assert third.written()[-1] == S_OK and r.vq.used_idx() == 3   # the 4th is waiting
        r.close()


def test_polling_gives_the_io_thread_back_after_poll_rounds(image):
    """A driver that always has the next request ready keeps notify() serving for at most
    POLL_ROUNDS polls; then it returns True (the I/O thread calls again after its other fds)."""
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c", poll_us=1000)
        posted = [r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])]

        def interrupt(bits):
            r.vq.get_used()                              # take completions, post again
            posted.append(r.vq.submit(out=[HDR.pack(T_IN, 0, len(posted) % 4)], in_=[512, 1]))
        r.dev.interrupt = interrupt
        assert r.dev.notify(0, poll=True) is True
        assert r.vq.used_idx() == POLL_ROUNDS and len(posted) == POLL_ROUNDS + 1
        r.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_notifications_are_off_while_polling_and_back_on_after(image, event_idx, monkeypatch):
    """While the I/O thread polls, the driver is told it need not notify (used.flags
    NO_NOTIFY, or with EVENT_IDX an avail_event it has passed); before the thread sleeps they
    are on again, and a request posted in between is not lost."""
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c", want=F_VERSION_1 | (F_EVENT_IDX if event_idx else 0),
                poll_us=200)
        vq, seen = r.vq, []

        def wants_notify():
            if event_idx:   # Linux's vring_need_event(avail_event, new, old), one more
                new, old = (vq.avail_idx + 1) & 0xFFFF, vq.avail_idx
                return ((new - vq.avail_event() - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            return not mem.read_u16(vq.used) & 1

        def interrupt(bits):   # what the driver would be told while the device polls
            seen.append(wants_notify())
        r.dev.interrupt = interrupt
        real_poll = BlkFastPath.poll

        def poll(self, *a):    # ... and during the poll itself
            seen.append(wants_notify())
            return real_poll(self, *a)
        monkeypatch.setattr(BlkFastPath, "poll", poll)
        vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        assert r.dev.notify(0, poll=True) is False
        assert seen == [True, False]     # on at the interrupt, off during the poll
        assert wants_notify()            # on again: the thread went to sleep
        r.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_a_request_posted_as_polling_ends_is_still_served(image, monkeypatch, event_idx):
    """The request comes after the poll gave up but before notifications were on again: the
    driver did not notify, so the device's last look (enable_notify) must find it."""
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c", want=F_VERSION_1 | (F_EVENT_IDX if event_idx else 0),
                poll_us=50)
        real_poll = BlkFastPath.poll
        late = []

        def poll(self, memory, queue):
            got = real_poll(self, memory, queue)
            if not late:                                  # gave up; the guest posts now
                late.append(r.vq.submit(out=[HDR.pack(T_IN, 0, 1)], in_=[512, 1]))
            return got
        monkeypatch.setattr(BlkFastPath, "poll", poll)
        r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        assert r.dev.notify(0, poll=True) is False
        assert late[0].written()[-1] == S_OK and r.vq.used_idx() == 2
        r.close()


def test_poll_window_shrinks_when_idle_and_grows_back(image):
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c", poll_us=1000)
        fast, q = r.dev.fast, r.dev.queues[0]
        assert fast.poll_ns == 1_000_000
        windows = []
        while fast.poll_ns:
            assert fast.poll(mem, q) is False            # nothing posted: gives up
            windows.append(fast.poll_ns)
        assert windows == [500_000, 250_000, 125_000, 62_500, 31_250, 15_625, 7_812, 3_906, 0]
        assert fast.poll(mem, q) is False                # off: returns at once
        r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        fast._gave_up_at = time.monotonic_ns()           # gave up just now ...
        r.dev.notify(0)                                  # ... and a request came: back to max
        assert fast.poll_ns == 1_000_000
        fast.poll_ns, fast._gave_up_at = 0, time.monotonic_ns() - 2_000_000
        r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        r.dev.notify(0)                                  # 2 ms after giving up: stays off
        assert fast.poll_ns == 0
        assert fast.poll(mem, q) is False                # off, but the sleep is timed ...
        r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        r.dev.notify(0)                                  # ... so a quick request turns it on
        assert fast.poll_ns == 1_000_000
        r.vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        assert fast.poll(mem, q) is True                 # a waiting request: at once
        r.dev.notify(0)
        # avail.idx moved but brought no request (a guest playing with it): no reward
        mem.write_u16(r.vq.avail + 2, (r.vq.avail_idx + 1) & 0xFFFF)
        assert fast.poll(mem, q) is True
        mem.write_u16(r.vq.avail + 2, r.vq.avail_idx)
        r.dev.notify(0)
        assert fast.poll_ns == 500_000
        r.close()


def test_engine_choice(image, monkeypatch):
    with GuestMemory(LAYOUT) as mem:
        monkeypatch.delenv("KVMPY_BLK_ENGINE", raising=False)
        d = VirtioBlk(mem, str(image))
        assert d.engine == "c" and d.fast is not None
        d.close()
        monkeypatch.setenv("KVMPY_BLK_ENGINE", "python")
        d = VirtioBlk(mem, str(image))
        assert d.engine == "python" and d.fast is None
        d.close()
        monkeypatch.setenv("KVMPY_BLK_ENGINE", "rust")
        with pytest.raises(KvmpyError, match="engine 'rust' is unknown") as e:
            VirtioBlk(mem, str(image))
        assert "\n" not in str(e.value)


# -- the differential property ------------------------------------------------------------------

TYPES = st.sampled_from([T_IN] * 6 + [T_OUT] * 4 + [T_FLUSH] * 2 +
                        [T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 2, 99])
SECTOR = st.one_of(st.integers(0, SECTORS - 5), st.integers(0, SECTORS - 5),
                   st.integers(0, SECTORS - 5),
                   st.sampled_from([SECTORS - 1, SECTORS, (1 << 64) - 1, 1 << 63]))
DATA_LEN = st.one_of(st.sampled_from([512, 1024, 2048]), st.sampled_from([512, 1024, 2048]),
                     st.sampled_from([0, 512, 1024, 2048]), st.integers(0, 1100))
REQUEST = st.fixed_dictionaries({
    "type": TYPES, "sector": SECTOR, "data": DATA_LEN,
    "pieces": st.integers(1, 3),              # data split into this many descriptors
    "split_header": st.sampled_from([False] * 5 + [True]),   # header in two descriptors
    "status": st.sampled_from(["own"] * 5 + ["in_data", "none", "readonly"]),
    "indirect": st.booleans(),
})
FIELDS = ("addr", "len", "flags", "next")
MUTATION = st.tuples(st.sampled_from(["desc", "indirect", "indirect", "ring", "idx",
                                      "used_event", "header"]),
                     st.integers(0, 15), st.sampled_from(FIELDS),
                     st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF),
                               st.sampled_from([0x150000, HIGH + 0x100000 - 8, HIGH + 0x80,
                                                1 << 63, 0xFFFFFFFF, 16 * 65536, INDIRECT,
                                                INDIRECT | NEXT, WRITE | NEXT])))


def split(data: bytes, pieces: int) -> list[bytes]:
    if not data or pieces == 1:
        return [data] if data else []
    step = -(-len(data) // pieces)
    return [data[i:i + step] for i in range(0, len(data), step)]


def scenario(mem, path, engine, spec) -> dict:
    """Play ``spec`` against a fresh device; everything the two engines must agree on."""
    want = F_VERSION_1 | (F_EVENT_IDX if spec["event_idx"] else 0) | \
        (F_INDIRECT_DESC if spec["indirect"] else 0) | (F_FLUSH if spec["flush"] else 0)
    r = Rig(mem, path, engine, want=want, ro=spec["ro"], size=spec["qsize"])
    vq = r.vq
    q = r.dev.queues[0]
    # both sides start at the same free-running index, near the 16-bit wrap or not
    start = spec["start"]
    q.last_avail = q._avail_seen = q.used_idx = vq.avail_idx = vq.last_used = start
    mem.write_u16(vq.avail + 2, start)
    mem.write_u16(vq.used + 2, start)
    signals = []
    r.dev.interrupt = signals.append
    notified = []
    for rnd, batch in enumerate(spec["rounds"]):
        last = rnd == len(spec["rounds"]) - 1
        heads = []
        for req in batch:
            body = image_bytes(req["data"])[::-1]
            if req["type"] in (T_DISCARD, T_WRITE_ZEROES):
                body = RANGE.pack(req["sector"] % 80, req["data"] % 5, req["data"] % 3)
            hdr = HDR.pack(req["type"], 0, req["sector"])
            out = [hdr[:8], hdr[8:]] if req["split_header"] else [hdr]
            ins = []
            if req["type"] in (T_IN, T_GET_ID):
                ins = [len(p) for p in split(bytes(req["data"]), req["pieces"])]
            else:
                out += split(body, req["pieces"])
            if req["status"] == "own":
                ins.append(1)
            elif req["status"] == "in_data":
                ins = (ins[:-1] + [ins[-1] + 1]) if ins else [1]
            elif req["status"] == "readonly":
                out.append(b"\xff")
            indirect = req["indirect"] and spec["indirect"]
            need = 1 if indirect else len(out) + len(ins)
            if need > len(vq.free) or not (out or ins):
                continue
            heads.append(vq.submit(out=out, in_=ins, indirect=indirect).head)
        if last:
            for target, i, field, value in spec["mutations"]:
                if target == "desc":
                    at = vq.desc + 16 * (i % vq.size)
                    entry = list(mem.read_struct(at, DESC))
                    k = FIELDS.index(field)
                    entry[k] = value & ((1 << 64) - 1, 0xFFFFFFFF, 0xFFFF, 0xFFFF)[k]
                    mem.write_struct(at, DESC, *entry)
                elif target == "indirect" and heads:   # an entry of a request's table
                    head = heads[i % len(heads)]
                    addr, length, flags, _ = mem.read_struct(vq.desc + 16 * head, DESC)
                    if flags & INDIRECT and length >= 16 and mem.contains(addr, length):
                        at = addr + 16 * (value % (length // 16))
                        entry = list(mem.read_struct(at, DESC))
                        k = FIELDS.index(field)
                        entry[k] = value & ((1 << 64) - 1, 0xFFFFFFFF, 0xFFFF, 0xFFFF)[k]
                        mem.write_struct(at, DESC, *entry)
                elif target == "ring":
                    mem.write_u16(vq.avail + 4 + 2 * (i % vq.size), value & 0xFFFF)
                elif target == "idx":
                    mem.write_u16(vq.avail + 2, value & 0xFFFF)
                elif target == "used_event":
                    vq.set_used_event(value & 0xFFFF)
                elif heads:   # a request header rewritten: another type or sector
                    head = heads[i % len(heads)]
                    addr, length, flags, _ = mem.read_struct(vq.desc + 16 * head, DESC)
                    if not flags & INDIRECT and length >= 16 and mem.contains(addr, 16):
                        mem.write_u32(addr, value & 0xFF) if field in ("addr", "len") else \
                            mem.write_struct(addr + 8, struct.Struct("<Q"), value)
        notified.append(r.dev.notify(0))
        notified.append(r.dev.notify(0))
        if not last:
            vq.get_used()
    state = {
        "notify": notified,
        "signals": signals,
        "ring state": (q._avail_seen, q._signalled_used, q._signalled_valid),
        "status": r.dev.status,
        "errors": dict(r.dev.errors),
        "last_error": r.dev.last_error,
        "stats": dict(r.dev.stats),
        "queue": (q.last_avail, q.used_idx, q.in_flight, q.ready),
        "memory": [bytes(reg.mapping) for reg in mem.regions],
    }
    r.close()
    state["image"] = path.read_bytes()
    return state


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=st.fixed_dictionaries({
    "event_idx": st.booleans(), "indirect": st.booleans(), "flush": st.booleans(),
    "ro": st.sampled_from([False, False, False, True]), "qsize": st.sampled_from([4, 16, 64]),
    "rounds": st.lists(st.lists(REQUEST, min_size=1, max_size=12), min_size=1, max_size=3),
    "mutations": st.one_of(st.just([]), st.lists(MUTATION, max_size=3)),
    "start": st.sampled_from([0, 0, 65530, 65535]),
}))
def test_both_engines_leave_the_same_bytes(tmp_path_factory, spec):
    results = {}
    c_done = [0]
    real = BlkFastPath.run
    BlkFastPath.run = counting_run(c_done)    # not monkeypatch: one per example, not per test
    try:
        for engine in ("c", "python"):
            path = tmp_path_factory.mktemp(engine) / "disk.img"
            path.write_bytes(image_bytes())
            with GuestMemory(LAYOUT) as mem:
                results[engine] = scenario(mem, path, engine, spec)
    finally:
        BlkFastPath.run = real
    c, py = results["c"], results["python"]
    for key in py:
        assert c[key] == py[key], key
    # what the examples covered (--hypothesis-show-statistics)
    event(f"C engine completed {'0' if not c_done[0] else '1-3' if c_done[0] < 4 else '4+'}")
    event("device needs reset" if py["status"] & NEEDS_RESET else "device fine")


@pytest.mark.parametrize("event_idx", [False, True])
def test_notifications_come_back_when_the_window_shrinks_to_nothing(image, event_idx,
                                                                     monkeypatch):
    """A poll sees avail.idx move (and move back: only a driver breaking 2.7.13.3.1 does
    that), so notifications stay off; run() finds nothing and shrinks the window to 0. The
    thread must not go to sleep with them still off (found by a review helper)."""
    with GuestMemory(LAYOUT) as mem:
        r = Rig(mem, image, "c", want=F_VERSION_1 | (F_EVENT_IDX if event_idx else 0),
                poll_us=3)                                # 3000 ns: one shrink turns it off
        vq, real_poll, calls = r.vq, BlkFastPath.poll, []

        def poll(self, memory, queue):
            calls.append(1)
            if len(calls) > 1:
                return real_poll(self, memory, queue)
            idx = mem.read_u16(vq.avail + 2)
            mem.write_u16(vq.avail + 2, (idx + 1) & 0xFFFF)
            got = real_poll(self, memory, queue)
            mem.write_u16(vq.avail + 2, idx)
            return got
        monkeypatch.setattr(BlkFastPath, "poll", poll)
        vq.submit(out=[HDR.pack(T_IN, 0, 0)], in_=[512, 1])
        assert r.dev.notify(0, poll=True) is False
        assert r.dev.fast.poll_ns == 0 and len(calls) >= 2
        if event_idx:
            assert vq.avail_event() == r.dev.queues[0].last_avail
        else:
            assert mem.read_u16(vq.used) & 1 == 0       # NO_NOTIFY cleared
        later = vq.submit(out=[HDR.pack(T_IN, 0, 1)], in_=[512, 1])
        r.dev.notify(0, poll=True)                         # the driver's notify
        assert later.written()[-1] == S_OK
        r.close()
