"""construct, as kvmpy imports it: every kvmpy module that describes a boot-time binary format
(setup header, boot_params, e820, ELF notes, hvm_start_info, multiboot, MP table) takes
construct's names from here, so that ``import construct`` leaves out what kvmpy never uses.

construct/__init__.py imports construct.debug, which imports pdb and inspect for its Probe and
Debugger constructs, and construct.core imports pickle (the Pickled construct) and hashlib (the
Compiled construct's module names). Together they are about half of construct's import time and
~15 ms of `kvmpy boot`'s time to the guest's first line (benchmarks/boot). They are registered
as lazy modules first (kvmpy._lazy), so they load only if something uses them.
"""
from kvmpy._lazy import lazy_modules

lazy_modules("pdb", "inspect", "traceback", "pickle", "hashlib")

from construct import (Array, Bytes, Const, Default, GreedyBytes, Int8ul,  # noqa: E402
                       Int16ul, Int32ul, Int64ul, Padding, Struct)

__all__ = ["Array", "Bytes", "Const", "Default", "GreedyBytes", "Int8ul", "Int16ul", "Int32ul",
           "Int64ul", "Padding", "Struct"]
