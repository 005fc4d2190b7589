"""Lesson 4: watch a guest switch itself from real mode to long mode, step by step.

    python examples/04-real-to-long/walk.py

The guest is kvmpy's demo (kvmpy/guests/demo.S: read it beside this lesson). It starts in
real mode at 0x7c00 and does what a boot loader does (Intel SDM vol. 3A, 10.9 and 10.8.5):
lgdt + CR0.PE + a far jump (protected mode), then CR4.PAE, CR3, EFER.LME, CR0.PG and a far jump
to a 64-bit code segment (long mode). None of that exits to the VMM: KVM runs it. What we see
are its console writes; between them we pause the VM and read the control registers, so each
step shows up in CR0/CR4/EFER.
"""
import os
import sys

import kvmpy
from kvmpy.guests import DEMO_SOURCE

STEPS = [(rb"hello from real mode", "real mode"),
         (rb"in 32-bit protected mode", "protected mode"),
         (rb"in 64-bit long mode", "long mode")]


def main() -> int:
    with kvmpy.VM(image=DEMO_SOURCE, mode="real", timeout=30) as vm:
        for pattern, name in STEPS:
            vm.console.expect(pattern, timeout=20)
            vm.pause()                      # the vCPU stops between two instructions
            r = vm.registers(0)
            vm.resume()
            print(f"{name:>15}: CR0={r['cr0']:#010x} (PE={r['cr0'] & 1}, PG={r['cr0'] >> 31})"
                  f" CR4.PAE={(r['cr4'] >> 5) & 1} EFER={r['efer']:#x} CS={r['cs']:#x}",
                  file=sys.stderr)
        result = vm.wait()
    print(vm.console.text(), end="")
    return result.status


if __name__ == "__main__":
    sys.exit(main())
