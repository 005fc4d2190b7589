"""Buses: devices see offsets, overlaps are refused, lookups find the owner."""
import pytest

from kvmpy.vmexit.bus import BusDevice, BusOverlapError, MmioBus, PioBus


class Dev(BusDevice):
    def __init__(self, window, name="dev"):
        self.window, self.name, self.seen = window, name, []

    def write(self, offset, size, value):
        self.seen.append((offset, size, value))


def test_pio_lookup_and_offsets():
    bus = PioBus()
    d = Dev(8, "COM1")
    bus.insert(d, 0x3F8)
    for port in range(0x3F8, 0x400):
        assert bus.lookup(port).device is d
        assert port - bus.lookup(port).base == port - 0x3F8
    assert bus.lookup(0x3F7) is None and bus.lookup(0x400) is None


@pytest.mark.parametrize("base,window", [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F9, 2)])
def test_pio_overlap_refused(base, window):
    bus = PioBus()
    bus.insert(Dev(8, "COM1"), 0x3F8)
    with pytest.raises(BusOverlapError, match="overlaps COM1"):
        bus.insert(Dev(window), base)


def test_pio_outside_space_refused():
    with pytest.raises(BusOverlapError):
        PioBus().insert(Dev(2), 0xFFFF)


def test_mmio_lookup_and_overlap():
    bus = MmioBus()
    a, b = Dev(0x1000, "a"), Dev(0x200, "b")
    bus.insert(b, 0xD000_1000)
    bus.insert(a, 0xD000_0000)
    assert bus.lookup(0xD000_0FFF).device is a
    assert bus.lookup(0xD000_1000).device is b
    assert bus.lookup(0xD000_11FF).device is b
    assert bus.lookup(0xD000_1200) is None
    assert bus.lookup(0xCFFF_FFFF) is None
    with pytest.raises(BusOverlapError):
        bus.insert(Dev(0x10), 0xD000_11F0)
