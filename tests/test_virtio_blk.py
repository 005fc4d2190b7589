"""virtio-blk against a real temporary image file, driven through virtio-mmio registers by
tests/virtio_driver.py (no /dev/kvm). Covers shared/hostile-inputs.md items 14, 16, 17, 27, 28.

Every test runs twice, once per engine (``KVMPY_BLK_ENGINE``): "c" (IN/OUT/FLUSH in
kvmpy/virtio/fastblk.c, the rest deferred to Python) and "python". Host I/O faults are injected
with monkeypatch into the Python engine and with BlkFastPath.inject into the C one.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvmpy.errors import KvmpyError
from kvmpy.memory import GuestMemory
from kvmpy.virtio import blk as blk_mod
from kvmpy.virtio.blk import VirtioBlk
from kvmpy.virtio.fastblk import BlkFastPath
from kvmpy.virtio.mmio import VirtioMmio
from kvmpy.vmexit.bus import MmioBus
from virtio_driver import (F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, NEEDS_RESET, WRITE,
                           MmioDriver, Regs)

BASE = 0xD0000000
SECTORS = 128                         # a 64 KiB image
HDR = struct.Struct("<IIQ")           # 5.2.6 struct virtio_blk_req header
RANGE = struct.Struct("<QII")         # struct virtio_blk_discard_write_zeroes
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_GET_LIFETIME, T_DISCARD, T_WRITE_ZEROES, T_SECURE_ERASE = \
    0, 1, 4, 8, 10, 11, 13, 14
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_SEG_MAX, F_RO, F_FLUSH, F_DISCARD, F_WRITE_ZEROES = 1 << 2, 1 << 5, 1 << 9, 1 << 13, 1 << 14
TESTS = Path(__file__).parent


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed + i // 512) & 0xFF for i in range(n))


@pytest.fixture(autouse=True, params=["c", "python"])
def engine(request, monkeypatch) -> str:
    """The engine of every VirtioBlk the test makes (also in child processes)."""
    monkeypatch.setenv("KVMPY_BLK_ENGINE", request.param)
    return request.param


@pytest.fixture
def image(tmp_path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(SECTORS * 512))
    return p


@pytest.fixture
def mem():
    with GuestMemory([(0, 4 << 20)]) as m:
        yield m


class Disk:
    """A VirtioBlk behind VirtioMmio on an MmioBus, and a driver for it."""

    def __init__(self, mem, path, want=None, **kw):
        self.dev = VirtioBlk(mem, str(path), **kw)
        self.transport = VirtioMmio(self.dev)
        bus = MmioBus()
        bus.insert(self.transport, BASE)
        self.drv = MmioDriver(mem, Regs(bus, BASE), area=(0x10000, 4 << 20))
        self.drv.init(want)
        self.vq = self.drv.queues[0]

    def run(self, req):
        self.drv.notify()
        (got, n), = self.vq.get_used()
        assert got is req
        return n

    def request(self, rtype, sector=0, out=b"", in_len=0, indirect=False):
        """One well-framed request: header, data, status. Returns (status, used len, data)."""
        outs = [HDR.pack(rtype, 0, sector)] + ([out] if out else [])
        ins = ([in_len] if in_len else []) + [1]
        req = self.vq.submit(out=outs, in_=ins, indirect=indirect)
        n = self.run(req)
        data = req.written()
        return data[-1], n, data[:-1]

    def close(self):
        self.transport.close()


@pytest.fixture
def disk(mem, image):
    d = Disk(mem, image)
    yield d
    d.close()


@pytest.fixture
def no_io(monkeypatch):
    """Fail the test if the device does any file I/O: in Python, no I/O call; in C, no request
    completed (the C engine does I/O only for requests it completes)."""
    def forbidden(*a, **k):
        raise AssertionError("I/O was done")
    for name in ("preadv", "pwritev", "pwrite", "fdatasync"):
        monkeypatch.setattr(blk_mod.os, name, forbidden)
    monkeypatch.setattr(blk_mod, "fallocate", forbidden)
    real_run = BlkFastPath.run

    def run(self, *a, **k):
        done, why = real_run(self, *a, **k)
        assert done == 0, "the C engine completed a request"
        return done, why
    monkeypatch.setattr(BlkFastPath, "run", run)


def fail_io(disk, monkeypatch, engine, err=errno.EIO, calls=("preadv",)):
    """Make the device's host I/O fail with ``err``."""
    if engine == "c":
        disk.dev.fast.inject(errno_=err)
        return

    def fail(*a):
        raise OSError(err, os.strerror(err))
    for name in calls:
        monkeypatch.setattr(blk_mod.os, name, fail)


