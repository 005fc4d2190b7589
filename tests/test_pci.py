"""PCI config mechanism #1, the host bridge, BAR sizing and capability lists."""
import pytest

from kvmpy.devices.pci import HostBridge, PciBus, PciConfigIo, PciFunction
from kvmpy.vmexit.bus import PioBus

ENABLE = 1 << 31


def cfg_read(io, dev, reg, size=4, fn=0):
    io.write(0, 4, ENABLE | (dev << 11) | (fn << 8) | (reg & 0xFC))
    return io.read(4 + (reg & 3), size)


def cfg_write(io, dev, reg, value, size=4):
    io.write(0, 4, ENABLE | (dev << 11) | (reg & 0xFC))
    io.write(4 + (reg & 3), size, value)


@pytest.fixture
def io():
    bus = PciBus()
    bus.add(HostBridge(), 0)
    return PciConfigIo(bus)


def test_host_bridge_identity(io):
    assert cfg_read(io, 0, 0) == 0x1237_8086            # device:vendor
    assert cfg_read(io, 0, 0x0A, 2) == 0x0600           # class: bridge / host bridge
    assert cfg_read(io, 0, 0x0E, 1) == 0


def test_absent_and_malformed_accesses_read_all_ones(io):
    assert cfg_read(io, 1, 0) == 0xFFFFFFFF             # no device 1
    io.write(0, 4, ENABLE | (1 << 16))                  # bus 1
    assert io.read(4, 4) == 0xFFFFFFFF
    io.write(0, 4, ENABLE | 0x1)                         # reserved bits 1:0
    assert io.read(4, 4) == 0xFFFFFFFF
    io.write(0, 4, 0)                                    # not enabled
    assert io.read(4, 4) == 0xFFFFFFFF
    io.write(0, 4, ENABLE)
    assert io.read(6, 4) == 0xFFFFFFFF                   # 4 bytes at 0xCFE cross the register
    assert io.read(6, 2) == 0x1237                       # 2 bytes there are fine
    io.write(1, 1, 0x06)                                 # byte write at 0xCF9: not the address
    assert io.read(0, 4) == ENABLE


def test_read_only_ids_and_writable_command(io):
    cfg_write(io, 0, 0, 0xDEADBEEF)
    assert cfg_read(io, 0, 0) == 0x1237_8086
    cfg_write(io, 0, 4, 0x0006, 2)
    assert cfg_read(io, 0, 4, 2) == 0x0006


def test_bar_sizing_and_move_and_capabilities():
    f = PciFunction(0x1AF4, 0x1041, 0x02, 0x00)
    moves = []
    f.add_bar(0, 0x4000, mem64=True, on_move=lambda b, old, new: moves.append((old, new)))
    f.set_bar_address(0, 0xE000_0000)
    assert moves == [(0, 0xE000_0000)]
    bus = PciBus()
    slot = bus.add(f)
    io = PciConfigIo(bus)
    cfg_write(io, slot, 0x10, 0xFFFFFFFF)                 # size the low half
    assert cfg_read(io, slot, 0x10) == (~0x3FFF & 0xFFFFFFF0) | 0x4
    cfg_write(io, slot, 0x14, 0xFFFFFFFF)
    assert cfg_read(io, slot, 0x14) == 0xFFFFFFFF
    cfg_write(io, slot, 0x10, 0xF000_0000)
    cfg_write(io, slot, 0x14, 0x1)
    assert moves[-1][1] == 0x1_F000_0000
    a = f.add_capability(0x09, b"\x10abcdefghijklm")
    b = f.add_capability(0x11, b"\x00\x00" + bytes(8))
    assert cfg_read(io, slot, 0x06, 2) & 0x10             # capability list present
    assert cfg_read(io, slot, 0x34, 1) == a == 0x40
    assert cfg_read(io, slot, a + 1, 1) == b and cfg_read(io, slot, b + 1, 1) == 0
    assert cfg_read(io, slot, b, 1) == 0x11
