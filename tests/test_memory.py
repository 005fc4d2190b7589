"""GuestMemory: every access is bounds-checked; nothing reads or writes outside guest RAM."""
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.builder import ram_layout
from kvmpy.errors import GuestMemoryError
from kvmpy.memory import GuestMemory

MIB = 1 << 20


@pytest.fixture
def mem():
    # two regions with a hole between them, like RAM below and above the MMIO hole
    with GuestMemory([(0, 2 * MIB), (4 * MIB, MIB)]) as m:
        yield m


def test_read_write_roundtrip(mem):
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    mem.write_u32(4 * MIB + 8, 0xDEADBEEF)
    assert mem.read_u32(4 * MIB + 8) == 0xDEADBEEF
    assert mem.read(4 * MIB + 8, 4) == bytes.fromhex("efbeadde")
    mem.write_u64(2 * MIB - 8, 2**64 - 1)
    assert mem.read_u64(2 * MIB - 8) == 2**64 - 1
    assert mem.top == 5 * MIB and mem.size == 3 * MIB


@pytest.mark.parametrize("gpa,size", [
    (-1, 1), (0, -1), (2 * MIB - 1, 2), (2 * MIB, 1), (3 * MIB, 1), (4 * MIB - 2, 4),
    (5 * MIB - 1, 2), (5 * MIB, 1), (2**64 - 1, 2), (2**64, 1), (0, 2**64 + 1), (0, 3 * MIB),
])
def test_out_of_bounds_is_refused(mem, gpa, size):
    with pytest.raises(GuestMemoryError):
        mem.check(gpa, size)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, size)
    if 0 <= size <= 16:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, bytes(size))
        with pytest.raises(GuestMemoryError):
            mem.write_u8(gpa, 1) if size == 1 else mem.write_u16(gpa, 1)
    assert not mem.contains(gpa, size)


def test_view_is_zero_copy(mem):
    v = mem.view(0x2000, 4)
    v[:] = b"abcd"
    assert mem.read(0x2000, 4) == b"abcd"
    v.release()


def test_host_address_is_checked(mem):
    assert mem.host_address(4 * MIB) == mem.regions[1].host_address
    with pytest.raises(GuestMemoryError):
        mem.host_address(3 * MIB)


@settings(max_examples=300, deadline=None)
@given(gpa=st.integers(min_value=-2**65, max_value=2**65), size=st.integers(0, 3 * MIB))
def test_any_range_is_either_inside_one_region_or_refused(gpa, size):
    with GuestMemory([(0, 2 * MIB), (4 * MIB, MIB)]) as m:
        inside = any(r.gpa <= gpa and gpa + size <= r.end and (gpa < r.end or size == 0)
                     for r in m.regions)
        assert m.contains(gpa, size) == inside
        if inside and size:
            assert len(m.read(gpa, min(size, 64))) == min(size, 64)


def test_ram_layout_splits_around_the_mmio_hole():
    assert ram_layout(256 * MIB) == [(0, 256 * MIB)]
    assert ram_layout(4 << 30) == [(0, 0xC000_0000), (4 << 30, 1 << 30)]


def test_misaligned_region_refused():
    with pytest.raises(GuestMemoryError):
        GuestMemory([(0, 1000)])


@pytest.mark.parametrize("shared", [True, False])
def test_shared_memory_is_seen_by_a_forked_process(shared):
    import os
    with GuestMemory([(0, 0x10000), (0x100000, 0x10000)], shared=shared) as m:
        m.write(0x100010, b"parent")
        pid = os.fork()
        if pid == 0:                     # the child writes where the parent will look
            try:
                ok = m.read(0x100010, 6) == b"parent"
                m.write(0x20, b"child!" if ok else b"wrong!")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert m.read(0x20, 6) == (b"child!" if shared else b"\0" * 6)


def test_close_goes_on_past_a_region_still_exported():
    mem = GuestMemory([(0, 1 << 20), (2 << 20, 1 << 20)])
    held = mem.view(0x1000, 16)               # a view the caller forgot to release
    with pytest.raises(BufferError):
        mem.close()
    assert mem.regions == [] and not mem.contains(0)   # closed as far as kvmpy is concerned
    held.release()
    mem.close()                               # idempotent
