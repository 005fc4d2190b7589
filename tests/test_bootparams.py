"""The zero page read back with plain struct at Documentation/arch/x86/zero-page.rst and boot.rst
offsets, the e820 layout against the PC/Firecracker map, and command-line limits."""
from __future__ import annotations

import struct

import pytest

from kvmpy.bootinfo import E820_RAM, E820_RESERVED, E820Entry, check_cmdline, e820_for
from kvmpy.bootparams import build_boot_params
from kvmpy.errors import ImageError, KvmpyError
from kvmpy.loader.bzimage import BzImage, XLoadFlag

MIB, GIB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def raw() -> bytes:
    from kvmpy.debian import debian_kernel
    with open(debian_kernel().bzimage, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def bz(raw) -> BzImage:
    return BzImage.parse(raw, "vmlinuz")


def u8(b, off):
    return b[off]


def u16(b, off):
    return struct.unpack_from("<H", b, off)[0]


def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def e820_table(zp: bytes) -> list[tuple[int, int, int]]:
    n = zp[0x1E8]
    return [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(n)]


LAYOUT_5G = [(0, 0xC000_0000), (4 * GIB, 2 * GIB)]        # the builder's ram_layout(5 GiB)
EXPECTED_5G = [
    (0x0, 0x9FC00, E820_RAM),                              # conventional memory
    (0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),          # EBDA, VGA, ROMs, BIOS
    (0x100000, 0xC000_0000 - 0x100000, E820_RAM),          # up to the MMIO hole
    (4 * GIB, 2 * GIB, E820_RAM),                          # above 4 GiB
]


def test_e820_layout():
    assert [(e.addr, e.size, e.type) for e in e820_for(LAYOUT_5G)] == EXPECTED_5G
    assert [(e.addr, e.size, e.type) for e in e820_for([(0, MIB)])] == EXPECTED_5G[:2]
    # adjacent regions merge; nothing of 0x9fc00-0xfffff is RAM
    assert [(e.addr, e.size, e.type) for e in e820_for([(0, MIB), (MIB, 63 * MIB)])] == \
        EXPECTED_5G[:2] + [(0x100000, 63 * MIB, E820_RAM)]


def test_zero_page_fields(raw, bz):
    cmdline = check_cmdline("console=ttyS0 panic=-1", bz)
    zp = build_boot_params(bz, cmdline_addr=0x20000, cmdline_size=len(cmdline) - 1,
                           initrd_addr=0x7F00000, initrd_size=0x123456, e820=e820_for(LAYOUT_5G))
    assert len(zp) == 4096
    assert e820_table(zp) == EXPECTED_5G                               # 0x1e8, 0x2d0
    assert u32(zp, 0x228) == 0x20000                                   # cmd_line_ptr
    assert u32(zp, 0x0C8) == 0                                         # ext_cmd_line_ptr
    assert u32(zp, 0x218) == 0x7F00000                                 # ramdisk_image
    assert u32(zp, 0x21C) == 0x123456                                  # ramdisk_size
    assert u32(zp, 0x0C0) == 0 and u32(zp, 0x0C4) == 0                 # ext_ramdisk_*
    assert u8(zp, 0x210) == 0xFF                                       # type_of_loader
    loadflags = u8(zp, 0x211)
    assert loadflags & 0x01 and loadflags & 0x80                       # LOADED_HIGH, CAN_USE_HEAP
    assert not loadflags & 0x40                                        # KEEP_SEGMENTS (obsolete)
    assert u16(zp, 0x224) == 0xE000 - 0x200                            # heap_end_ptr
    assert u16(zp, 0x1FA) == 0xFFFF                                    # vid_mode: normal
    assert u16(zp, 0x1FE) == 0xAA55 and zp[0x202:0x206] == b"HdrS"
    assert u8(zp, 0x1EF) == 0                                          # sentinel
    assert u32(zp, 0x070) == 0                                         # acpi_rsdp_addr


def test_zero_page_keeps_the_rest_of_the_header(raw, bz):
    zp = build_boot_params(bz, cmdline_addr=0x20000, cmdline_size=0, e820=e820_for(LAYOUT_5G))
    end = 0x202 + raw[0x201]
    written = {0x1FA, 0x1FB, 0x210, 0x211, 0x224, 0x225} | set(range(0x218, 0x220)) \
        | set(range(0x228, 0x22C))
    for off in range(0x1F1, end):
        if off not in written:
            assert zp[off] == raw[off], f"setup header byte {off:#x} changed"
    assert zp[end:0x290] == bytes(0x290 - end)                         # _pad7 stays zero
    below = bytearray(zp[:0x1F1])
    below[0x1E8] = 0                                                   # e820_entries
    assert below == bytes(0x1F1)                                       # nothing else below 0x1f1
    assert u32(zp, 0x218) == 0 and u32(zp, 0x21C) == 0                 # no initrd


def test_high_addresses_go_to_ext_fields(bz):
    assert bz.xloadflags & XLoadFlag.XLF_CAN_BE_LOADED_ABOVE_4G
    zp = build_boot_params(bz, cmdline_addr=0x1_0002_0000, cmdline_size=10,
                           initrd_addr=0x2_3456_7000, initrd_size=0x1_0000_0010,
                           e820=e820_for(LAYOUT_5G))
    assert (u32(zp, 0x228), u32(zp, 0x0C8)) == (0x0002_0000, 0x1)
    assert (u32(zp, 0x218), u32(zp, 0x0C0)) == (0x3456_7000, 0x2)
    assert (u32(zp, 0x21C), u32(zp, 0x0C4)) == (0x10, 0x1)


def test_initrd_above_initrd_addr_max(bz):
    low_only = bz._replace(xloadflags=XLoadFlag.XLF_KERNEL_64)
    with pytest.raises(ImageError, match="above vmlinuz's initrd_addr_max 0x7fffffff"):
        build_boot_params(low_only, cmdline_addr=0x20000, cmdline_size=0,
                          initrd_addr=0x7FFFF000, initrd_size=0x2000, e820=[])
    with pytest.raises(ImageError, match="lacks XLF_CAN_BE_LOADED_ABOVE_4G"):
        build_boot_params(low_only, cmdline_addr=1 << 32, cmdline_size=0, e820=[])


def test_cmdline_limits(bz):
    assert bz.cmdline_size == 2047
    assert check_cmdline("x" * 2047, bz) == b"x" * 2047 + b"\0"
    with pytest.raises(ImageError, match="2048 bytes but vmlinuz accepts at most 2047"):
        check_cmdline("x" * 2048, bz)
    with pytest.raises(ImageError, match="NUL"):
        check_cmdline("a\0b", bz)
    with pytest.raises(ImageError, match="accepts at most 2047"):
        build_boot_params(bz, cmdline_addr=0x20000, cmdline_size=4096, e820=[])


def test_too_many_e820_entries(bz):
    many = [E820Entry(i * 2 * MIB, MIB, E820_RAM) for i in range(129)]
    with pytest.raises(KvmpyError, match="129 e820 entries"):
        build_boot_params(bz, cmdline_addr=0x20000, cmdline_size=0, e820=many)
    zp = build_boot_params(bz, cmdline_addr=0x20000, cmdline_size=0, e820=many[:128])
    assert zp[0x1E8] == 128 and e820_table(zp)[-1] == (127 * 2 * MIB, MIB, E820_RAM)


def test_zero_page_for_a_vmlinux_without_header():
    zp = build_boot_params(None, cmdline_addr=0x20000, cmdline_size=9, e820=e820_for(LAYOUT_5G))
    assert u16(zp, 0x1FE) == 0xAA55 and zp[0x202:0x206] == b"HdrS"
    assert u32(zp, 0x228) == 0x20000 and u32(zp, 0x238) == 10          # cmdline_size with NUL
    assert u8(zp, 0x210) == 0xFF and e820_table(zp) == EXPECTED_5G