def sync_log(disk, monkeypatch, engine):
    """A callable giving, for each fdatasync the device made so far, the used.idx the driver
    could see at that moment (the C engine records them in test fields)."""
    if engine == "c":
        b = disk.dev.fast._blk
        return lambda: list(b.test_used_at_sync)[:b.test_syncs]
    seen = []
    real = os.fdatasync

    def spy(fd):
        seen.append(disk.vq.used_idx())
        real(fd)
    monkeypatch.setattr(blk_mod.os, "fdatasync", spy)
    return lambda: seen


# -- configuration ------------------------------------------------------------------------------

def test_config_and_features(disk):
    drv = disk.drv
    assert drv.read(0x008) == 2                                   # 5.2.1: block device
    assert drv.config(0, 4) | drv.config(4, 4) << 32 == SECTORS    # capacity, as Linux reads it
    assert drv.config(0, 8) == SECTORS
    assert drv.config(12, 4) == 254                                # seg_max: queue size - 2
    f = drv.features
    assert f & F_FLUSH and f & F_SEG_MAX and f & F_DISCARD and f & F_WRITE_ZEROES
    assert not f & F_RO
    assert f & F_VERSION_1 and f & F_INDIRECT_DESC and f & F_EVENT_IDX
    assert drv.config(36, 4) == 1 << 22 and drv.config(40, 4) == 16   # discard limits
    assert drv.config(0x1000 - 0x100 - 4, 4) == 0xFFFFFFFF        # past the config: all-ones
    disk.drv.write(0x100, 0x12345678)                              # config is read-only
    assert drv.config(0, 8) == SECTORS


# -- reads and writes ---------------------------------------------------------------------------

@pytest.mark.parametrize("want", [None, F_VERSION_1 | F_FLUSH, F_VERSION_1 | F_EVENT_IDX])
@pytest.mark.parametrize("indirect", [False, True])
def test_read_write_read(mem, image, want, indirect):
    d = Disk(mem, image, want=want)
    indirect = indirect and bool(d.drv.features & F_INDIRECT_DESC)
    status, n, data = d.request(T_IN, sector=2, in_len=1024, indirect=indirect)
    assert (status, n) == (S_OK, 1025)
    assert data == image.read_bytes()[1024:2048]
    new = pattern(1536, seed=99)
    status, n, _ = d.request(T_OUT, sector=4, out=new, indirect=indirect)
    assert (status, n) == (S_OK, 1)
    assert image.read_bytes()[2048:2048 + 1536] == new
    assert d.request(T_IN, sector=4, in_len=1536, indirect=indirect)[2] == new
    d.close()


def test_scatter_gather_and_framing(disk, image):
    # data split over many descriptors, header split in two, status sharing the last data
    # descriptor: the device may not assume a framing (2.7.4)
    vq = disk.vq
    hdr = HDR.pack(T_IN, 0, 1)
    req = vq.submit(out=[hdr[:5], hdr[5:]], in_=[100, 412, 512, 1])
    assert disk.run(req) == 1025
    data = req.written()
    assert data[:1024] == image.read_bytes()[512:1536] and data[1024] == S_OK
    req = vq.submit(out=[hdr], in_=[1025])           # data and status in one buffer
    assert disk.run(req) == 1025
    assert req.written()[:1024] == image.read_bytes()[512:1536]
    new = pattern(1024, seed=5)
    req = vq.submit(out=[HDR.pack(T_OUT, 0, 3) + new[:10], new[10:700], new[700:]], in_=[1])
    disk.run(req)
    assert req.written() == bytes([S_OK])
    assert image.read_bytes()[1536:2560] == new


def test_more_segments_than_iov_max(tmp_path):
    # hostile-inputs 14: a request with more segments than one preadv takes (IOV_MAX=1024)
    count = blk_mod.IOV_MAX + 50
    img = tmp_path / "big.img"
    img.write_bytes(pattern(count * 512))
    with GuestMemory([(0, 16 << 20)]) as mem:
        d = Disk(mem, img)
        vq = d.vq
        hdr = HDR.pack(T_IN, 0, 0)
        req = vq.submit(out=[hdr], in_=[512] * count + [1], indirect=True)
        assert d.run(req) == count * 512 + 1
        assert req.written() == img.read_bytes() + bytes([S_OK])
        new = pattern(count * 512, seed=3)
        req = vq.submit(out=[HDR.pack(T_OUT, 0, 0)] + [new[i:i + 512]
                                                       for i in range(0, len(new), 512)],
                        in_=[1], indirect=True)
        d.run(req)
        assert req.written() == bytes([S_OK]) and img.read_bytes() == new
        d.close()


