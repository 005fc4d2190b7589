"""Kernel image formats: the real Debian bzImage checked against values read here with plain
struct at boot.rst offsets (and against its Kconfig), detection errors, synthetic ELF and
multiboot kernels, and the PVH / multiboot information structures at their spec offsets."""
from __future__ import annotations

import bz2
import gzip
import lzma
import random
import re
import shutil
import struct
import subprocess

import pytest

from kvmpy.bootinfo import E820_RAM, E820_RESERVED, E820Entry, e820_for
from kvmpy.errors import ImageError
from kvmpy.loader import decompress, detect
from kvmpy.loader.bzimage import BzImage, XLoadFlag
from kvmpy.loader.decompress import cached_vmlinux, extract_vmlinux
from kvmpy.loader.elf import ElfImage
from kvmpy.loader.multiboot import MultibootImage, build_multiboot_info
from kvmpy.loader.pvh import build_start_info

MIB = 1 << 20
NOT_A_KERNEL = ("is not a Linux kernel (no boot sector signature / HdrS) nor an ELF or "
                "multiboot kernel")


@pytest.fixture(scope="module")
def debian():
    from kvmpy.debian import debian_kernel
    return debian_kernel()


@pytest.fixture(scope="module")
def raw(debian) -> bytes:
    with open(debian.bzimage, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def bz(debian, raw) -> BzImage:
    return BzImage.parse(raw, debian.bzimage)


@pytest.fixture(scope="module")
def kconfig(debian) -> dict[str, str]:
    out = {}
    with open(debian.config) as f:
        for line in f:
            if "=" in line and not line.startswith("#"):
                k, v = line.strip().split("=", 1)
                out[k] = v
    return out


@pytest.fixture(scope="module")
def vmlinux_path(bz, tmp_path_factory) -> str:
    path, cached = cached_vmlinux(bz, str(tmp_path_factory.mktemp("vmlinux-cache")))
    assert not cached
    return path


@pytest.fixture(scope="module")
def vmlinux(vmlinux_path) -> bytes:
    with open(vmlinux_path, "rb") as f:
        return f.read()


# --- the real bzImage ----------------------------------------------------------------------------

def test_header_fields_match_boot_rst_offsets(raw, bz):
    u8 = lambda off: raw[off]                                     # noqa: E731
    u16 = lambda off: struct.unpack_from("<H", raw, off)[0]       # noqa: E731
    u32 = lambda off: struct.unpack_from("<I", raw, off)[0]       # noqa: E731
    u64 = lambda off: struct.unpack_from("<Q", raw, off)[0]       # noqa: E731
    assert u16(0x1FE) == 0xAA55
    assert raw[0x202:0x206] == b"HdrS"
    assert u16(0x206) >= 0x020F and bz.version == u16(0x206)
    assert bz.setup_sects == (u8(0x1F1) or 4)
    assert bz.syssize == u32(0x1F4)
    assert u16(0x236) & 1 and bz.xloadflags & XLoadFlag.XLF_KERNEL_64
    assert bz.xloadflags == u16(0x236)
    assert bz.relocatable_kernel == bool(u8(0x234)) is True
    assert bz.kernel_alignment == u32(0x230)
    assert bz.min_alignment == u8(0x235)
    assert bz.cmdline_size == u32(0x238)
    assert bz.initrd_addr_max == u32(0x22C)
    assert bz.payload_offset == u32(0x248) and bz.payload_length == u32(0x24C)
    assert bz.pref_address == u64(0x258)
    assert bz.init_size == u32(0x260)
    assert bz.loadflags & 1                                        # LOADED_HIGH: a bzImage


def test_header_matches_kconfig(bz, kconfig, debian):
    # Values the kernel build put there, known independently of the header.
    assert bz.kernel_alignment == int(kconfig["CONFIG_PHYSICAL_ALIGN"], 16) == 0x200000
    assert bz.pref_address == int(kconfig["CONFIG_PHYSICAL_START"], 16) == 0x1000000
    assert bz.cmdline_size == 2047          # x86 COMMAND_LINE_SIZE (2048) less the NUL
    assert bz.initrd_addr_max == 0x7FFFFFFF
    assert bz.kernel_version.startswith(debian.version)


def test_setup_header_bytes_and_kernel_split(raw, bz):
    end = 0x202 + raw[0x201]
    assert raw[0x200] == 0xEB
    assert bz.setup_header_bytes == raw[0x1F1:end]
    assert len(bz.setup_header_bytes) == 0x26C - 0x1F1     # protocol 2.15 ends at kernel_info
    setup = ((raw[0x1F1] or 4) + 1) * 512
    assert bz.kernel == raw[setup:]
    assert len(bz.kernel) >= struct.unpack_from("<I", raw, 0x1F4)[0] * 16
    assert bz.entry64_offset == 0x200


def test_load_address(bz):
    assert bz.load_address(256 * MIB) == 0x1000000          # pref_address fits
    with pytest.raises(ImageError, match="needs RAM up to .* give the guest more memory"):
        bz.load_address(32 * MIB)
    fixed = bz._replace(relocatable_kernel=False)
    assert fixed.load_address(256 * MIB) == 0x100000


def test_payload_extraction_gives_elf_with_pvh_note(bz, kconfig, vmlinux, vmlinux_path):
    fmt = next(k[len("CONFIG_KERNEL_"):].lower() for k, v in kconfig.items()
               if k.startswith("CONFIG_KERNEL_") and v == "y"
               and k[len("CONFIG_KERNEL_"):] in ("GZIP", "XZ", "ZSTD", "LZ4", "BZIP2", "LZMA"))
    assert decompress.payload_format(bz.payload) == fmt
    assert vmlinux[:4] == b"\x7fELF" and vmlinux[4] == 2                  # ELFCLASS64
    assert struct.unpack_from("<H", vmlinux, 18)[0] == 62                 # EM_X86_64
    assert len(vmlinux) == struct.unpack("<I", bz.payload[-4:])[0]
    elf = ElfImage.parse(vmlinux, vmlinux_path)
    start = int(kconfig["CONFIG_PHYSICAL_START"], 16)
    assert elf.bits == 64 and elf.entry == struct.unpack_from("<Q", vmlinux, 24)[0] == start
    assert elf.segments[0].paddr == start
    assert start < elf.pvh_entry < start + bz.init_size
    assert any(s.paddr <= elf.pvh_entry < s.paddr + len(s.data) and s.flags & 1  # PF_X
               for s in elf.segments)
    readelf = shutil.which("readelf")
    if readelf:
        out = subprocess.run([readelf, "-nW", vmlinux_path], capture_output=True,
                             text=True).stdout
        m = re.search(r"\(0x00000012\)\s+description data: ([0-9a-f ]+)", out)
        assert m, "readelf shows no XEN_ELFNOTE_PHYS32_ENTRY note"
        assert int.from_bytes(bytes.fromhex(m.group(1).replace(" ", "")), "little") \
            == elf.pvh_entry
    assert detect(vmlinux, vmlinux_path) == "elf"


def test_cached_vmlinux_is_reused(bz, vmlinux_path, monkeypatch, tmp_path):
    import os
    assert os.path.basename(vmlinux_path).startswith("vmlinux-")
    monkeypatch.setattr(decompress, "extract_vmlinux",
                        lambda bz: pytest.fail("decompressed again despite the cache"))
    assert cached_vmlinux(bz, os.path.dirname(vmlinux_path)) == (vmlinux_path, True)


def test_an_elf_parsed_from_a_mapping_keeps_views_and_loads_the_same(vmlinux, vmlinux_path):
    # --fast-boot maps the cached vmlinux: segments must be zero-copy views with the same bytes
    import mmap
    from_bytes = ElfImage.parse(vmlinux, vmlinux_path)
    with open(vmlinux_path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = memoryview(mm)
    elf = ElfImage.parse(view, vmlinux_path)
    try:
        assert all(isinstance(s.data, memoryview) and s.data.obj is mm for s in elf.segments)
        assert [(s.paddr, s.memsz, bytes(s.data)) for s in elf.segments] == \
            [(s.paddr, s.memsz, s.data) for s in from_bytes.segments]
        assert (elf.entry, elf.pvh_entry, elf.notes) == \
            (from_bytes.entry, from_bytes.pvh_entry, from_bytes.notes)
    finally:
        elf = None
        view.release()
        mm.close()


def test_load_returns_the_image_it_parsed(vmlinux, vmlinux_path, raw, debian):
    from kvmpy.loader import load
    kind, elf = load(vmlinux, vmlinux_path)
    assert kind == "elf" and isinstance(elf, ElfImage) and elf.pvh_entry is not None
    kind, bz = load(raw, debian.bzimage)
    assert kind == "bzimage" and bz.payload_length > 0


# --- detection errors ----------------------------------------------------------------------------

def test_detect_real_bzimage(raw, debian):
    assert detect(raw, debian.bzimage) == "bzimage"


def test_detect_empty():
    with pytest.raises(ImageError, match="k.img is empty"):
        detect(b"", "k.img")


def test_detect_random_bytes():
    data = random.Random(1).randbytes(64 * 1024)
    with pytest.raises(ImageError, match=re.escape("junk.bin " + NOT_A_KERNEL)):
        detect(data, "junk.bin")


def test_detect_truncated_bzimage(raw):
    with pytest.raises(ImageError, match="vmlinuz is truncated"):
        detect(raw[:4096], "vmlinuz")
    with pytest.raises(ImageError, match="truncated"):
        detect(raw[:0x200], "vmlinuz")


def test_detect_old_protocol(raw):
    old = bytearray(raw[:64 * 1024])
    struct.pack_into("<H", old, 0x206, 0x0204)
    with pytest.raises(ImageError, match=r"protocol 2\.04 is too old, kvmpy needs >= 2\.06"):
        detect(bytes(old), "old")


def test_detect_32bit_kernel(raw):
    k32 = bytearray(raw)
    struct.pack_into("<H", k32, 0x236, 0)                # XLF_KERNEL_64 clear
    with pytest.raises(ImageError, match="no 64-bit entry point"):
        BzImage.parse(bytes(k32), "k32")


def test_bzimage_with_multiboot_header_is_still_bzimage(raw):
    both = bytearray(raw)
    both[0x1000:0x100C] = _mb_header(0x00000003)
    assert detect(bytes(both), "both") == "bzimage"


def test_truncated_elf(vmlinux):
    with pytest.raises(ImageError, match="truncated"):
        detect(vmlinux[:4096], "vmlinux")


# --- decompression of each format ----------------------------------------------------------------

FAKE_VMLINUX = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def _bz_with_payload(bz: BzImage, compressed: bytes) -> BzImage:
    payload = compressed + struct.pack("<I", len(FAKE_VMLINUX))
    return bz._replace(kernel=b"\x90" * 16 + payload + b"\0" * 12, payload_offset=16,
                       payload_length=len(payload))


@pytest.mark.parametrize("fmt,compress", [
    ("gzip", lambda d: gzip.compress(d, 9)),
    ("bzip2", lambda d: bz2.compress(d, 9)),
    ("lzma", lambda d: lzma.compress(d, lzma.FORMAT_ALONE)),
    ("xz", lambda d: lzma.compress(d, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
])
def test_extract_stdlib_formats(bz, fmt, compress):
    assert extract_vmlinux(_bz_with_payload(bz, compress(FAKE_VMLINUX))) == (fmt, FAKE_VMLINUX)


@pytest.mark.parametrize("fmt,tool,args", [("zstd", "zstd", ["-19", "-c", "-q"]),
                                           ("lz4", "lz4", ["-l", "-9", "-c", "-q"])])
def test_extract_with_tools(bz, fmt, tool, args):
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"no `{tool}` tool to make a {fmt} payload with")
    compressed = subprocess.run([exe, *args], input=FAKE_VMLINUX, capture_output=True,
                                check=True).stdout
    assert extract_vmlinux(_bz_with_payload(bz, compressed)) == (fmt, FAKE_VMLINUX)


def test_extract_without_zstd_says_what_to_install(bz, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "zstandard", None)      # import fails
    monkeypatch.setattr(decompress.shutil, "which", lambda tool: None)
    fake = _bz_with_payload(bz, b"\x28\xb5\x2f\xfd" + bytes(32))
    with pytest.raises(ImageError, match=r"zstd-compressed; install the `zstandard` Python "
                                         r"package .* or the `zstd` tool"):
        extract_vmlinux(fake)


def test_extract_size_mismatch(bz):
    payload = gzip.compress(FAKE_VMLINUX) + struct.pack("<I", len(FAKE_VMLINUX) + 1)
    fake = bz._replace(kernel=payload, payload_offset=0, payload_length=len(payload))
    with pytest.raises(ImageError, match="size word says"):
        extract_vmlinux(fake)


# --- synthetic ELF kernels -----------------------------------------------------------------------

def _elf(bits: int, entry: int, paddr: int, code: bytes, notes: bytes = b"",
         notes_as_section: bool = False, vaddr: int | None = None) -> bytes:
    """A minimal little-endian x86 ELF: one PT_LOAD (code, 0x100 bytes of bss) and optionally
    a PT_NOTE segment or an SHT_NOTE section, laid out by hand per the gABI."""
    vaddr = paddr if vaddr is None else vaddr
    if bits == 64:
        ehsize, phentsize, shentsize, machine = 64, 56, 64, 62
    else:
        ehsize, phentsize, shentsize, machine = 52, 32, 40, 3
    nph = 1 + (1 if notes and not notes_as_section else 0)
    code_off = 0x100
    notes_off = code_off + len(code)
    sh_off = (notes_off + len(notes) + 7) & ~7
    nsh = 2 if notes_as_section else 0
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    if bits == 64:
        eh = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, entry, ehsize,
                         sh_off if nsh else 0, 0, ehsize, phentsize, nph, shentsize, nsh, 0)
        ph = struct.pack("<IIQQQQQQ", 1, 5, code_off, vaddr, paddr, len(code), len(code) + 0x100,
                         0x1000)
        if nph == 2:
            ph += struct.pack("<IIQQQQQQ", 4, 4, notes_off, 0, 0, len(notes), len(notes), 4)
        sh = bytes(64) + struct.pack("<IIQQQQIIQQ", 0, 7, 0, 0, notes_off, len(notes), 0, 0, 4, 0)
    else:
        eh = struct.pack("<16sHHIIIIIHHHHHH", ident, 2, machine, 1, entry, ehsize,
                         sh_off if nsh else 0, 0, ehsize, phentsize, nph, shentsize, nsh, 0)
        ph = struct.pack("<IIIIIIII", 1, code_off, vaddr, paddr, len(code), len(code) + 0x100, 5,
                         0x1000)
        if nph == 2:
            ph += struct.pack("<IIIIIIII", 4, notes_off, 0, 0, len(notes), len(notes), 4, 4)
        sh = bytes(40) + struct.pack("<IIIIIIIIII", 0, 7, 0, 0, notes_off, len(notes), 0, 0, 4, 0)
    out = bytearray((eh + ph).ljust(code_off, b"\0") + code + notes)
    if nsh:
        out = out.ljust(sh_off, b"\0") + sh
    return bytes(out)


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)                       # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


@pytest.mark.parametrize("as_section", [False, True])
def test_elf_pvh_note(as_section):
    notes = _note(b"GNU", 3, bytes(20)) + _note(b"Xen", 18, struct.pack("<I", 0x200010))
    data = _elf(64, 0x200000, 0x200000, b"\xf4" * 64, notes, notes_as_section=as_section)
    elf = ElfImage.parse(data, "k.elf")
    assert elf.pvh_entry == 0x200010
    assert [(s.paddr, s.memsz, s.data) for s in elf.segments] == [(0x200000, 64 + 0x100,
                                                                   b"\xf4" * 64)]
    assert detect(data, "k.elf") == "elf"


def test_elf_pvh_entry_outside_segments():
    notes = _note(b"Xen", 18, struct.pack("<I", 0x900000))
    with pytest.raises(ImageError, match="PVH entry 0x900000 is not inside"):
        ElfImage.parse(_elf(64, 0x200000, 0x200000, b"\xf4" * 64, notes), "k.elf")


def test_elf32_without_pvh_or_multiboot_is_refused():
    with pytest.raises(ImageError, match="32-bit ELF with neither a PVH note nor a multiboot"):
        detect(_elf(32, 0x100000, 0x100000, b"\xf4" * 64), "k32.elf")


# --- multiboot -----------------------------------------------------------------------------------

MB_MAGIC = 0x1BADB002


def _mb_header(flags: int, *addrs: int) -> bytes:
    return struct.pack("<III", MB_MAGIC, flags, -(MB_MAGIC + flags) & 0xFFFFFFFF) + \
        struct.pack(f"<{len(addrs)}I", *addrs)


def _aout_kernel(header_at: int = 0x40, flags: int = 0x00010003) -> bytes:
    load = 0x100000
    size = 0x2000
    image = bytearray(b"\x90" * size)
    hdr = _mb_header(flags, load + header_at, load, load + size - 0x100, load + size + 0x3000,
                     load + 0x80)
    image[header_at:header_at + len(hdr)] = hdr
    return bytes(image)


def test_multiboot_aout_kludge():
    data = _aout_kernel()
    assert detect(data, "mb.bin") == "multiboot"
    mb = MultibootImage.parse(data, "mb.bin")
    assert mb.header_offset == 0x40 and mb.kludge and mb.page_align_modules
    assert mb.entry == 0x100080
    (seg,) = mb.segments
    assert seg.paddr == 0x100000
    assert seg.data == data[:0x2000 - 0x100]                 # load_end_addr - load_addr bytes
    assert seg.memsz == 0x2000 + 0x3000                      # up to bss_end_addr
    assert mb.load_end == 0x105000


def test_multiboot_kludge_file_offset():
    # header 0x1000 into the file, loaded from file offset 0x800: header_addr - load_addr = 0x800
    data = bytearray(b"\xcc" * 0x3000)
    hdr = _mb_header(0x00010000, 0x200800, 0x200000, 0, 0, 0x200000)
    data[0x1000:0x1000 + len(hdr)] = hdr
    mb = MultibootImage.parse(bytes(data), "mb")
    assert mb.segments[0].data == bytes(data[0x800:])         # load_end_addr 0: to end of file
    assert mb.segments[0].memsz == 0x2800


def test_multiboot_bad_checksum_and_too_far():
    bad = bytearray(_aout_kernel())
    bad[0x48] ^= 1
    with pytest.raises(ImageError, match=re.escape(NOT_A_KERNEL)):
        detect(bytes(bad), "bad")
    far = bytearray(0x4000)
    far[0x2000:0x2020] = _mb_header(0x00010000, 0x102000, 0x100000, 0, 0, 0x100000)
    with pytest.raises(ImageError, match=re.escape(NOT_A_KERNEL)):
        detect(bytes(far), "far")


def test_multiboot_unknown_required_flag():
    with pytest.raises(ImageError, match="requires multiboot features 0x0008"):
        MultibootImage.parse(_aout_kernel(flags=0x0001000B), "mb")


def test_multiboot_elf_kernel():
    code = b"\x90" * 0x40 + _mb_header(0x00000002) + b"\xf4" * 0x40
    # linked at a higher-half virtual address, loaded at 1 MiB: the entry becomes physical
    data = _elf(32, 0xC0100000, 0x100000, code, vaddr=0xC0100000)
    assert detect(data, "mb.elf") == "multiboot"
    mb = MultibootImage.parse(data, "mb.elf")
    assert not mb.kludge and mb.entry == 0x100000
    assert mb.segments[0].paddr == 0x100000 and mb.segments[0].data == code


def test_multiboot_info_layout():
    e820 = e820_for([(0, 128 * MIB)])
    base = 0x9000
    blob = build_multiboot_info(base, e820=e820, cmdline_addr=0x20000, initrd_addr=0x7000000,
                                initrd_size=0x1234)
    u32 = lambda off: struct.unpack_from("<I", blob, off)[0]      # noqa: E731

    def cstr(addr: int) -> bytes:
        off = addr - base
        return blob[off:blob.index(b"\0", off)]

    # Multiboot 0.6.96, 3.3: flags[0] mem, [2] cmdline, [3] mods, [6] mmap, [9] loader name
    assert u32(0) == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert u32(4) == 639                                      # 0x9fc00 / 1024
    assert u32(8) == (128 * MIB - MIB) // 1024
    assert u32(16) == 0x20000
    assert u32(20) == 1
    mod = u32(24) - base
    assert struct.unpack_from("<III", blob, mod) == (0x7000000, 0x7001234,
                                                     struct.unpack_from("<I", blob, mod + 8)[0])
    assert cstr(u32(mod + 8)) == b"initrd"
    mmap_len, mmap_addr = u32(44), u32(48)
    entries, off = [], mmap_addr - base
    while off < mmap_addr - base + mmap_len:
        size, addr, length, typ = struct.unpack_from("<IQQI", blob, off)
        assert size == 20
        entries.append((addr, length, typ))
        off += size + 4
    assert entries == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 127 * MIB, 1)]
    assert cstr(u32(64)) == b"kvmpy"


