"""The Python API: a device of the test's own on the MMIO and PIO buses, sees offsets."""
from kvmpy.builder import FlatConfig, build_flat
from kvmpy.vcpu.modes import Mode
from kvmpy.vmexit.bus import BusDevice


class Register(BusDevice):
    """A window of 32-bit registers that returns what was written, with the high bit flipped."""

    name = "reg"
    window = 0x10

    def __init__(self):
        self.regs = {}
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.regs.get(offset, 0) ^ (0x80 << (8 * (size - 1)))

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))
        self.regs[offset] = value


def test_claimed_mmio_device_sees_offsets(build_guest):
    out = []
    with build_flat(FlatConfig(build_guest("mmio", 0x100000), Mode.LONG,
                               console_sink=out.append)) as m:
        dev = m.add_mmio_device(Register(), 0xD000_1000, "REG")
        m.start(m.setup)
        outcome = m.wait(20)
    assert outcome.status == 0x21
    assert b"".join(out) == b"ffffffff\n4afe0001\n000000c2\n"
    assert dev.log == [("w", 0, 4, 0xCAFE0001), ("r", 0, 4), ("w", 4, 1, 0x42), ("r", 4, 1)]
    assert m.dispatcher.stats.unclaimed_mmio[0xD000_0000] == 2