def test_short_transfers_are_resumed(disk, image, monkeypatch, engine):
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short(real):
        def f(fd, bufs, pos):
            first = bufs[0][:300]                  # at most 300 bytes per call
            return real(fd, [first], pos)
        return f
    if engine == "c":
        disk.dev.fast.inject(max_io=300)
    monkeypatch.setattr(blk_mod.os, "preadv", short(real_preadv))
    monkeypatch.setattr(blk_mod.os, "pwritev", short(real_pwritev))
    status, _, data = disk.request(T_IN, sector=1, in_len=2048)
    assert status == S_OK and data == image.read_bytes()[512:2560]
    new = pattern(1024, seed=7)
    assert disk.request(T_OUT, sector=8, out=new)[0] == S_OK
    assert image.read_bytes()[4096:5120] == new


def test_host_io_error_is_ioerr(disk, monkeypatch, engine):
    fail_io(disk, monkeypatch, engine, calls=("preadv", "pwritev", "fdatasync"))
    assert disk.request(T_IN, sector=0, in_len=512)[:2] == (S_IOERR, 1)
    assert disk.request(T_OUT, sector=0, out=b"\0" * 512)[:2] == (S_IOERR, 1)
    assert disk.request(T_FLUSH)[:2] == (S_IOERR, 1)
    assert disk.dev.stats["ioerr"] == 3 and disk.dev.stats["reads"] == 0
    assert not disk.drv.status() & NEEDS_RESET        # a failed request, not a broken device


# -- flush and durability (items 27, 28) --------------------------------------------------------

def test_flush_syncs_before_the_used_entry(disk, monkeypatch, engine):
    synced = sync_log(disk, monkeypatch, engine)      # used.idx the driver saw at each sync
    before = disk.vq.used_idx()
    assert disk.request(T_OUT, sector=0, out=pattern(512))[0] == S_OK
    assert synced() == []                             # FLUSH negotiated: writes are not synced
    assert disk.request(T_FLUSH)[0] == S_OK
    assert synced() == [before + 1]                   # synced while the FLUSH was not yet used
    assert disk.vq.used_idx() == before + 2


def test_without_negotiated_flush_every_write_is_stable(mem, image, monkeypatch, engine):
    # 5.2.6.2 case 1: FLUSH offered but not negotiated => writes are stable when completed
    d = Disk(mem, image, want=F_VERSION_1)
    synced = sync_log(d, monkeypatch, engine)
    before = d.vq.used_idx()
    assert d.request(T_OUT, sector=0, out=pattern(512))[0] == S_OK
    assert synced() == [before]
    d.close()


DURABILITY_CHILD = textwrap.dedent("""
    import os, struct, sys, time
    from kvmpy.memory import GuestMemory
    from kvmpy.virtio.blk import VirtioBlk
    from kvmpy.virtio.mmio import VirtioMmio
    from kvmpy.vmexit.bus import MmioBus
    from virtio_driver import MmioDriver, Regs

    path, = sys.argv[1:]
    HDR = struct.Struct("<IIQ")
    mem = GuestMemory([(0, 4 << 20)])
    bus = MmioBus()
    bus.insert(VirtioMmio(VirtioBlk(mem, path)), 0xD0000000)
    drv = MmioDriver(mem, Regs(bus, 0xD0000000))
    drv.init()
    vq = drv.queues[0]
    data = bytes(range(256)) * 16                            # 4 KiB at sector 8
    vq.submit(out=[HDR.pack(1, 0, 8), data], in_=[1])
    drv.notify()
    (req, _), = vq.get_used()
    assert req.written() == b"\\0"
    flush = vq.submit(out=[HDR.pack(4, 0, 0)], in_=[1])
    drv.notify()
    while vq.used_idx() != 2:                               # the FLUSH's used entry
        time.sleep(0.001)
    assert flush.written() == b"\\0"
    os.write(1, b"synced\\n")                               # the guest may now rely on it
    time.sleep(60)
""")