def test_multiboot_info_without_initrd_or_cmdline():
    blob = build_multiboot_info(0x9000, e820=e820_for([(0, 16 * MIB)]))
    flags = struct.unpack_from("<I", blob, 0)[0]
    assert not flags & (1 << 2) and not flags & (1 << 3)
    assert struct.unpack_from("<II", blob, 20) == (0, 0)


# --- PVH start info ------------------------------------------------------------------------------

def test_pvh_start_info_layout():
    e820 = [E820Entry(0, 0x9FC00, E820_RAM), E820Entry(0x9FC00, 0x60400, E820_RESERVED),
            E820Entry(0x100000, 255 * MIB, E820_RAM)]
    base = 0x6000
    blob = build_start_info(base, cmdline_addr=0x20000, e820=e820, initrd_addr=0xF000000,
                            initrd_size=0x5000)
    # start_info.h: magic, version, flags, nr_modules, modlist_paddr (16), cmdline_paddr (24),
    # rsdp_paddr (32), memmap_paddr (40), memmap_entries (48), reserved (52)
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, nmem, _ = \
        struct.unpack_from("<IIIIQQQQII", blob, 0)
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert (cmdline, rsdp, nmem) == (0x20000, 0, 3)
    assert struct.unpack_from("<QQQQ", blob, modlist - base) == (0xF000000, 0x5000, 0, 0)
    got = [struct.unpack_from("<QQII", blob, memmap - base + 24 * i) for i in range(3)]
    assert got == [(0, 0x9FC00, 1, 0), (0x9FC00, 0x60400, 2, 0), (0x100000, 255 * MIB, 1, 0)]
    assert len(blob) == 56 + 32 + 3 * 24


def test_pvh_start_info_without_initrd():
    blob = build_start_info(0x6000, cmdline_addr=0, e820=e820_for([(0, 16 * MIB)]))
    assert struct.unpack_from("<IQ", blob, 12) == (0, 0)       # nr_modules, modlist_paddr
    assert struct.unpack_from("<Q", blob, 40)[0] == 0x6000 + 56
