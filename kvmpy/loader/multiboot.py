"""Multiboot (version 1) kernels: the header that makes an image one, and the information
structure handed to it. Everything follows the Multiboot Specification 0.6.96 (section 3.1 "OS
image format", 3.2 "Machine state", 3.3 "Boot information format").

A multiboot kernel carries a header (magic 0x1BADB002, flags, checksum) 32-bit aligned in its
first 8192 bytes. It is loaded either from its ELF program headers or, when flag 16 (the "a.out
kludge") is set, from the addresses in the header itself: the file bytes from
``header offset - (header_addr - load_addr)`` go to ``load_addr`` up to ``load_end_addr`` (0: the
end of the file), then zeros up to ``bss_end_addr`` (0: no bss), and it is entered at
``entry_addr``.

Entry state the builder must set up (spec 3.2, "Machine state"):

    EAX     0x2BADB002 (MULTIBOOT_BOOTLOADER_MAGIC)
    EBX     guest-physical address of the information structure (:func:`build_multiboot_info`)
    CS      32-bit read/execute code segment, base 0, limit 0xFFFFFFFF (selector undefined)
    DS, ES, FS, GS, SS  32-bit read/write data segments, base 0, limit 0xFFFFFFFF
    CR0     PE set, PG clear (other bits undefined); no paging, so CR4/EFER may stay 0
    EFLAGS  VM clear, IF clear (interrupts off); the rest undefined (0x2 is fine)
    A20     enabled (always so under KVM)
    ESP, GDTR, IDTR  undefined: the kernel sets up its own stack, GDT and IDT
    EIP     :attr:`MultibootImage.entry`

This module parses and builds bytes; it does not touch guest memory.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

from construct import Bytes, Default, Int32ul, Int64ul, Struct
from kvmpy.errors import ImageError
from kvmpy.loader import ELF_MAGIC
from kvmpy.loader.elf import ElfImage, Segment

# Multiboot 0.6.96, 3.1.1 "The layout of Multiboot header"
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192             # 3.1.1: "within the first 8192 bytes of the OS image"
MULTIBOOT_HEADER_ALIGN = 4          # 3.1.1: "must be longword (32-bit) aligned"
# 3.2 "Machine state": EAX on entry
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MODULE_ALIGN = 4096                 # 3.1.2, flag 0: modules "aligned on page (4KB) boundaries"
# 3.3: mmap entry types
MULTIBOOT_MEMORY_AVAILABLE = 1
MULTIBOOT_MEMORY_RESERVED = 2
KIB = 1024
LOWER_MEMORY_MAX = 640 * KIB        # 3.3, mem_lower: "The maximum possible value ... is 640"
UPPER_MEMORY_START = 0x100000       # 3.3, mem_upper: "starting at address 1 megabyte"


class HeaderFlag(enum.IntFlag):
    """Multiboot header ``flags`` (3.1.2). Bits 0-15 are requirements: a loader that does not
    understand one that is set must refuse the image; bits 16-31 are optional features."""

    PAGE_ALIGN = 1 << 0     # modules page-aligned
    MEMORY_INFO = 1 << 1    # mem_* (and mmap_*, if available) must be provided
    VIDEO_MODE = 1 << 2     # video mode table wanted (kvmpy has no video; not provided)
    AOUT_KLUDGE = 1 << 16   # header_addr..entry_addr are valid; load from them, not ELF


SUPPORTED_REQUIRED = HeaderFlag.PAGE_ALIGN | HeaderFlag.MEMORY_INFO | HeaderFlag.VIDEO_MODE


class InfoFlag(enum.IntFlag):
    """Multiboot information ``flags`` (3.3): which fields of the structure are valid."""

    MEM = 1 << 0            # mem_lower, mem_upper
    BOOT_DEVICE = 1 << 1
    CMDLINE = 1 << 2
    MODS = 1 << 3
    AOUT_SYMS = 1 << 4
    ELF_SHDR = 1 << 5
    MMAP = 1 << 6
    DRIVES = 1 << 7
    CONFIG_TABLE = 1 << 8
    BOOT_LOADER_NAME = 1 << 9
    APM_TABLE = 1 << 10
    VBE = 1 << 11
    FRAMEBUFFER = 1 << 12


# 3.1.1 "The layout of Multiboot header": offsets 0-8 always, 12-28 with flag 16, 32-44 with
# flag 2.
HeaderStart = Struct("magic" / Int32ul, "flags" / Int32ul, "checksum" / Int32ul)
AddressFields = Struct(
    "header_addr" / Int32ul,     # 12: where the header itself is loaded
    "load_addr" / Int32ul,       # 16: start of the text segment
    "load_end_addr" / Int32ul,   # 20: end of the data segment (0: to the end of the file)
    "bss_end_addr" / Int32ul,    # 24: end of bss (0: none)
    "entry_addr" / Int32ul,      # 28: entry point
)

# 3.3 "Boot information format": the structure EBX points at, 116 bytes up to the framebuffer
# fields.
MultibootInfo = Struct(
    "flags" / Int32ul,                          # 0
    "mem_lower" / Default(Int32ul, 0),          # 4   KiB from 0 (flags[0])
    "mem_upper" / Default(Int32ul, 0),          # 8   KiB from 1 MiB (flags[0])
    "boot_device" / Default(Int32ul, 0),        # 12  (flags[1])
    "cmdline" / Default(Int32ul, 0),            # 16  physical address, C string (flags[2])
    "mods_count" / Default(Int32ul, 0),         # 20  (flags[3])
    "mods_addr" / Default(Int32ul, 0),          # 24  (flags[3])
    "syms" / Default(Bytes(16), bytes(16)),     # 28-40 (flags[4] or flags[5])
    "mmap_length" / Default(Int32ul, 0),        # 44  bytes of the buffer (flags[6])
    "mmap_addr" / Default(Int32ul, 0),          # 48  (flags[6])
    "drives_length" / Default(Int32ul, 0),      # 52  (flags[7])
    "drives_addr" / Default(Int32ul, 0),        # 56  (flags[7])
    "config_table" / Default(Int32ul, 0),       # 60  (flags[8])
    "boot_loader_name" / Default(Int32ul, 0),   # 64  physical address, C string (flags[9])
    "apm_table" / Default(Int32ul, 0),          # 68  (flags[10])
    "vbe" / Default(Bytes(16), bytes(16)),      # 72-86 (flags[11])
    "framebuffer" / Default(Bytes(28), bytes(28)),  # 88-115 (flags[12])
)
# 3.3, mods: "mod_start, mod_end, string, reserved (0)", 16 bytes each
ModuleEntry = Struct("mod_start" / Int32ul, "mod_end" / Int32ul, "string" / Int32ul,
                     "reserved" / Default(Int32ul, 0))
# 3.3, mmap: size (of the rest, 20), base_addr, length, type; ``size`` is at offset -4 of the
# entry proper, so mmap_addr points at the first ``size`` field.
MmapEntry = Struct("size" / Default(Int32ul, 20), "base_addr" / Int64ul, "length" / Int64ul,
                   "type" / Int32ul)


def find_header(data: bytes) -> int | None:
    """Offset of a valid multiboot header (magic and checksum) in the first 8192 bytes."""
    limit = min(len(data), MULTIBOOT_SEARCH) - HeaderStart.sizeof()
    magic = MULTIBOOT_HEADER_MAGIC.to_bytes(4, "little")
    off = data.find(magic, 0, limit + 4)
    while 0 <= off <= limit:
        if off % MULTIBOOT_HEADER_ALIGN == 0:
            h = HeaderStart.parse(data[off:off + 12])
            if (h.magic + h.flags + h.checksum) & 0xFFFFFFFF == 0:   # 3.1.2, checksum
                return off
        off = data.find(magic, off + 1, limit + 4)
    return None


@dataclass(frozen=True)
class MultibootImage:
    path: str
    header_offset: int
    flags: HeaderFlag
    segments: tuple[Segment, ...]
    entry: int                 # 32-bit physical EIP
    kludge: bool               # loaded from the header's addresses (flag 16), not from ELF

    @property
    def page_align_modules(self) -> bool:
        return bool(self.flags & HeaderFlag.PAGE_ALIGN)

    @property
    def load_end(self) -> int:
        return max(s.end for s in self.segments)

    @classmethod
    def parse(cls, data: bytes, path: str) -> "MultibootImage":
        off = find_header(data)
        if off is None:
            raise ImageError(f"{path} has no multiboot header (magic 0x1BADB002 with a valid "
                             "checksum, 32-bit aligned, in its first 8192 bytes)")
        flags = HeaderFlag(HeaderStart.parse(data[off:off + 12]).flags)
        unknown = int(flags) & 0xFFFF & ~int(SUPPORTED_REQUIRED)
        if unknown:
            raise ImageError(f"{path} requires multiboot features {unknown:#06x} (header flags "
                             "bits 0-15) that kvmpy does not provide")
        if flags & HeaderFlag.AOUT_KLUDGE:
            segment, entry = _load_kludge(data, off, path)
            return cls(path, off, flags, (segment,), entry, True)
        if data[:4] != ELF_MAGIC:
            raise ImageError(f"{path} has a multiboot header without the a.out kludge (flag 16) "
                             "and is not an ELF file, so there is no way to load it")
        elf = ElfImage.parse(data, path)
        entry = elf.entry
        for s in elf.segments:     # paging is off at entry: a virtual e_entry becomes physical
            if s.vaddr != s.paddr and s.vaddr <= entry < s.vaddr + s.memsz:
                entry = entry - s.vaddr + s.paddr
                break
        if entry >= 1 << 32 or any(s.end > 1 << 32 for s in elf.segments):
            raise ImageError(f"{path}: a multiboot kernel must load and start below 4 GiB "
                             f"(entry {entry:#x})")
        return cls(path, off, flags, elf.segments, entry, False)


def _load_kludge(data: bytes, off: int, path: str) -> tuple[Segment, int]:
    if off + 32 > len(data):
        raise ImageError(f"{path} is truncated: its multiboot header's address fields run past "
                         "the end of the file")
    a = AddressFields.parse(data[off + 12:off + 32])
    if not a.load_addr <= a.header_addr:
        raise ImageError(f"{path}: multiboot load_addr {a.load_addr:#x} is above header_addr "
                         f"{a.header_addr:#x}; the header is corrupt")
    file_start = off - (a.header_addr - a.load_addr)     # 3.1.3, header_addr
    if file_start < 0:
        raise ImageError(f"{path}: multiboot header_addr - load_addr puts the start of the text "
                         "segment before the start of the file; the header is corrupt")
    if a.load_end_addr:
        if a.load_end_addr <= a.load_addr:
            raise ImageError(f"{path}: multiboot load_end_addr {a.load_end_addr:#x} is not above "
                             f"load_addr {a.load_addr:#x}; the header is corrupt")
        size = a.load_end_addr - a.load_addr
        if file_start + size > len(data):
            raise ImageError(f"{path} is truncated: multiboot load_end_addr asks for "
                             f"{size:#x} bytes from file offset {file_start:#x} but the file has "
                             f"{len(data):#x}; copy it again")
    else:
        size = len(data) - file_start                   # 3.1.3: "0 ... the end of the file"
    memsz = size
    if a.bss_end_addr:
        if a.bss_end_addr < a.load_addr + size:
            raise ImageError(f"{path}: multiboot bss_end_addr {a.bss_end_addr:#x} is below the "
                             f"end of the loaded data {a.load_addr + size:#x}; the header is "
                             "corrupt")
        memsz = a.bss_end_addr - a.load_addr
    if not a.load_addr <= a.entry_addr < a.load_addr + memsz:
        raise ImageError(f"{path}: multiboot entry_addr {a.entry_addr:#x} is outside the loaded "
                         f"image {a.load_addr:#x}-{a.load_addr + memsz:#x}; the header is corrupt")
    if a.load_addr + memsz > 1 << 32:
        raise ImageError(f"{path}: the multiboot image runs past 4 GiB; the header is corrupt")
    return Segment(a.load_addr, memsz, bytes(data[file_start:file_start + size]),
                   a.load_addr), a.entry_addr


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def build_multiboot_info(base_addr: int, *, e820: Sequence, cmdline_addr: int = 0,
                         initrd_addr: int = 0, initrd_size: int = 0,
                         initrd_string: str = "initrd", loader_name: str = "kvmpy") -> bytes:
    """The multiboot information structure and what it points at, as one blob for ``base_addr``.

    Layout from ``base_addr``: the 116-byte structure, the mmap (24 bytes an entry: e820 types
    carry over, 3.3), the module entry (if ``initrd_size``), then the module's string and the
    boot loader name as C strings. ``cmdline_addr`` is where the builder put the command line
    (0: none). ``e820`` is a list of kvmpy.bootinfo.E820Entry.
    """
    if base_addr % 4 or base_addr + 4096 > 1 << 32:
        raise ImageError(f"multiboot information at {base_addr:#x} must be 4-aligned and below "
                         "4 GiB")
    ram = [e for e in e820 if e.type == MULTIBOOT_MEMORY_AVAILABLE]
    mem_lower = next((min(e.end, LOWER_MEMORY_MAX) // KIB for e in ram if e.addr == 0), 0)
    mem_upper = next(((e.end - UPPER_MEMORY_START) // KIB for e in ram
                      if e.addr <= UPPER_MEMORY_START < e.end), 0)
    mem_upper = min(mem_upper, 0xFFFFFFFF)

    pos = MultibootInfo.sizeof()
    mmap_at = pos
    mmap = b"".join(MmapEntry.build(dict(base_addr=e.addr, length=e.size, type=e.type))
                    for e in e820)
    pos += len(mmap)
    flags = InfoFlag.MEM | InfoFlag.MMAP | InfoFlag.BOOT_LOADER_NAME
    mods = b""
    strings = b""
    mods_at = 0
    if initrd_size:
        mods_at = pos
        pos += ModuleEntry.sizeof()
        string_at = pos
        strings += initrd_string.encode() + b"\0"
        mods = ModuleEntry.build(dict(mod_start=initrd_addr, mod_end=initrd_addr + initrd_size,
                                      string=base_addr + string_at))
        flags |= InfoFlag.MODS
        if initrd_addr + initrd_size > 1 << 32:
            raise ImageError(f"initrd at {initrd_addr:#x} is above 4 GiB; a multiboot module "
                             "must be below it")
    name_at = pos + len(strings)
    strings += loader_name.encode() + b"\0"
    if cmdline_addr:
        flags |= InfoFlag.CMDLINE
    info = MultibootInfo.build(dict(
        flags=flags, mem_lower=mem_lower, mem_upper=mem_upper, cmdline=cmdline_addr,
        mods_count=1 if initrd_size else 0, mods_addr=base_addr + mods_at if initrd_size else 0,
        mmap_length=len(mmap), mmap_addr=base_addr + mmap_at,
        boot_loader_name=base_addr + name_at))
    blob = info + mmap + mods + strings
    return blob.ljust(_align(len(blob), 4), b"\0")
