"""Lesson 5: an MMIO device in Python.

    python examples/05-mmio-device/counter.py

An MMIO device is a BusDevice like a port-I/O one (lesson 2); it is placed on the MMIO bus at a
guest-physical address that no RAM backs, and it sees offsets into its window.
"""
import os
import sys

from kvmpy.builder import FlatConfig, build_flat, stdout_sink
from kvmpy.vcpu.modes import Mode
from kvmpy.vmexit.bus import BusDevice


class Counter(BusDevice):
    name = "counter"
    window = 0x1000                 # one page of registers
    REGS = {0x0: "STEP", 0x4: "TICK", 0x8: "COUNT"}

    def __init__(self):
        self.step = 1
        self.count = 0

    def write(self, offset, size, value):
        print(f"  counter: write {self.REGS.get(offset, hex(offset))} = {value}", file=sys.stderr)
        if offset == 0x0:
            self.step = value
        elif offset == 0x4:
            self.count += self.step

    def read(self, offset, size):
        value = self.count if offset == 0x8 else 0
        print(f"  counter: read {self.REGS.get(offset, hex(offset))} -> {value}", file=sys.stderr)
        return value

    def register_name(self, offset, is_write):
        return self.REGS.get(offset)


def main() -> int:
    guest = os.path.join(os.path.dirname(os.path.abspath(__file__)), "counter.S")
    with build_flat(FlatConfig(guest, Mode.LONG, console_sink=stdout_sink())) as vm:
        vm.add_mmio_device(Counter(), 0xD010_0000)
        vm.start(vm.setup)
        outcome = vm.wait(timeout=20)
    print(f"guest ended: {outcome.detail}; status {outcome.status}", file=sys.stderr)
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
