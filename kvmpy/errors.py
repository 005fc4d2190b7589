"""kvmpy's exceptions: errno from an ioctl becomes a KvmError that names the ioctl, in one place.

Every exception a user can cause derives from :class:`KvmpyError`; the CLI prints its message as
one line (no traceback) and exits with ``ExitStatus.ERROR``.
"""
from __future__ import annotations

import errno as _errno
import os


class KvmpyError(Exception):
    """A problem the user can fix; ``str()`` is one line saying what was wrong and what to do."""


class KvmError(KvmpyError):
    """An ioctl on a KVM fd failed."""

    def __init__(self, ioctl: str, err: int, hint: str = ""):
        self.ioctl = ioctl
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        msg = f"{ioctl} failed: {name} ({os.strerror(err)})"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class GuestMemoryError(KvmpyError):
    """A guest-physical access outside guest RAM (or wrapping, or straddling a hole)."""


class ImageError(KvmpyError):
    """A guest image that cannot be loaded."""
