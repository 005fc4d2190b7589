"""pvpanic-pci: the guest kernel says "I panicked" and the VM ends with its own status.

QEMU's pvpanic device (qemu docs/specs/pvpanic.rst), in its PCI form as QEMU's ``pvpanic-pci``
and Cloud Hypervisor's ``--pvpanic``: vendor 0x1b36 (Red Hat), device 0x0011, class 08/80
("other system peripheral"), one memory BAR whose byte 0 is the only register:

- a read returns the events the device supports: bit 0 PVPANIC_PANICKED, bit 1
  PVPANIC_CRASH_LOADED (include/uapi/misc/pvpanic.h); Linux's pvpanic-pci driver keeps the bits
  it knows and only ever writes those;
- a write of bit 0 means the guest panicked and wants the host to act: the VM ends with
  :data:`kvmpy.outcome.ExitStatus.GUEST_PANIC`, as QEMU's ``-action panic=exit-failure`` does;
- a write of bit 1 (and not bit 0) means a kdump kernel is taking over: it is reported on stderr
  and the guest goes on, as QEMU's guest-crashloaded event;
- other bits are ignored (PVPANIC_SHUTDOWN, bit 2 of newer kernels, is not offered).

Why: without it a panicking Linux guest under ``panic=-1`` reboots through the i8042, which is
kvmpy's status 0, the same as a clean ``reboot``; a test rig could not tell them apart. Debian's
kernel ships the driver as the ``pvpanic-pci`` module, which kvmpy's default guest loads.

The device does not know where its BAR is (the builder or the guest places it) and does not
look at what the guest does before or after the write.
"""
from __future__ import annotations

import sys

from kvmpy.devices.pci import MmioBarFunction
from kvmpy.outcome import ExitStatus, Outcome, StopReason, VmStop

VENDOR_ID = 0x1B36              # PCI_VENDOR_ID_REDHAT
DEVICE_ID = 0x0011              # PCI_DEVICE_ID_REDHAT_PVPANIC (qemu include/hw/pci/pci.h)
CLASS_SYSTEM, SUBCLASS_OTHER = 0x08, 0x80   # PCI_CLASS_SYSTEM_OTHER (0x0880), as QEMU
BAR_INDEX = 0
BAR_SIZE = 16                   # the register needs 1 byte; 16 is the smallest memory BAR
PANICKED = 1 << 0               # PVPANIC_PANICKED (include/uapi/misc/pvpanic.h)
CRASH_LOADED = 1 << 1           # PVPANIC_CRASH_LOADED
SUPPORTED = PANICKED | CRASH_LOADED


class PvPanic(MmioBarFunction):
    name = "pvpanic"

    def __init__(self, mmio=None):
        super().__init__(VENDOR_ID, DEVICE_ID, CLASS_SYSTEM, SUBCLASS_OTHER, revision=1)
        self.init_bar(BAR_INDEX, BAR_SIZE, mem64=False, mmio=mmio)
        self.crash_loaded = 0           # CRASH_LOADED events seen

    def bar_read(self, offset: int, size: int) -> int:
        # Byte 0 holds the supported events; the rest of the BAR reads as zeroes.
        return SUPPORTED if offset == 0 else 0

    def bar_write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            self.ignored += 1
            return
        events = value & 0xFF
        if events & PANICKED:
            raise VmStop(Outcome(StopReason.GUEST_PANIC, ExitStatus.GUEST_PANIC,
                                 "the guest kernel panicked (pvpanic)"))
        if events & CRASH_LOADED:
            self.crash_loaded += 1
            print("kvmpy: the guest kernel panicked and a crash kernel took over (pvpanic)",
                  file=sys.stderr)
        else:
            self.ignored += 1

    def bar_register_name(self, offset: int) -> str | None:
        return "EVENTS" if offset == 0 else None
