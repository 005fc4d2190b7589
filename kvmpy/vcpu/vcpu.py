"""``Vcpu``: a vCPU fd and its mmapped ``struct kvm_run``. One method per vCPU ioctl.

Register state is exchanged as cffi cdata of the kernel structs (``struct kvm_regs *`` ...), so a
field name here is the field name in arch/x86/include/uapi/asm/kvm.h. The run loop lives in
kvmpy/vcpu/runner.py; this class only issues ioctls.
"""
from __future__ import annotations

import errno
import mmap
import os

from kvmpy import ioctls
from kvmpy._ffi import ffi, lib
from kvmpy.errors import KvmError
from kvmpy.fd import KvmFd


class Vcpu(KvmFd):
    def __init__(self, vm, fd: int, vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self._fd = fd
        try:
            self.mmap_size = vm.kvm.get_vcpu_mmap_size()
            self._run_map = mmap.mmap(fd, self.mmap_size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        #: the shared ``struct kvm_run`` (valid until close())
        self.run_struct = ffi.from_buffer("struct kvm_run *", self._run_map)
        #: the same page as bytes, for I/O data at ``io.data_offset``
        self.run_buffer = memoryview(self._run_map)

    def close(self) -> None:
        if self._fd < 0:
            return
        self.run_buffer.release()
        ffi.release(self.run_struct)
        self._run_map.close()
        super().close()

    def run(self) -> bool:
        """KVM_RUN: run until the next exit. False when interrupted (EINTR/EAGAIN) before one."""
        if lib.kvmpy_run(self._fd) < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                # EAGAIN: an AP's first KVM_RUN on some hosts (shared/pvm-host.md); retry.
                return False
            raise KvmError("KVM_RUN", err)
        return True

    def get_regs(self):
        """KVM_GET_REGS -> ``struct kvm_regs *``."""
        r = ffi.new("struct kvm_regs *")
        self._ioctl_ptr("KVM_GET_REGS", ioctls.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs) -> None:
        """KVM_SET_REGS."""
        self._ioctl_ptr("KVM_SET_REGS", ioctls.KVM_SET_REGS, regs)

    def get_sregs(self):
        """KVM_GET_SREGS -> ``struct kvm_sregs *``."""
        s = ffi.new("struct kvm_sregs *")
        self._ioctl_ptr("KVM_GET_SREGS", ioctls.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS."""
        self._ioctl_ptr("KVM_SET_SREGS", ioctls.KVM_SET_SREGS, sregs)

    def get_fpu(self):
        """KVM_GET_FPU -> ``struct kvm_fpu *``."""
        f = ffi.new("struct kvm_fpu *")
        self._ioctl_ptr("KVM_GET_FPU", ioctls.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu) -> None:
        """KVM_SET_FPU (ignored by some software KVMs, e.g. PVM: see shared/pvm-host.md)."""
        self._ioctl_ptr("KVM_SET_FPU", ioctls.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS for ``indices``; returns {index: value} for those KVM returned."""
        buf, msrs = _new_msrs(len(indices))
        for i, idx in enumerate(indices):
            msrs.entries[i].index = idx
        n = self._ioctl_ptr("KVM_GET_MSRS", ioctls.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were set (KVM stops at the first it refuses)."""
        buf, msrs = _new_msrs(len(values))
        for i, (idx, val) in enumerate(values.items()):
            msrs.entries[i].index, msrs.entries[i].data = idx, val
        return self._ioctl_ptr("KVM_SET_MSRS", ioctls.KVM_SET_MSRS, msrs)

    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2 with a ``struct kvm_cpuid2 *`` (see Kvm.get_supported_cpuid)."""
        self._ioctl_ptr("KVM_SET_CPUID2", ioctls.KVM_SET_CPUID2, cpuid)

    def get_lapic(self):
        """KVM_GET_LAPIC -> ``struct kvm_lapic_state *`` (needs the in-kernel irqchip)."""
        s = ffi.new("struct kvm_lapic_state *")
        self._ioctl_ptr("KVM_GET_LAPIC", ioctls.KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, state) -> None:
        """KVM_SET_LAPIC."""
        self._ioctl_ptr("KVM_SET_LAPIC", ioctls.KVM_SET_LAPIC, state)

    def get_vcpu_events(self):
        """KVM_GET_VCPU_EVENTS -> ``struct kvm_vcpu_events *``."""
        e = ffi.new("struct kvm_vcpu_events *")
        self._ioctl_ptr("KVM_GET_VCPU_EVENTS", ioctls.KVM_GET_VCPU_EVENTS, e)
        return e

    def set_vcpu_events(self, events) -> None:
        """KVM_SET_VCPU_EVENTS (inject exceptions, interrupts, NMIs)."""
        self._ioctl_ptr("KVM_SET_VCPU_EVENTS", ioctls.KVM_SET_VCPU_EVENTS, events)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` is KVM_GUESTDBG_* flags; ``debugreg`` DR0-7."""
        d = ffi.new("struct kvm_guest_debug *")
        d.control = control
        for i, v in enumerate(debugreg or []):
            d.arch.debugreg[i] = v
        self._ioctl_ptr("KVM_SET_GUEST_DEBUG", ioctls.KVM_SET_GUEST_DEBUG, d)


def _new_msrs(n: int):
    size = ffi.sizeof("struct kvm_msrs") + n * ffi.sizeof("struct kvm_msr_entry")
    buf = ffi.new("char[]", size)
    msrs = ffi.cast("struct kvm_msrs *", buf)
    msrs.nmsrs = n
    return buf, msrs
