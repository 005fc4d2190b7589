"""kvmpy: a virtual machine monitor in Python over Linux KVM.

``kvmpy.VM`` is the scripting API (kvmpy/api.py); it is imported lazily so that the ``kvmpy``
command pays nothing for it.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("VM", "ExitResult", "ConsoleTimeout", "GuestEnded"):
        from kvmpy import api

        return getattr(api, name)
    raise AttributeError(f"module 'kvmpy' has no attribute {name!r}")
