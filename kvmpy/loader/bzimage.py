"""The Linux x86 bzImage: its setup header, validated, and the protected-mode kernel it carries.

A bzImage is a real-mode setup part (``setup_sects + 1`` 512-byte sectors, the boot sector
included) followed by the protected-mode part: the decompressor with the compressed kernel
(the *payload*) inside it. Everything here follows Documentation/arch/x86/boot.rst ("THE REAL-MODE
KERNEL HEADER", "DETAILS OF HEADER FIELDS", "64-bit BOOT PROTOCOL"); field offsets are those of
``struct setup_header`` in arch/x86/include/uapi/asm/bootparam.h.

kvmpy enters a bzImage only through the 64-bit boot protocol: the protected-mode part is copied to
:meth:`BzImage.load_address` and the vCPU starts in long mode at ``load address + 0x200``
(``startup_64``) with RSI pointing at the zero page (kvmpy.bootparams). The real-mode setup code
is never run.

This module parses and checks; it does not touch guest memory, decompress the payload
(kvmpy.loader.decompress) or build the zero page (kvmpy.bootparams).
"""
from __future__ import annotations

import collections
import enum

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct
from kvmpy.errors import ImageError
from kvmpy.loader import HEADER_MAGIC_OFFSET, has_boot_signature   # (kept there for detect())

# boot.rst, "THE REAL-MODE KERNEL HEADER"
SETUP_HEADER_OFFSET = 0x1F1     # struct setup_header starts at setup_sects
JUMP_OFFSET = 0x200             # a 2-byte short jump over the header: 0xEB, length
SHORT_JMP = 0xEB
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4         # boot.rst, setup_sects: "If this field is 0, the real value is 4"
SYSSIZE_UNIT = 16               # boot.rst, syssize: "in units of 16-byte paragraphs"
KERNEL_VERSION_BASE = 0x200     # boot.rst, kernel_version: "a pointer ... less 0x200"
# bootparam.h: struct boot_params keeps _pad7 after the setup header up to edd_mbr_sig_buffer at
# 0x290, so no setup header can end later than that.
SETUP_HEADER_END_MAX = 0x290

# boot.rst, "64-bit BOOT PROTOCOL": the 64-bit entry is at the protected-mode start + 0x200.
ENTRY64_OFFSET = 0x200
# boot.rst, "LOADING THE REST OF THE KERNEL": a bzImage's protected-mode part goes at 0x100000.
HIGH_LOAD_ADDR = 0x100000

# Protocol versions (boot.rst, "THE REAL-MODE KERNEL HEADER", protocol history): 2.06 adds
# cmdline_size (and is what kvmpy requires), 2.08 payload_offset/length, 2.10 pref_address and
# init_size, 2.12 xloadflags.
MIN_PROTOCOL = 0x0206
PROTOCOL_PAYLOAD = 0x0208
PROTOCOL_PREF_ADDRESS = 0x020A
PROTOCOL_XLOADFLAGS = 0x020C
# Fields a 2.06 header must reach: up to and including cmdline_size (0x238-0x23b).
MIN_HEADER_END = 0x23C


class LoadFlag(enum.IntFlag):
    """``loadflags`` (0x211), boot.rst "DETAILS OF HEADER FIELDS"."""

    LOADED_HIGH = 1 << 0     # protected-mode code at 0x100000 (a bzImage), not 0x10000
    KASLR_FLAG = 1 << 1      # written by the kernel: KASLR was used
    QUIET_FLAG = 1 << 5      # ask the decompressor not to print
    KEEP_SEGMENTS = 1 << 6   # obsolete (boot.rst): 32-bit entry keeps segment registers
    CAN_USE_HEAP = 1 << 7    # heap_end_ptr is valid


class XLoadFlag(enum.IntFlag):
    """``xloadflags`` (0x236, protocol 2.12+), boot.rst "DETAILS OF HEADER FIELDS"."""

    XLF_KERNEL_64 = 1 << 0                # has the legacy 64-bit entry point at 0x200
    XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1   # kernel/boot_params/cmdline/ramdisk may be above 4G
    XLF_EFI_HANDOVER_32 = 1 << 2
    XLF_EFI_HANDOVER_64 = 1 << 3
    XLF_EFI_KEXEC = 1 << 4
    XLF_5LEVEL = 1 << 5                   # can boot with 5-level paging enabled
    XLF_5LEVEL_ENABLED = 1 << 6


