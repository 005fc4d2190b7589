"""The Linux x86 zero page (``struct boot_params``), with the e820 memory map it carries.

A 64-bit Linux boot (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL") hands the kernel one
4096-byte page, the zero page, with RSI pointing at it. It holds the kernel's own setup header,
copied from the bzImage to offset 0x1f1 and completed with what the loader decided (where the
command line and initrd are, who the loader is), and the e820 memory map. Offsets are those of
Documentation/arch/x86/zero-page.rst and ``struct boot_params`` in
arch/x86/include/uapi/asm/bootparam.h.

Fields written here, and why:

    0x0c0/0x0c4/0x0c8  ext_ramdisk_image/size, ext_cmd_line_ptr: the high 32 bits (zero-page.rst)
    0x1e8, 0x2d0       e820_entries, e820_table (at most 128 entries, E820_MAX_ENTRIES_ZEROPAGE)
    0x1f1..            the setup header, copied as long as the image says (0x202 + byte at 0x201)
    0x1fa vid_mode     0xffff, "normal" (boot.rst, vid_mode)
    0x210 type_of_loader  0xff: boot.rst asks a loader without an assigned id to write 0xFF
    0x211 loadflags    LOADED_HIGH (a bzImage) and CAN_USE_HEAP; KEEP_SEGMENTS is obsolete
                       (boot.rst) and means nothing to the 64-bit entry, so it stays clear
    0x224 heap_end_ptr 0xe000 - 0x200, as boot.rst's sample loader sets it for protocol >= 2.02
                       with LOADED_HIGH (only real-mode setup code, which kvmpy skips, uses it)
    0x218/0x21c, 0x228 ramdisk_image/size, cmd_line_ptr: the low 32 bits
    0x070 acpi_rsdp_addr  when the caller has ACPI tables (0: the kernel scans for the RSDP)

Everything else stays zero: no screen_info (no video), no EDD, sentinel (0x1ef) 0 so the kernel
does not wipe fields as it would for a loader that copied the whole boot sector.

This module builds bytes; the builder decides addresses and writes them into guest memory.
"""
from __future__ import annotations

from collections.abc import Sequence

from construct import (Array, Bytes, Default, GreedyBytes, Int8ul, Int32ul, Int64ul,
                       Padding, Struct)
from kvmpy.bootinfo import E820Entry
from kvmpy.errors import ImageError, KvmpyError
from kvmpy.loader import BOOT_FLAG, HEADER_MAGIC
from kvmpy.loader.bzimage import (SETUP_HEADER_END_MAX, SETUP_HEADER_OFFSET, SETUP_HEADER_SIZE,
                                  BzImage, LoadFlag, SetupHeader, XLoadFlag)

ZERO_PAGE_SIZE = 4096
E820_MAX_ENTRIES_ZEROPAGE = 128        # bootparam.h: e820_table[E820_MAX_ENTRIES_ZEROPAGE]

# boot.rst, type_of_loader: "If your boot loader has an assigned id ... Otherwise, enter 0xFF"
LOADER_TYPE_UNDEFINED = 0xFF
VID_MODE_NORMAL = 0xFFFF               # boot.rst, vid_mode: 0xFFFF means "normal"
HEAP_END = 0xE000                      # boot.rst sample loader: heap_end for 2.02+ & LOADED_HIGH
HEAP_END_PTR = HEAP_END - 0x200        # "... minus 0x0200" (boot.rst, heap_end_ptr)
FOUR_GIB = 1 << 32

E820Entry_ = Struct(                   # struct boot_e820_entry, packed: 20 bytes
    "addr" / Int64ul,
    "size" / Int64ul,
    "type" / Int32ul,
)

# struct boot_params (bootparam.h); offsets per zero-page.rst.
BootParams = Struct(
    "screen_info" / Default(Bytes(0x40), bytes(0x40)),     # 0x000
    "apm_bios_info" / Default(Bytes(0x14), bytes(0x14)),   # 0x040
    Padding(4),                                            # 0x054 _pad2
    "tboot_addr" / Default(Int64ul, 0),                    # 0x058
    "ist_info" / Default(Bytes(0x10), bytes(0x10)),        # 0x060
    "acpi_rsdp_addr" / Default(Int64ul, 0),                # 0x070
    Padding(8),                                            # 0x078 _pad3
    "hd0_info" / Default(Bytes(0x10), bytes(0x10)),        # 0x080 obsolete
    "hd1_info" / Default(Bytes(0x10), bytes(0x10)),        # 0x090 obsolete
    "sys_desc_table" / Default(Bytes(0x10), bytes(0x10)),  # 0x0a0 obsolete
    "olpc_ofw_header" / Default(Bytes(0x10), bytes(0x10)),  # 0x0b0
    "ext_ramdisk_image" / Default(Int32ul, 0),             # 0x0c0
    "ext_ramdisk_size" / Default(Int32ul, 0),              # 0x0c4
    "ext_cmd_line_ptr" / Default(Int32ul, 0),              # 0x0c8
    Padding(0x13C - 0x0CC),                                # 0x0cc _pad4
    "cc_blob_address" / Default(Int32ul, 0),               # 0x13c
    "edid_info" / Default(Bytes(0x80), bytes(0x80)),       # 0x140
    "efi_info" / Default(Bytes(0x20), bytes(0x20)),        # 0x1c0
    "alt_mem_k" / Default(Int32ul, 0),                     # 0x1e0
    "scratch" / Default(Int32ul, 0),                       # 0x1e4
    "e820_entries" / Default(Int8ul, 0),                   # 0x1e8
    "eddbuf_entries" / Default(Int8ul, 0),                 # 0x1e9
    "edd_mbr_sig_buf_entries" / Default(Int8ul, 0),        # 0x1ea
    "kbd_status" / Default(Int8ul, 0),                     # 0x1eb
    "secure_boot" / Default(Int8ul, 0),                    # 0x1ec
    Padding(2),                                            # 0x1ed _pad5
    "sentinel" / Default(Int8ul, 0),                       # 0x1ef
    Padding(1),                                            # 0x1f0 _pad6
    "hdr" / Bytes(SETUP_HEADER_END_MAX - SETUP_HEADER_OFFSET),  # 0x1f1 setup header + _pad7
    "edd_mbr_sig_buffer" / Default(Bytes(0x40), bytes(0x40)),   # 0x290
    "e820_table" / Array(E820_MAX_ENTRIES_ZEROPAGE, E820Entry_),  # 0x2d0
    Padding(0x30),                                         # 0xcd0 _pad8
    "eddbuf" / Default(Bytes(0x1EC), bytes(0x1EC)),        # 0xd00
    Padding(ZERO_PAGE_SIZE - 0xEEC),                       # 0xeec _pad9
)
assert BootParams.sizeof() == ZERO_PAGE_SIZE

