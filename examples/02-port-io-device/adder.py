"""Lesson 2: write a port-I/O device in Python and give it to a guest.

    python examples/02-port-io-device/adder.py

A device subclasses BusDevice, says how many ports it decodes (``window``) and answers
``read(offset, size)`` / ``write(offset, size, value)``. The machine, not the device, picks
where it lives (here ports 0x100-0x103), so the same device could sit anywhere.
"""
import os
import sys

from kvmpy.builder import FlatConfig, build_flat, stdout_sink
from kvmpy.vcpu.modes import Mode
from kvmpy.vmexit.bus import BusDevice


class Adder(BusDevice):
    name = "adder"
    window = 4          # offsets 0 (A), 1 (B), 2 (A + B), 3 (unused)

    def __init__(self):
        self.a = self.b = 0

    def write(self, offset, size, value):
        print(f"  adder: guest wrote {value} at offset {offset}", file=sys.stderr)
        if offset == 0:
            self.a = value
        elif offset == 1:
            self.b = value

    def read(self, offset, size):
        if offset == 2:
            print(f"  adder: guest reads the sum {self.a + self.b}", file=sys.stderr)
            return self.a + self.b
        return 0xFF     # like an unassigned port

    def register_name(self, offset, is_write):
        return ("A", "B", "SUM", None)[offset]


def main() -> int:
    guest = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adder.S")
    with build_flat(FlatConfig(guest, Mode.REAL, console_sink=stdout_sink())) as vm:
        vm.add_pio_device(Adder(), 0x100)
        vm.start(vm.setup)
        outcome = vm.wait(timeout=10)
    print(f"guest ended: {outcome.detail}; status {outcome.status}", file=sys.stderr)
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
