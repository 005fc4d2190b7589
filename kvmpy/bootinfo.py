"""What every boot protocol hands the kernel: the e820 memory map and the command line.

The zero page of a bzImage or 64-bit ELF boot (kvmpy.bootparams), the PVH ``hvm_start_info``
(kvmpy.loader.pvh) and the multiboot information (kvmpy.loader.multiboot) each carry the same map
in their own layout, and each points at the same NUL-terminated command line. This module is
apart from kvmpy.bootparams so that a PVH or multiboot boot does not import the zero page and the
bzImage setup header it is built from (`kvmpy boot` startup is measured, benchmarks/boot).

This module computes values; the builder writes them into guest memory.
"""
from __future__ import annotations

import collections
from collections.abc import Sequence

from kvmpy.errors import ImageError

# e820 types (arch/x86/include/asm/e820/types.h; ACPI "Address Range Types")
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
COMMAND_LINE_SIZE = 2048               # arch/x86/include/asm/setup.h: what the kernel copies

# Memory map layout (Firecracker arch/src/x86_64/layout.rs and mod.rs follow the PC):
#   0x00000-0x9fbff  RAM (conventional memory, less the last KiB)
#   0x9fc00-0xfffff  reserved: EBDA (0x9fc00, where kvmpy.mptable puts the MP table), VGA
#                    window 0xa0000-0xbffff, option ROMs and the BIOS 0xc0000-0xfffff
#   0x100000-...     RAM up to the end of low RAM (the builder stops it below its MMIO hole)
#   4 GiB-...        RAM above the hole, if any
# The 32-bit MMIO hole is left out of the map (not reserved): Linux takes the largest gap below
# 4 GiB as room for PCI BARs.
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000


class E820Entry(collections.namedtuple("E820Entry", "addr size type")):
    """One e820 range. (A namedtuple: dataclasses cost milliseconds of startup.)"""

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_for(memory_layout: Sequence[tuple[int, int]]) -> list[E820Entry]:
    """The e820 map for guest RAM ``[(gpa, size), ...]`` (the builder's ``ram_layout``).

    RAM below EBDA_START and from 1 MiB up is reported as RAM; 0x9fc00-0xfffff as reserved when
    any RAM lies below 1 MiB (see the layout table above). Adjacent RAM is merged.
    """
    ram: list[E820Entry] = []
    low = False
    for gpa, size in sorted(memory_layout):
        end = gpa + size
        if gpa < HIGH_MEMORY:
            low = True
        if gpa < EBDA_START:
            ram.append(E820Entry(gpa, min(end, EBDA_START) - gpa, E820_RAM))
        start = max(gpa, HIGH_MEMORY)
        if end > start:
            ram.append(E820Entry(start, end - start, E820_RAM))
    merged: list[E820Entry] = []
    for e in ram:
        if merged and merged[-1].end == e.addr:
            merged[-1] = E820Entry(merged[-1].addr, merged[-1].size + e.size, E820_RAM)
        else:
            merged.append(e)
    if low:
        merged.append(E820Entry(EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED))
    return sorted(merged, key=lambda e: e.addr)


def check_cmdline(cmdline: str | bytes, bz=None) -> bytes:
    """The command line as the NUL-terminated bytes to put in guest memory.

    ImageError when it is longer than the kernel's limit: a bzImage's ``cmdline_size`` (``bz``, a
    kvmpy.loader.bzimage.BzImage; boot.rst: "the maximum size of the command line without the
    terminating zero"), else COMMAND_LINE_SIZE less the NUL; or when it contains a NUL.
    """
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise ImageError("the kernel command line contains a NUL byte; remove it")
    limit = bz.cmdline_size if bz is not None else COMMAND_LINE_SIZE - 1
    if len(raw) > limit:
        who = bz.path if bz is not None else "the kernel"
        raise ImageError(f"the kernel command line is {len(raw)} bytes but {who} accepts at most "
                         f"{limit} (cmdline_size); shorten it")
    return raw + b"\0"