# An LD_PRELOAD shim that logs the file each fdatasync() synced, after it returned: the one way
# to see the C engine's system calls from outside (and the Python engine's, which go through the
# same libc function).
SYNC_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int r = real(fd);
    const char *log = getenv("KVMPY_SYNC_LOG");
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (log && n > 0 && r == 0) {
        path[n] = '\n';
        int l = open(log, O_WRONLY | O_APPEND | O_CREAT, 0600);
        if (l >= 0) {
            write(l, path, (size_t)n + 1);
            close(l);
        }
    }
    return r;
}
"""


def test_durability_after_sigkill(image, tmp_path):
    shim, log = tmp_path / "sync_shim.so", tmp_path / "sync.log"
    (tmp_path / "sync_shim.c").write_text(SYNC_SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim),
                    str(tmp_path / "sync_shim.c"), "-ldl"], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]),
               LD_PRELOAD=str(shim), KVMPY_SYNC_LOG=str(log))
    child = subprocess.Popen([sys.executable, "-c", DURABILITY_CHILD, str(image)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = child.stdout.readline()
        assert line == b"synced\n", child.stderr.read()
        # the FLUSH's used entry was seen: the image had been fdatasync()ed by then
        assert str(image.resolve()) in log.read_text().splitlines()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert image.read_bytes()[4096:8192] == bytes(range(256)) * 16


# -- GET_ID -------------------------------------------------------------------------------------

def test_get_id(mem, image):
    d = Disk(mem, image, serial="kvmpy-disk-0")
    status, n, data = d.request(T_GET_ID, in_len=20)
    assert (status, n, data) == (S_OK, 21, b"kvmpy-disk-0" + b"\0" * 8)
    status, n, data = d.request(T_GET_ID, in_len=19)                 # item 16: too short
    assert (status, n, data) == (S_IOERR, 1, b"\xaa" * 19)
    d.close()
    d = Disk(mem, image, serial="x" * 40)                             # 20 bytes, no NUL
    assert d.request(T_GET_ID, in_len=20)[2] == b"x" * 20
    d.close()
    d = Disk(mem, image)                                              # default: from the inode
    assert d.request(T_GET_ID, in_len=20)[2].rstrip(b"\0")
    d.close()


# -- read-only (item 17) ------------------------------------------------------------------------

def test_read_only_disk(mem, image):
    before = image.read_bytes()
    d = Disk(mem, image, ro=True)
    assert fcntl.fcntl(d.dev.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    f = d.drv.features
    assert f & F_RO and not f & (F_DISCARD | F_WRITE_ZEROES)
    assert d.request(T_IN, sector=0, in_len=512) == (S_OK, 513, before[:512])
    assert d.request(T_OUT, sector=0, out=b"\0" * 512)[0] == S_IOERR
    assert d.request(T_WRITE_ZEROES, out=RANGE.pack(0, 1, 0))[0] == S_IOERR
    assert d.request(T_DISCARD, out=RANGE.pack(0, 1, 0))[0] == S_IOERR
    assert d.request(T_FLUSH)[0] == S_OK
    d.close()
    assert image.read_bytes() == before


# -- malformed requests (item 16): IOERR/UNSUPP, and no I/O at all --------------------------------

def test_header_in_a_write_only_descriptor(disk, no_io):
    req = disk.vq.submit(in_=[16, 512, 1])
    assert disk.run(req) == 1
    assert req.written() == b"\xaa" * (16 + 512) + bytes([S_IOERR])


def test_short_header(disk, no_io):
    req = disk.vq.submit(out=[HDR.pack(T_IN, 0, 0)[:8]], in_=[512, 1])
    assert disk.run(req) == 1
    assert req.written()[-1] == S_IOERR


@pytest.mark.parametrize("rtype", [T_IN, T_OUT, T_FLUSH, T_GET_ID])
def test_missing_status(disk, image, rtype, no_io):
    # no device-writable byte anywhere: nowhere to put a status, so no I/O and len 0
    req = disk.vq.submit(out=[HDR.pack(rtype, 0, 0), b"\0" * 512])
    assert disk.run(req) == 0


def test_read_only_status(disk, image, no_io):
    before = image.read_bytes()
    req = disk.vq.submit(out=[HDR.pack(T_OUT, 0, 0), b"\0" * 512, b"\xff"])
    assert disk.run(req) == 0
    assert image.read_bytes() == before


def test_zero_length_status(disk, no_io):
    vq = disk.vq
    hdr = disk.drv.alloc.alloc(16)
    disk.drv.memory.write(hdr, HDR.pack(T_FLUSH, 0, 0))
    status = disk.drv.alloc.alloc(16)
    vq.write_desc(0, hdr, 16, 1, 1)
    vq.write_desc(1, status, 0, WRITE)
    req = vq.publish_raw(0, [0, 1])
    assert disk.run(req) == 0


@pytest.mark.parametrize("rtype, sector, out, in_len", [
    (T_IN, 0, b"", 100),                      # not a multiple of 512
    (T_IN, 0, b"", 513),
    (T_OUT, 0, b"\0" * 100, 0),
    (T_IN, SECTORS, b"", 512),                # starts at the capacity
    (T_IN, SECTORS - 1, b"", 1024),           # ends past it
    (T_OUT, SECTORS - 1, b"\0" * 1024, 0),
    (T_IN, (1 << 64) - 1, b"", 512),          # 64-bit sector: no wrap-around
    (T_OUT, (1 << 63), b"\0" * 512, 0),
])
def test_bad_ranges_are_ioerr(disk, no_io, rtype, sector, out, in_len):
    status, n, data = disk.request(rtype, sector, out=out, in_len=in_len)
    assert (status, n) == (S_IOERR, 1)
    assert data == b"\xaa" * in_len


@pytest.mark.parametrize("rtype", [T_GET_LIFETIME, T_SECURE_ERASE, 2, 3, 5, 99, 0xFFFFFFFF])
def test_unknown_types_are_unsupp(disk, no_io, rtype):
    assert disk.request(rtype, in_len=512)[:2] == (S_UNSUPP, 1)


@pytest.mark.parametrize("rtype, payload, expect", [
    (T_DISCARD, RANGE.pack(0, 1, 1), S_UNSUPP),        # UNMAP on a discard (5.2.6.2)
    (T_DISCARD, RANGE.pack(0, 1, 2), S_UNSUPP),        # unknown flag
    (T_WRITE_ZEROES, RANGE.pack(0, 1, 4), S_UNSUPP),
    (T_WRITE_ZEROES, RANGE.pack(SECTORS, 1, 0), S_IOERR),
    (T_WRITE_ZEROES, RANGE.pack((1 << 64) - 1, 2, 0), S_IOERR),
    (T_DISCARD, RANGE.pack(0, (1 << 22) + 1, 0), S_IOERR),   # above max_discard_sectors
    (T_DISCARD, RANGE.pack(0, 1, 0)[:10], S_IOERR),          # not a multiple of 16
    (T_DISCARD, b"", S_IOERR),
    (T_DISCARD, RANGE.pack(0, 1, 0) * 17, S_IOERR),          # above max_discard_seg
    (T_WRITE_ZEROES, RANGE.pack(0, 1, 0) + RANGE.pack(SECTORS, 1, 0), S_IOERR),  # 2nd bad
])
def test_bad_discard_and_write_zeroes(disk, no_io, rtype, payload, expect):
    assert disk.request(rtype, out=payload)[:2] == (expect, 1)


# -- discard and write zeroes -------------------------------------------------------------------

@pytest.mark.parametrize("fallocate_works", [True, False])
def test_write_zeroes_and_discard(disk, image, monkeypatch, fallocate_works):
    if not fallocate_works:
        def unsupported(*a):
            raise OSError(errno.EOPNOTSUPP, "not supported")
        monkeypatch.setattr(blk_mod, "fallocate", unsupported)
    size = image.stat().st_size
    assert disk.request(T_WRITE_ZEROES, out=RANGE.pack(2, 3, 0))[0] == S_OK
    assert disk.request(T_WRITE_ZEROES, out=RANGE.pack(10, 1, 1) + RANGE.pack(20, 2, 0))[0] \
        == S_OK
    assert disk.request(T_DISCARD, out=RANGE.pack(40, 8, 0))[0] == S_OK
    data = image.read_bytes()
    assert len(data) == size                                    # KEEP_SIZE
    orig = pattern(SECTORS * 512)
    for first, count in ((2, 3), (10, 1), (20, 2), (40, 8)):
        assert data[first * 512:(first + count) * 512] == bytes(count * 512)
    assert data[:1024] == orig[:1024] and data[5 * 512:10 * 512] == orig[5 * 512:10 * 512]
    status, _, back = disk.request(T_IN, sector=2, in_len=3 * 512)
    assert status == S_OK and back == bytes(3 * 512)


# -- opening the image --------------------------------------------------------------------------

def test_image_size_not_a_multiple_of_512(mem, tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(b"x" * 1000)
    with pytest.raises(KvmpyError) as e:
        VirtioBlk(mem, str(p))
    msg = str(e.value)
    assert "1000 bytes, not a multiple of 512" in msg and "\n" not in msg


@pytest.mark.parametrize("what, match", [("missing", "does not exist"),
                                         ("dir", "directory"), ("fifo", "neither")])
def test_bad_image_paths(mem, tmp_path, what, match):
    p = tmp_path / what
    if what == "dir":
        p.mkdir()
    elif what == "fifo":
        os.mkfifo(p)
    with pytest.raises(KvmpyError, match=match):
        VirtioBlk(mem, str(p), ro=what == "fifo")


def test_requests_after_close_are_ioerr(disk, image):
    disk.dev.close()
    assert disk.request(T_IN, in_len=512)[0] == S_IOERR
