"""Lesson 4: watch a guest switch itself from real mode to long mode, step by step.

    python examples/04-real-to-long/walk.py

The guest is kvmpy's demo (kvmpy/guests/demo.S: read it beside this lesson). It starts in
real mode at 0x7c00 and does what a boot loader does (Intel SDM vol. 3A, 10.9 and 10.8.5):
lgdt + CR0.PE + a far jump (protected mode), then CR4.PAE, CR3, EFER.LME, CR0.PG and a far jump
to a 64-bit code segment (long mode). None of that exits to the VMM: KVM runs it. What we see
are its console writes; at each one we pause the VM and read the control registers, so each
step shows up in CR0/CR4/EFER.

console.pause_on(pattern) pauses the VM inside the very exit that wrote the matching output,
before the guest runs one more instruction. (Pausing after expect() has returned would be too
late: the guest keeps running meanwhile and may already be in the next mode.)
"""
import sys

import kvmpy
from kvmpy.guests import DEMO_SOURCE

STEPS = [(rb"hello from real mode", "real mode"),
         (rb"in 32-bit protected mode", "protected mode"),
         (rb"in 64-bit long mode", "long mode")]


def main() -> int:
    vm = kvmpy.VM(image=DEMO_SOURCE, mode="real", timeout=30)   # built, not started yet
    vm.console.pause_on(STEPS[0][0])       # armed before the guest can print it
    with vm:                               # starts the guest
        for i, (pattern, name) in enumerate(STEPS):
            vm.console.expect(pattern, timeout=20)   # the VM is paused at this output now
            r = vm.registers(0)
            if i + 1 < len(STEPS):
                vm.console.pause_on(STEPS[i + 1][0])   # armed while paused: cannot be missed
            vm.resume()
            print(f"{name:>15}: CR0={r['cr0']:#010x} (PE={r['cr0'] & 1}, PG={r['cr0'] >> 31})"
                  f" CR4.PAE={(r['cr4'] >> 5) & 1} EFER={r['efer']:#x} CS={r['cs']:#x}",
                  file=sys.stderr)
        result = vm.wait()
    print(vm.console.text(), end="")
    return result.status


if __name__ == "__main__":
    sys.exit(main())
