"""Per-vCPU state a Linux boot expects beyond registers: boot MSRs and the LAPIC's LINT pins.

Values follow Firecracker (arch/src/x86_64/msr.rs create_boot_msr_entries, interrupts.rs
set_lint) and QEMU's x86_cpu_reset.
"""
from __future__ import annotations

import struct

from kvmpy._ffi import ffi

# MSR indices (Intel SDM vol. 4)
IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
IA32_TSC = 0x10
IA32_MISC_ENABLE = 0x1A0
IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE, MTRR_TYPE_WB = 1 << 11, 6

BOOT_MSRS = {
    IA32_SYSENTER_CS: 0, IA32_SYSENTER_ESP: 0, IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    IA32_TSC: 0,
    IA32_MISC_ENABLE: IA32_MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WB,
}

# Local APIC registers (Intel SDM vol. 3A, table 11-1) and LVT delivery modes (11.5.1)
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def set_boot_msrs(vcpu) -> None:
    # KVM stops at the first MSR it refuses; set them one by one so one refusal (e.g. MTRRs on
    # some software KVMs) does not hide the rest.
    for index, value in BOOT_MSRS.items():
        vcpu.set_msrs({index: value})


def _set_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~0x700) | (mode << 8)


def set_lint(vcpu) -> None:
    """LINT0 = ExtINT (the 8259 PIC's output), LINT1 = NMI, as a PC's BIOS leaves them."""
    lapic = vcpu.get_lapic()
    regs = ffi.buffer(lapic.regs)         # char[KVM_APIC_REG_SIZE], writable in place
    for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", regs, reg)[0]
        struct.pack_into("<I", regs, reg, _set_delivery_mode(value, mode))
    vcpu.set_lapic(lapic)