# The header region of the zero page: struct setup_header, then whatever follows it up to 0x290.
_HeaderRegion = Struct("hdr" / SetupHeader, "rest" / GreedyBytes)


def _minimal_header() -> bytes:
    """A setup header for a kernel with none (a vmlinux ELF entered at its 64-bit entry), with
    what Firecracker's configure_64bit_boot writes: boot_flag, "HdrS" and kernel_alignment."""
    h = SetupHeader.parse(bytes(SETUP_HEADER_SIZE))
    h.boot_flag = BOOT_FLAG
    h.header = HEADER_MAGIC
    h.kernel_alignment = 0x1000000
    return SetupHeader.build(h)


def build_boot_params(bz: BzImage | None, *, cmdline_addr: int, cmdline_size: int,
                      e820: Sequence[E820Entry], initrd_addr: int = 0, initrd_size: int = 0,
                      rsdp_addr: int = 0) -> bytes:
    """The 4096-byte zero page for a 64-bit boot of ``bz``.

    ``cmdline_size`` is the command line's length without its NUL (what :func:`check_cmdline`
    returned, less one). ``bz`` None is for a vmlinux ELF entered at its 64-bit entry point: a
    minimal header is made up, as Firecracker does.
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise KvmpyError(f"{len(e820)} e820 entries do not fit the zero page (at most "
                         f"{E820_MAX_ENTRIES_ZEROPAGE}); use fewer memory regions")
    above_4g_ok = bz is not None and bool(bz.xloadflags & XLoadFlag.XLF_CAN_BE_LOADED_ABOVE_4G)
    name = bz.path if bz is not None else "the kernel"
    if bz is not None and cmdline_size > bz.cmdline_size:
        raise ImageError(f"the kernel command line is {cmdline_size} bytes but {name} accepts at "
                         f"most {bz.cmdline_size} (cmdline_size); shorten it")
    if cmdline_addr + cmdline_size + 1 > FOUR_GIB and not above_4g_ok:
        raise ImageError(f"command line at {cmdline_addr:#x} is above 4 GiB but {name} lacks "
                         "XLF_CAN_BE_LOADED_ABOVE_4G; place it lower")
    if initrd_size:
        last = initrd_addr + initrd_size - 1
        limit = bz.initrd_addr_max if bz is not None else 0xFFFFFFFF
        if last > limit and not (above_4g_ok and initrd_addr >= FOUR_GIB):
            raise ImageError(f"initrd at {initrd_addr:#x}-{last:#x} is above {name}'s "
                             f"initrd_addr_max {limit:#x}; place it lower")

    raw = bz.setup_header_bytes if bz is not None else _minimal_header()
    region = raw.ljust(SETUP_HEADER_END_MAX - SETUP_HEADER_OFFSET, b"\0")
    parsed = _HeaderRegion.parse(region)
    h = parsed.hdr
    h.vid_mode = VID_MODE_NORMAL
    h.type_of_loader = LOADER_TYPE_UNDEFINED
    h.loadflags = (h.loadflags | LoadFlag.LOADED_HIGH | LoadFlag.CAN_USE_HEAP) & 0xFF
    h.heap_end_ptr = HEAP_END_PTR
    h.cmd_line_ptr = cmdline_addr & 0xFFFFFFFF
    h.ramdisk_image = initrd_addr & 0xFFFFFFFF if initrd_size else 0
    h.ramdisk_size = initrd_size & 0xFFFFFFFF
    if bz is None:
        h.cmdline_size = cmdline_size + 1
    # Only the header's own bytes come from the image; what follows it up to 0x290 is _pad7.
    hdr = SetupHeader.build(h) + parsed.rest
    hdr = hdr[:len(raw)].ljust(len(region), b"\0")

    table = [dict(addr=e.addr, size=e.size, type=e.type) for e in e820]
    table += [dict(addr=0, size=0, type=0)] * (E820_MAX_ENTRIES_ZEROPAGE - len(table))
    return BootParams.build(dict(
        acpi_rsdp_addr=rsdp_addr,
        ext_ramdisk_image=(initrd_addr >> 32) if initrd_size else 0,
        ext_ramdisk_size=initrd_size >> 32,
        ext_cmd_line_ptr=cmdline_addr >> 32,
        e820_entries=len(e820),
        hdr=hdr,
        e820_table=table,
    ))
