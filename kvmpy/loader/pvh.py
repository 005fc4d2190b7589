"""The PVH boot protocol's start-of-day structure, ``hvm_start_info``, for an ELF kernel with a
XEN_ELFNOTE_PHYS32_ENTRY note (kvmpy.loader.elf).

Structures: xen/include/public/arch-x86/hvm/start_info.h (version 1, which adds the memory map).
Entry state: Xen's docs/misc/pvh.pandoc ("x86/HVM direct boot ABI"), which Linux's
arch/x86/platform/pvh/head.S (``pvh_start_xen``) relies on, and which Firecracker and QEMU's
microvm follow:

    EIP     the PHYS32_ENTRY note's address (ElfImage.pvh_entry)
    EBX     guest-physical address of hvm_start_info (the blob :func:`build_start_info` makes)
    CR0     PE (bit 0) set, every other bit clear: 32-bit protected mode, paging off
    CR4     0
    EFER    0 (not in long mode)
    CS      32-bit read/execute code segment, base 0, limit 0xFFFFFFFF (selector unspecified)
    DS, ES, SS  32-bit read/write data segments, base 0, limit 0xFFFFFFFF (selector unspecified)
    TR      a 32-bit TSS, active, base 0, limit 0x67
    EFLAGS  VM (bit 17), IF (bit 9) and TF (bit 8) clear; 0x2 is fine
    all other registers unspecified: the kernel sets up its own stack, GDT and IDT

Segments are loaded at their ``p_paddr``. hvm_start_info itself must be below 4 GiB (EBX is
32 bits); the addresses inside it are 64-bit, but keep them low too, as Xen does (start_info.h:
"Xen on x86 will always try to place all the data below the 4GiB boundary").

This module builds bytes; it does not touch guest memory or vCPU registers.
"""
from __future__ import annotations

from collections.abc import Sequence

from construct import Default, Int32ul, Int64ul, Struct
from kvmpy.errors import ImageError

# start_info.h: XEN_HVM_START_MAGIC_VALUE ("xEn3" with the 0x80 bit of the "E" set)
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
# start_info.h: version 1 adds memmap_paddr/memmap_entries
HVM_START_INFO_VERSION = 1
# start_info.h: XEN_HVM_MEMMAP_TYPE_* (the e820 values)
XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2

HvmStartInfo = Struct(                          # struct hvm_start_info, 56 bytes
    "magic" / Default(Int32ul, XEN_HVM_START_MAGIC_VALUE),   # 0
    "version" / Default(Int32ul, HVM_START_INFO_VERSION),    # 4
    "flags" / Default(Int32ul, 0),              # 8   SIF_xxx (none for a non-Xen host)
    "nr_modules" / Default(Int32ul, 0),         # 12
    "modlist_paddr" / Default(Int64ul, 0),      # 16  array of hvm_modlist_entry
    "cmdline_paddr" / Default(Int64ul, 0),      # 24  C string (0: none)
    "rsdp_paddr" / Default(Int64ul, 0),         # 32  ACPI RSDP (0: the guest scans for it)
    "memmap_paddr" / Default(Int64ul, 0),       # 40  array of hvm_memmap_table_entry (v1)
    "memmap_entries" / Default(Int32ul, 0),     # 48  (v1)
    "reserved" / Default(Int32ul, 0),           # 52
)
HvmModlistEntry = Struct(                       # struct hvm_modlist_entry, 32 bytes
    "paddr" / Int64ul,
    "size" / Int64ul,
    "cmdline_paddr" / Default(Int64ul, 0),
    "reserved" / Default(Int64ul, 0),
)
HvmMemmapTableEntry = Struct(                   # struct hvm_memmap_table_entry, 24 bytes
    "addr" / Int64ul,
    "size" / Int64ul,
    "type" / Int32ul,
    "reserved" / Default(Int32ul, 0),
)


def build_start_info(base_addr: int, *, cmdline_addr: int, e820: Sequence,
                     initrd_addr: int = 0, initrd_size: int = 0, rsdp_addr: int = 0) -> bytes:
    """hvm_start_info and the tables it points at, as one blob to place at ``base_addr``.

    Layout from ``base_addr`` (8-aligned): hvm_start_info (56 bytes), then one hvm_modlist_entry
    for the initrd (32 bytes, only if ``initrd_size``), then one hvm_memmap_table_entry per
    ``e820`` entry (kvmpy.bootinfo.E820Entry; types carry over unchanged). ``cmdline_addr`` is
    where the builder put the NUL-terminated command line (0: none). EBX = ``base_addr``.
    """
    if base_addr % 8 or base_addr >= 1 << 32:
        raise ImageError(f"hvm_start_info at {base_addr:#x} must be 8-aligned and below 4 GiB "
                         "(EBX holds a 32-bit address)")
    pos = HvmStartInfo.sizeof()
    modlist = b""
    if initrd_size:
        modlist = HvmModlistEntry.build(dict(paddr=initrd_addr, size=initrd_size))
    modlist_at = pos
    pos += len(modlist)
    memmap = b"".join(HvmMemmapTableEntry.build(dict(addr=e.addr, size=e.size, type=e.type))
                      for e in e820)
    info = HvmStartInfo.build(dict(
        nr_modules=1 if initrd_size else 0,
        modlist_paddr=base_addr + modlist_at if initrd_size else 0,
        cmdline_paddr=cmdline_addr,
        rsdp_paddr=rsdp_addr,
        memmap_paddr=base_addr + pos if e820 else 0,
        memmap_entries=len(e820),
    ))
    return info + modlist + memmap
