"""Stdlib modules that a third-party import drags in but the ``kvmpy`` command never uses, made
lazy in the command's own process.

Two of kvmpy's chosen dependencies import heavy stdlib modules at import time for features kvmpy
does not use, and `kvmpy boot`'s time to the guest's first line is measured (benchmarks/boot):

- ``import construct`` runs construct/__init__.py, which imports construct.debug (the Probe and
  Debugger constructs: ``import pdb, inspect``) and construct.core (``import pickle, hashlib``,
  for the Pickled and Compiled constructs). Together that is about 15 ms. construct has no way
  to leave them out: importing any construct submodule runs the package's __init__ first.
- ``import ioctl_opt`` imports ctypes (about 3 ms) for its IOR/IOW helpers, which take ctypes
  types; kvmpy calls only its ``IOC`` (kvmpy.ioctls), which needs no ctypes.

:func:`defer_for_cli` (called first thing by ``kvmpy.cli.main``) registers such modules, before
those imports, in ``sys.modules`` as lazy modules: the real module object, created from the
module's own spec as the import system would create it, with its code run on the first access
to an attribute it does not have yet. Every importer gets that one object, so construct's
Debugger, any later ``import pdb`` and ``from inspect import signature`` work unchanged and pay
the import cost only then. Nothing is ever replaced or removed from ``sys.modules``, and a
module that is already imported is left alone.

Only the command does this: there kvmpy owns the process. A program that imports kvmpy as a
library (``kvmpy.VM`` in a test rig, the pytest plugin) keeps its ``sys.modules`` as it is.

Why not the stdlib's ``importlib.util.LazyLoader``: its module loads on *any* attribute access,
and an ``import pdb`` statement reads ``pdb.__spec__`` (CPython checks whether the module is
still initializing), so construct.debug's own ``import pdb, inspect`` would load them at once.
Here the import attributes (``__spec__``, ``__name__``, ``__file__``, ...) are set from the start
and only a missing attribute triggers the load. LazyLoader's first load is also not thread-safe
on this Python (CPython gh-114763); here a per-module lock makes other threads wait for it.
"""
from __future__ import annotations

import _thread
import importlib.util
import sys
import types

# Per lazy module: the lock its first load runs under (reentrant: the module's own code may touch
# it while it loads), and whether that load is under way.
_locks: dict[str, _thread.RLock] = {}
_loading: set[str] = set()


class _LazyModule(types.ModuleType):
    """A module in sys.modules whose code has not run yet (see the module docstring)."""

    def __getattr__(self, attr: str):
        # Only called for attributes the module does not have: never for the import attributes.
        name = self.__spec__.name
        with _locks[name]:
            # First access: run the code. Another thread that got here meanwhile finds it done;
            # the loading thread's own lookups during the load fall through to AttributeError,
            # as for any partly initialized module.
            if type(self) is _LazyModule and name not in _loading:
                _loading.add(name)
                try:
                    self.__spec__.loader.exec_module(self)
                finally:
                    _loading.discard(name)
                self.__class__ = types.ModuleType
        return types.ModuleType.__getattribute__(self, attr)


def lazy_modules(*names: str) -> None:
    """Register each of ``names`` that is not imported yet (and exists) as a lazy module."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            continue            # not installed: the real import will say so, if it happens
        module = importlib.util.module_from_spec(spec)   # import attributes set, code not run
        if type(module) is not types.ModuleType:
            continue            # a loader that made its own module object: leave it to import
        _locks[name] = _thread.RLock()
        module.__class__ = _LazyModule
        sys.modules[name] = module


#: What the command defers: construct's debug/pickle/hash imports and ioctl_opt's ctypes.
CLI_DEFERRED = ("pdb", "inspect", "traceback", "pickle", "hashlib", "ctypes")


def defer_for_cli() -> None:
    """For the ``kvmpy`` command only (see the module docstring): make CLI_DEFERRED lazy."""
    lazy_modules(*CLI_DEFERRED)
