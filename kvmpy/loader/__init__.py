"""Kernel image formats: which one a file is, and each one parsed and validated.

    bzimage.py     Linux bzImage (boot.rst setup header); entered through the 64-bit boot protocol
    elf.py         ELF kernels (vmlinux): PT_LOAD segments and the Xen PVH entry note
    pvh.py         hvm_start_info for the PVH entry of an ELF kernel
    multiboot.py   Multiboot v1 kernels (ELF or a.out kludge) and their information structure
    decompress.py  a bzImage's payload decompressed into its vmlinux ELF (``--fast-boot``)

The zero page for a bzImage is in kvmpy.bootparams, the MP table in kvmpy.mptable. Nothing here
touches /dev/kvm or guest memory: the builder places the bytes and sets the registers each
module's docstring lists.
"""
from __future__ import annotations

from kvmpy.errors import ImageError

FORMATS = ("bzimage", "elf", "multiboot")

# The signatures that tell the formats apart live here rather than in each format's module, so
# that detect() imports only the module of the format it finds: each costs `kvmpy boot` startup
# time with its construct structures and enums (benchmarks/boot).
ELF_MAGIC = b"\x7fELF"          # gABI "ELF Identification": e_ident[EI_MAG0..EI_MAG3]
# boot.rst, "THE REAL-MODE KERNEL HEADER"
BOOT_FLAG_OFFSET = 0x1FE
BOOT_FLAG = 0xAA55              # the boot sector signature
HEADER_MAGIC_OFFSET = 0x202
HEADER_MAGIC = b"HdrS"          # boot.rst: 'header: Magic signature "HdrS"' (2.00+)


def has_boot_signature(data: bytes) -> bool:
    """The boot sector signature 0xAA55 at 0x1fe and "HdrS" at 0x202 (boot.rst)."""
    return (len(data) >= HEADER_MAGIC_OFFSET + 4
            and int.from_bytes(data[BOOT_FLAG_OFFSET:BOOT_FLAG_OFFSET + 2], "little") == BOOT_FLAG
            and data[HEADER_MAGIC_OFFSET:HEADER_MAGIC_OFFSET + 4] == HEADER_MAGIC)


def load(data: bytes, path: str) -> tuple:
    """``(kind, image)`` for the kernel image ``data`` (read from ``path``): kind "bzimage",
    "elf" or "multiboot" and the BzImage, ElfImage or MultibootImage parsed on the way (the
    caller loads that one rather than parsing again: a vmlinux's segments are tens of MiB).

    The first match wins, in this order:

    1. bzImage: 0xAA55 at 0x1fe and "HdrS" at 0x202, and it validates (BzImage.parse). A bzImage
       that also has a multiboot header is still a bzImage.
    2. ELF with a Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY): "elf", entered through PVH.
    3. A multiboot header in the first 8192 bytes (ELF or a.out kludge): "multiboot".
    4. Any other x86-64 ELF: "elf" (a vmlinux entered at its 64-bit entry point).

    Anything else, truncated or corrupt files included, raises ImageError naming what is wrong.
    """
    # Each format's module is imported only when the bytes point at it: they are not cheap to
    # import, and `kvmpy boot` startup is measured (benchmarks/boot). A PVH ELF kernel imports
    # kvmpy.loader.elf alone.
    if not data:
        raise ImageError(f"{path} is empty: it is not a kernel image (bzImage, vmlinux ELF or "
                         "multiboot kernel)")
    if has_boot_signature(data):
        from kvmpy.loader.bzimage import BzImage

        return "bzimage", BzImage.parse(data, path)
    if (len(data) < HEADER_MAGIC_OFFSET + 4 and len(data) >= BOOT_FLAG_OFFSET + 2
            and int.from_bytes(data[BOOT_FLAG_OFFSET:BOOT_FLAG_OFFSET + 2], "little") == BOOT_FLAG):
        raise ImageError(f"{path} is truncated ({len(data)} bytes): a boot sector without the "
                         "setup header after it; copy the kernel image again")
    elf = None
    if data[:4] == ELF_MAGIC:
        from kvmpy.loader.elf import ElfImage

        elf = ElfImage.parse(data, path)
        if elf.pvh_entry is not None:
            return "elf", elf
    from kvmpy.loader.multiboot import MultibootImage, find_header

    if find_header(data) is not None:
        return "multiboot", MultibootImage.parse(data, path)
    if elf is not None:
        from kvmpy.loader.elf import EM_X86_64

        if elf.machine == EM_X86_64 and elf.bits == 64:
            return "elf", elf
        raise ImageError(f"{path} is a 32-bit ELF with neither a PVH note nor a multiboot "
                         "header, so kvmpy has no way to enter it")
    raise ImageError(f"{path} is not a Linux kernel (no boot sector signature / HdrS) nor an ELF "
                     "or multiboot kernel; give a bzImage, a vmlinux or a multiboot kernel")


def detect(data: bytes, path: str) -> str:
    """The format :func:`load` finds, without the parsed image."""
    return load(data, path)[0]