# struct setup_header (arch/x86/include/uapi/asm/bootparam.h), starting at 0x1f1, as it is up to
# protocol 2.15. Offsets in comments are in the image (and in the zero page).
SetupHeader = Struct(
    "setup_sects" / Int8ul,            # 0x1f1  size of the setup in sectors (0 means 4)
    "root_flags" / Int16ul,            # 0x1f2
    "syssize" / Int32ul,               # 0x1f4  protected-mode size in 16-byte paragraphs (2.04+)
    "ram_size" / Int16ul,              # 0x1f8  obsolete
    "vid_mode" / Int16ul,              # 0x1fa  video mode control
    "root_dev" / Int16ul,              # 0x1fc
    "boot_flag" / Int16ul,             # 0x1fe  0xAA55
    "jump" / Int16ul,                  # 0x200  short jump over the header
    "header" / Bytes(4),               # 0x202  "HdrS"
    "version" / Int16ul,               # 0x206  boot protocol version
    "realmode_swtch" / Int32ul,        # 0x208
    "start_sys_seg" / Int16ul,         # 0x20c  obsolete
    "kernel_version" / Int16ul,        # 0x20e  version string pointer, less 0x200
    "type_of_loader" / Int8ul,         # 0x210  written by the loader
    "loadflags" / Int8ul,              # 0x211
    "setup_move_size" / Int16ul,       # 0x212
    "code32_start" / Int32ul,          # 0x214  32-bit entry (not used by kvmpy)
    "ramdisk_image" / Int32ul,         # 0x218  written by the loader
    "ramdisk_size" / Int32ul,          # 0x21c  written by the loader
    "bootsect_kludge" / Int32ul,       # 0x220  obsolete
    "heap_end_ptr" / Int16ul,          # 0x224  written by the loader (2.01+)
    "ext_loader_ver" / Int8ul,         # 0x226  (2.02+)
    "ext_loader_type" / Int8ul,        # 0x227  (2.02+)
    "cmd_line_ptr" / Int32ul,          # 0x228  written by the loader (2.02+)
    "initrd_addr_max" / Int32ul,       # 0x22c  highest byte an initrd may occupy (2.03+)
    "kernel_alignment" / Int32ul,      # 0x230  (2.05+)
    "relocatable_kernel" / Int8ul,     # 0x234  (2.05+)
    "min_alignment" / Int8ul,          # 0x235  log2 of the minimum alignment (2.10+)
    "xloadflags" / Int16ul,            # 0x236  (2.12+)
    "cmdline_size" / Int32ul,          # 0x238  max command line length without the NUL (2.06+)
    "hardware_subarch" / Int32ul,      # 0x23c  (2.07+)
    "hardware_subarch_data" / Int64ul,  # 0x240 (2.07+)
    "payload_offset" / Int32ul,        # 0x248  payload offset in the protected-mode part (2.08+)
    "payload_length" / Int32ul,        # 0x24c  (2.08+)
    "setup_data" / Int64ul,            # 0x250  linked list of struct setup_data (2.09+)
    "pref_address" / Int64ul,          # 0x258  preferred load address (2.10+)
    "init_size" / Int32ul,             # 0x260  memory the kernel needs from its start (2.10+)
    "handover_offset" / Int32ul,       # 0x264  EFI handover entry (2.11+)
    "kernel_info_offset" / Int32ul,    # 0x268  (2.15+)
)
SETUP_HEADER_SIZE = SetupHeader.sizeof()   # 0x7b: up to 0x26c


def protocol_str(version: int) -> str:
    """0x020f -> '2.15' (boot.rst writes protocol versions as major.minor, minor in decimal)."""
    return f"{version >> 8}.{version & 0xFF:02d}"


