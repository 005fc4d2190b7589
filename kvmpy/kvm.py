"""``Kvm``: the /dev/kvm fd. One method per system ioctl, named after it
(Documentation/virt/kvm/api.rst section 4). Creating a VM returns a :class:`kvmpy.vm.Vm`.

This module does not decide what a VM looks like (memory, devices): kvmpy/builder.py does.
"""
from __future__ import annotations

import enum
import errno
import os

from kvmpy import ioctls
from kvmpy._ffi import ffi, lib
from kvmpy.errors import KvmError, KvmpyError
from kvmpy.fd import KvmFd

DEFAULT_KVM_PATH = "/dev/kvm"
KVM_PATH_ENV = "KVMPY_KVM_DEVICE"  # lets tests (and users) point kvmpy at another node

Cap = enum.IntEnum("Cap", {name[len("KVM_CAP_"):]: getattr(lib, name)
                           for name in dir(lib) if name.startswith("KVM_CAP_")})
Cap.__doc__ = "KVM_CHECK_EXTENSION capabilities (include/uapi/linux/kvm.h)."


def kvm_path(path: str | None = None) -> str:
    return path or os.environ.get(KVM_PATH_ENV) or DEFAULT_KVM_PATH


def open_error(path: str, err: OSError) -> KvmpyError:
    """The one-line explanation of why ``path`` could not be opened, with the fix."""
    if err.errno == errno.ENOENT:
        return KvmpyError(f"{path} does not exist: KVM is not available; load the kvm module "
                          "(modprobe kvm_intel or kvm_amd) or enable virtualization in the "
                          "firmware; `kvmpy doctor` checks the host")
    if err.errno in (errno.EACCES, errno.EPERM):
        return KvmpyError(f"{path}: permission denied; add yourself to the group that owns it "
                          f"(sudo usermod -aG kvm $USER, then log in again) or run as root; "
                          "`kvmpy doctor` checks the host")
    if err.errno in (errno.ENXIO, errno.ENODEV):
        return KvmpyError(f"{path} exists but no KVM module serves it; load kvm_intel or kvm_amd")
    return KvmpyError(f"cannot open {path}: {err.strerror}; `kvmpy doctor` checks the host")


class Kvm(KvmFd):
    """The KVM subsystem handle (/dev/kvm). Closes with ``close()`` or ``with``."""

    def __init__(self, path: str | None = None):
        self.path = kvm_path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise open_error(self.path, e) from None
        try:
            version = self.get_api_version()
        except KvmError as e:
            self.close()
            raise KvmpyError(f"{self.path} is not a KVM device ({e}); "
                             "`kvmpy doctor` checks the host") from None
        if version != lib.KVM_API_VERSION:
            self.close()
            raise KvmpyError(f"{self.path} speaks KVM API {version}, kvmpy needs "
                             f"{lib.KVM_API_VERSION}")

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION: 12 on every kernel since 2.6.22."""
        return self._ioctl_int("KVM_GET_API_VERSION", ioctls.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if ``cap`` is absent, else a capability-specific value."""
        return self._ioctl_int("KVM_CHECK_EXTENSION", ioctls.KVM_CHECK_EXTENSION, int(cap))

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd for ``struct kvm_run``."""
        return self._ioctl_int("KVM_GET_VCPU_MMAP_SIZE", ioctls.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = 256):
        """KVM_GET_SUPPORTED_CPUID: a ``struct kvm_cpuid2 *`` (cdata) with the host's leaves."""
        while True:
            cpuid = new_cpuid2(max_entries)
            rc = lib.kvmpy_ioctl_ptr(self._fd, ioctls.KVM_GET_SUPPORTED_CPUID, cpuid)
            if rc == 0:
                return cpuid
            if ffi.errno == errno.E2BIG and max_entries < 4096:
                max_entries *= 2
                continue
            raise KvmError("KVM_GET_SUPPORTED_CPUID", ffi.errno)

    def create_vm(self) -> "Vm":
        """KVM_CREATE_VM (machine type 0: the default x86 VM)."""
        from kvmpy.vm import Vm

        while True:
            fd = lib.kvmpy_ioctl_int(self._fd, ioctls.KVM_CREATE_VM, 0)
            if fd >= 0:
                return Vm(self, fd)
            if ffi.errno != errno.EINTR:   # a signal during VM creation: retry, as QEMU does
                raise KvmError("KVM_CREATE_VM", ffi.errno)


def new_cpuid2(nent: int):
    """A zeroed ``struct kvm_cpuid2`` with room for ``nent`` entries (a flexible array)."""
    size = ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2")
    buf = ffi.new("char[]", size)
    cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
    cpuid.nent = nent
    # keep the owning buffer alive as long as the cast pointer is
    return ffi.gc(cpuid, lambda _p, _b=buf: None)
