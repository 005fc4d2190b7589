"""The CPUID a guest sees: KVM_GET_SUPPORTED_CPUID, filtered per vCPU as other VMMs do.

Following Firecracker (cpuid/src/transformer) and QEMU's kvm_arch_init_vcpu:
- leaf 0x1: initial APIC id (EBX[31:24]) = vCPU id, logical processor count (EBX[23:16]) and
  HTT (EDX bit 28) for SMP, the hypervisor bit (ECX bit 31, reserved for hypervisors by Intel);
- leaves 0xB / 0x1F (extended topology): x2APIC id (EDX) = vCPU id, one thread per core, all
  vCPUs in one package;
- leaf 0x4: cores per package (EAX[31:26]) = vCPUs - 1;
- on a software KVM (PVM), features its instruction emulator cannot run are masked: CMPXCHG16B
  (leaf 1 ECX 13), POPCNT (23), MOVBE (22), XSAVE/OSXSAVE (26/27), AVX (28), and in leaf 7 the
  AVX2/BMI/ADX/SMAP bits. (kvm_pvm forces leaves 1, 7 and 0xD, see shared/pvm-host.md, so the
  mask may not take effect there; it does on hosts that honour SET_CPUID2.)
Bit positions: Intel SDM vol. 2A, CPUID, tables 3-10 and 3-11.
"""
from __future__ import annotations

from kvmpy._ffi import ffi
from kvmpy.kvm import new_cpuid2

HYPERVISOR = 1 << 31            # leaf 1 ECX
HTT = 1 << 28                   # leaf 1 EDX
SOFTWARE_KVM_MASK_1_ECX = (1 << 13) | (1 << 22) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 28)
# leaf 7 subleaf 0 EBX: BMI1(3) AVX2(5) BMI2(8) AVX512F(16) ADX(19) SMAP(20) SHA(29)
SOFTWARE_KVM_MASK_7_EBX = (1 << 3) | (1 << 5) | (1 << 8) | (1 << 16) | (1 << 19) | (1 << 20) | (1 << 29)


def filtered_cpuid(supported, vcpu_id: int, nr_vcpus: int, software_kvm: bool = False):
    """A new ``struct kvm_cpuid2 *`` for vCPU ``vcpu_id`` of ``nr_vcpus``."""
    out = new_cpuid2(supported.nent)
    ffi.memmove(out.entries, supported.entries,
                supported.nent * ffi.sizeof("struct kvm_cpuid_entry2"))
    for i in range(out.nent):
        e = out.entries[i]
        if e.function == 0x1:
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(nr_vcpus, 255) << 16)
            e.ecx |= HYPERVISOR
            if nr_vcpus > 1:
                e.edx |= HTT
            if software_kvm:
                e.ecx &= ~SOFTWARE_KVM_MASK_1_ECX & 0xFFFFFFFF
        elif e.function == 0x4:
            e.eax = (e.eax & 0x03FFFFFF) | ((min(nr_vcpus, 64) - 1) << 26)
        elif e.function in (0xB, 0x1F):
            level = e.index
            if level == 0:      # SMT level: 1 thread per core
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | level
            elif level == 1:    # core level: all vCPUs
                shift = max(nr_vcpus - 1, 0).bit_length()
                e.eax, e.ebx, e.ecx = shift, nr_vcpus, (2 << 8) | level
            else:
                e.eax, e.ebx, e.ecx = 0, 0, level
            e.edx = vcpu_id
        elif e.function == 0x7 and e.index == 0 and software_kvm:
            e.ebx &= ~SOFTWARE_KVM_MASK_7_EBX & 0xFFFFFFFF
    return out