# BzImage's fields. A namedtuple, not a dataclass: dataclasses and the inspect module they import
# cost `kvmpy boot` milliseconds of startup (benchmarks/boot).
_BZIMAGE_FIELDS = (
    "path",
    "version",
    "setup_sects",              # real value (0 in the file means 4)
    "syssize",                  # in 16-byte paragraphs
    "loadflags",                # LoadFlag
    "xloadflags",               # XLoadFlag; 0 before protocol 2.12
    "relocatable_kernel",       # bool
    "kernel_alignment",
    "min_alignment",            # log2; 0 before protocol 2.10
    "cmdline_size",             # max command line length, without the terminating NUL
    "initrd_addr_max",          # highest address the initrd's last byte may have
    "pref_address",
    "init_size",
    "payload_offset",           # None before protocol 2.08
    "payload_length",
    "kernel_version",           # "" when the header has no version string
    "setup_header_bytes",       # 0x1f1 .. 0x202 + byte at 0x201
    "kernel",                   # the protected-mode part
)


class BzImage(collections.namedtuple("BzImage", _BZIMAGE_FIELDS)):
    """A validated bzImage. Header fields keep their boot.rst names."""

    __slots__ = ()
    entry64_offset = ENTRY64_OFFSET

    def __repr__(self) -> str:      # without the setup header's and the kernel's bytes
        return (f"BzImage(path={self.path!r}, protocol {protocol_str(self.version)}, "
                f"kernel_version={self.kernel_version!r}, {len(self.kernel)} bytes of kernel)")

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode part (boot sector included)."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    @property
    def payload(self) -> bytes:
        """The compressed kernel inside the protected-mode part (boot.rst, payload_offset)."""
        if self.payload_offset is None:
            raise ImageError(f"{self.path}: boot protocol {protocol_str(self.version)} has no "
                             "payload_offset (needs >= 2.08); use a newer kernel")
        return self.kernel[self.payload_offset:self.payload_offset + self.payload_length]

    def load_address(self, ram_end: int) -> int:
        """Where to copy :attr:`kernel`, given that ``[0, ram_end)`` is contiguous RAM.

        A relocatable kernel runs where it is loaded (rounded up to ``kernel_alignment``), but
        the 64-bit decompressor never runs below LOAD_PHYSICAL_ADDR, which is ``pref_address``
        (arch/x86/boot/compressed/head_64.S); loading it at ``pref_address`` saves it copying
        itself there, so that is the choice when ``pref_address + init_size`` fits in RAM. A
        non-relocatable kernel always decompresses to ``pref_address`` whatever its load address,
        so it goes where boot.rst puts a bzImage's protected-mode part: 0x100000. Either way the
        kernel needs RAM up to ``max(load, pref_address) + init_size``; if that does not fit this
        raises ImageError.
        """
        pref = self.pref_address
        if self.relocatable_kernel and pref and pref % self.kernel_alignment == 0 \
                and pref + max(self.init_size, len(self.kernel)) <= ram_end:
            return pref
        load = HIGH_LOAD_ADDR
        need = max(load + len(self.kernel), max(load, pref) + self.init_size)
        if need > ram_end:
            raise ImageError(f"{self.path} needs RAM up to {need:#x} (init_size {self.init_size:#x}"
                             f" from {max(load, pref):#x}) but the guest has {ram_end:#x}: "
                             "give the guest more memory")
        return load

    @property
    def initrd_end_max(self) -> int:
        """One past the highest address an initrd may occupy below 4 GiB (initrd_addr_max + 1)."""
        return self.initrd_addr_max + 1

    @classmethod
    def parse(cls, data: bytes, path: str) -> "BzImage":
        """Validate ``data`` (a whole bzImage file) per boot.rst; ImageError says what is wrong."""
        if len(data) < HEADER_MAGIC_OFFSET + 6:
            raise ImageError(f"{path} is truncated ({len(data)} bytes): too short for a Linux "
                             "setup header; copy the kernel image again")
        if not has_boot_signature(data):
            raise ImageError(f"{path} is not a bzImage (no boot sector signature 0xAA55 at 0x1fe "
                             "/ no HdrS at 0x202)")
        version = int.from_bytes(data[0x206:0x208], "little")
        if version < MIN_PROTOCOL:
            raise ImageError(f"{path}: boot protocol {protocol_str(version)} is too old, kvmpy "
                             f"needs >= {protocol_str(MIN_PROTOCOL)} (Linux 2.6.22 or later)")
        if data[JUMP_OFFSET] != SHORT_JMP:
            raise ImageError(f"{path}: no short jump at 0x200, so the setup header's length is "
                             "unknown (boot.rst); the image is corrupt")
        end = HEADER_MAGIC_OFFSET + data[JUMP_OFFSET + 1]   # boot.rst: 0x0202 + byte at 0x0201
        if not MIN_HEADER_END <= end <= SETUP_HEADER_END_MAX:
            raise ImageError(f"{path}: setup header ends at {end:#x}, outside "
                             f"{MIN_HEADER_END:#x}-{SETUP_HEADER_END_MAX:#x} for protocol "
                             f"{protocol_str(version)}; the image is corrupt")
        header_bytes = bytes(data[SETUP_HEADER_OFFSET:end])
        # Fields beyond this header's end do not exist in it: read them as 0.
        padded = header_bytes[:SETUP_HEADER_SIZE].ljust(SETUP_HEADER_SIZE, b"\0")
        h = SetupHeader.parse(padded)

        loadflags = LoadFlag(h.loadflags)
        if not loadflags & LoadFlag.LOADED_HIGH:
            raise ImageError(f"{path} is a zImage (LOADED_HIGH clear: loaded at 0x10000); kvmpy "
                             "boots bzImages only, build the kernel with `make bzImage`")
        xloadflags = XLoadFlag(h.xloadflags) if version >= PROTOCOL_XLOADFLAGS else XLoadFlag(0)
        if version >= PROTOCOL_XLOADFLAGS and not xloadflags & XLoadFlag.XLF_KERNEL_64:
            raise ImageError(f"{path} has no 64-bit entry point (XLF_KERNEL_64 clear in "
                             "xloadflags): it is a 32-bit kernel; kvmpy boots x86-64 kernels")

        setup_sects = h.setup_sects or DEFAULT_SETUP_SECTS
        setup_size = (setup_sects + 1) * SECTOR_SIZE
        sys_size = h.syssize * SYSSIZE_UNIT
        if setup_size + sys_size > len(data) or sys_size == 0:
            raise ImageError(f"{path} is truncated: {len(data)} bytes, but its header says setup "
                             f"({setup_size}) + protected-mode kernel ({sys_size}) = "
                             f"{setup_size + sys_size} bytes; copy the kernel image again")
        kernel = bytes(data[setup_size:])

        relocatable = bool(h.relocatable_kernel)
        align = h.kernel_alignment
        if relocatable and (align == 0 or align & (align - 1)):
            raise ImageError(f"{path}: kernel_alignment {align:#x} is not a power of two; the "
                             "image is corrupt")
        if version >= PROTOCOL_PREF_ADDRESS:
            pref_address, init_size, min_alignment = h.pref_address, h.init_size, h.min_alignment
        else:
            # Before 2.10 the kernel states neither: it runs at 0x100000, and kvmpy's guess at the
            # memory it needs (no header field says) is four times the protected-mode part.
            pref_address, init_size, min_alignment = HIGH_LOAD_ADDR, 4 * len(kernel), 0
        if init_size == 0:
            raise ImageError(f"{path}: init_size is 0; the image is corrupt")

        payload_offset = payload_length = None
        if version >= PROTOCOL_PAYLOAD:
            payload_offset, payload_length = h.payload_offset, h.payload_length
            if payload_length == 0:
                raise ImageError(f"{path} has no compressed payload (payload_length 0); it is "
                                 "not a bzImage the kernel's build system made")
            if payload_offset + payload_length > len(kernel):
                raise ImageError(f"{path} is truncated: payload {payload_offset:#x}+"
                                 f"{payload_length:#x} runs past the protected-mode part "
                                 f"({len(kernel):#x} bytes); copy the kernel image again")

        kernel_version = ""
        if h.kernel_version:
            start = h.kernel_version + KERNEL_VERSION_BASE
            if start < setup_size:
                nul = data.find(b"\0", start, setup_size)
                raw = data[start:nul if nul >= 0 else setup_size]
                kernel_version = raw.decode("ascii", "replace")

        return cls(
            path=path, version=version, setup_sects=setup_sects, syssize=h.syssize,
            loadflags=loadflags, xloadflags=xloadflags, relocatable_kernel=relocatable,
            kernel_alignment=align, min_alignment=min_alignment, cmdline_size=h.cmdline_size,
            initrd_addr_max=h.initrd_addr_max, pref_address=pref_address, init_size=init_size,
            payload_offset=payload_offset, payload_length=payload_length,
            kernel_version=kernel_version, setup_header_bytes=header_bytes, kernel=kernel)
