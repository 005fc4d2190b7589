"""What the three KVM fd classes (Kvm, Vm, Vcpu) share: owning one fd, closing it once (also
with ``with``), and issuing ioctls so that a failure raises KvmError naming the ioctl."""
from __future__ import annotations

import os

from kvmpy._ffi import ffi, lib
from kvmpy.errors import KvmError


class KvmFd:
    _fd = -1

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl_int(self, name: str, request: int, arg: int = 0) -> int:
        """An ioctl whose argument is an integer (or none)."""
        rc = lib.kvmpy_ioctl_int(self._fd, request, arg)
        if rc < 0:
            raise KvmError(name, ffi.errno)
        return rc

    def _ioctl_ptr(self, name: str, request: int, arg) -> int:
        """An ioctl whose argument points at a struct (cdata)."""
        rc = lib.kvmpy_ioctl_ptr(self._fd, request, arg)
        if rc < 0:
            raise KvmError(name, ffi.errno)
        return rc
