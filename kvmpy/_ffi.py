"""The compiled cffi module ``kvmpy._kvm`` (built by kvmpy/_kvm_build.py), with a clear error
when it has not been built. Nothing else in kvmpy imports ``kvmpy._kvm`` directly."""
from __future__ import annotations

try:
    from kvmpy._kvm import ffi, lib  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    from kvmpy.errors import KvmpyError

    raise KvmpyError(f"kvmpy's C extension is not built ({e}); run `make build` "
                     "(needs gcc and linux-libc-dev for <linux/kvm.h>)") from None
