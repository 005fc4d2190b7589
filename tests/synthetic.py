"""Synthetic kernels built by the tests: real boot-protocol headers around tiny guest code, so
kvmpy's loaders run end to end on a host that cannot boot Linux (shared/pvm-host.md)."""
from __future__ import annotations

import struct

from kvmpy.asm import assemble

SECTOR = 512


def bzimage(code64: bytes, *, version: int = 0x020F, setup_sects: int = 1,
            relocatable: bool = False, init_size: int = 0x100000, cmdline_size: int = 2047,
            initrd_addr_max: int = 0x7FFFFFFF, xloadflags: int = 0x1, pref: int = 0x100000,
            kernel_alignment: int = 0x200000, payload: bytes | None = None,
            kernel_version: str = "") -> bytes:
    """A bzImage whose protected-mode part is ``code64`` (startup_64 at its offset 0x200).

    Field offsets: Documentation/arch/x86/boot.rst, "THE REAL-MODE KERNEL HEADER"."""
    setup = bytearray((setup_sects + 1) * SECTOR)
    hdr_end = 0x26C                              # end of the 2.15 header (boot.rst)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, (len(code64) + 15) // 16)       # syssize
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)                          # boot_flag
    setup[0x200:0x202] = bytes([0xEB, hdr_end - 0x202])                   # jump over header
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, 0x01)                            # LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)                        # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    struct.pack_into("<B", setup, 0x234, 1 if relocatable else 0)
    struct.pack_into("<H", setup, 0x236, xloadflags)                      # XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    # payload_offset/length: every real bzImage has a compressed payload (here: ``payload``
    # appended after the code, or some bytes of the code)
    if payload is not None:
        code64 = code64.ljust((len(code64) + 15) // 16 * 16, b"\0")
        struct.pack_into("<II", setup, 0x248, len(code64), len(payload))
        code64 += payload
        struct.pack_into("<I", setup, 0x1F4, (len(code64) + 15) // 16)
    else:
        struct.pack_into("<II", setup, 0x248, 0x100, 0x10)
    struct.pack_into("<Q", setup, 0x258, pref)                            # pref_address
    struct.pack_into("<I", setup, 0x260, init_size)
    if kernel_version:   # the string "make" puts in the setup code, e.g. "6.1.0-50-amd64 (...)"
        at = 0x300
        setup[at:at + len(kernel_version) + 1] = kernel_version.encode() + b"\0"
        struct.pack_into("<H", setup, 0x20E, at - 0x200)                  # kernel_version
    return bytes(setup) + code64.ljust((len(code64) + 15) // 16 * 16, b"\0")


def zeropage_kernel(lib: str, source: str, load: int = 0x100000) -> bytes:
    return bzimage(assemble(lib + "\n" + source, load))
