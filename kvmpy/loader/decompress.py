"""Decompress a bzImage's payload into the vmlinux ELF it carries, for ``--fast-boot``.

The payload (boot.rst, payload_offset/payload_length) is the kernel's ``vmlinux.bin`` (an ELF,
``objcopy -R .comment -S vmlinux``, with its relocations appended when the kernel is relocatable)
compressed by one of the formats Kconfig's KERNEL_* choice offers, followed by its uncompressed
size as a 4-byte little-endian word (scripts/Makefile.lib, ``size_append``). The format is told by
the payload's magic (lib/decompress.c, ``compressed_formats``):

    gzip   1f 8b            zlib (gzip wrapper)
    bzip2  42 5a 68 "BZh"   bz2
    lzma   5d 00 00         lzma, FORMAT_ALONE
    xz     fd 37 7a 58 5a 00  lzma, FORMAT_XZ (the kernel's xz uses the x86 BCJ filter)
    lz4    02 21 4c 18      legacy lz4 frames: the `lz4` package, else the `lz4` tool
    zstd   28 b5 2f fd      the `zstandard` package, else the `zstd` tool
    lzo    89 4c 5a 4f      not supported

Decompression uses stream decompressors that stop at the end of the compressed stream, so the
size word (and anything after it) is never fed to them as data; the result's length is then
checked against that word.

Decompressed kernels are cached by the SHA-256 of the payload (:func:`cached_vmlinux`). This
module does not parse the ELF (kvmpy.loader.elf) or load it.
"""
from __future__ import annotations

import bz2
import hashlib
import os
import shutil
import subprocess
import tempfile
import zlib
import lzma

from kvmpy.errors import ImageError
from kvmpy.loader import ELF_MAGIC
from kvmpy.loader.bzimage import BzImage

# lib/decompress.c compressed_formats (first two bytes) and each format's full magic
MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (ELF_MAGIC, "none"),
)
SIZE_WORD = 4                       # scripts/Makefile.lib size_append: 4-byte LE size
LZ4_LEGACY_MAGIC = 0x184C2102       # lz4 frame format doc, "Legacy frame"
LZ4_LEGACY_BLOCK = 8 << 20          # lib/decompress_unlz4.c: LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE


def payload_format(payload: bytes) -> str:
    for magic, name in MAGICS:
        if payload.startswith(magic):
            return name
    return "unknown"


def extract_vmlinux(bz: BzImage) -> tuple[str, bytes]:
    """``(format, vmlinux bytes)`` from ``bz``'s payload; ImageError if it cannot be done."""
    payload = bz.payload
    fmt = payload_format(payload)
    if fmt == "none":
        return fmt, payload
    if fmt in ("unknown", "lzo"):
        what = "LZO" if fmt == "lzo" else f"an unknown format (magic {payload[:6].hex()})"
        raise ImageError(f"{bz.path}: the kernel payload is compressed with {what}, which kvmpy "
                         "cannot decompress; boot without --fast-boot or use a gzip/xz/zstd "
                         "kernel")
    try:
        out = _DECOMPRESSORS[fmt](payload, bz.path)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise ImageError(f"{bz.path}: the {fmt} payload does not decompress ({e}); the image is "
                         "corrupt") from None
    expected = int.from_bytes(payload[-SIZE_WORD:], "little")
    if len(out) != expected:
        raise ImageError(f"{bz.path}: the {fmt} payload decompressed to {len(out)} bytes but its "
                         f"size word says {expected}; the image is corrupt")
    if not out.startswith(ELF_MAGIC):
        raise ImageError(f"{bz.path}: the decompressed payload is not an ELF (starts with "
                         f"{out[:4].hex()}); boot without --fast-boot")
    return fmt, out


def cached_vmlinux(bz: BzImage, cache_dir: str) -> tuple[str, bool]:
    """``(path, cached)``: ``bz``'s decompressed vmlinux under ``cache_dir``, named by the
    payload's SHA-256, decompressed (and written atomically) only the first time; ``cached``
    says it was there already."""
    digest = hashlib.sha256(bz.payload).hexdigest()
    path = os.path.join(cache_dir, f"vmlinux-{digest}")
    if os.path.exists(path):
        return path, True
    _, vmlinux = extract_vmlinux(bz)
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".vmlinux-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(vmlinux)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path, False


def _stream(d, payload: bytes, fmt: str) -> bytes:
    out = d.decompress(payload)
    if not d.eof:
        raise ValueError(f"the {fmt} stream ends early (truncated)")
    return out


def _gzip(payload: bytes, path: str) -> bytes:
    return _stream(zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), payload, "gzip")


def _xz(payload: bytes, path: str) -> bytes:
    return _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), payload, "xz")


def _lzma(payload: bytes, path: str) -> bytes:
    return _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), payload, "lzma")


def _bzip2(payload: bytes, path: str) -> bytes:
    return _stream(bz2.BZ2Decompressor(), payload, "bzip2")


def _zstd(payload: bytes, path: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        return _tool("zstd", payload[:-SIZE_WORD], path, "zstandard")
    d = zstandard.ZstdDecompressor().decompressobj()
    out = d.decompress(payload[:-SIZE_WORD])
    return out


def _lz4(payload: bytes, path: str) -> bytes:
    try:
        import lz4.block
    except ImportError:
        return _tool("lz4", payload[:-SIZE_WORD], path, "lz4")
    # Legacy frame: the magic, then blocks of [u32 compressed size][data], each at most 8 MiB
    # uncompressed; concatenated frames repeat the magic (lib/decompress_unlz4.c).
    data = memoryview(payload)[:-SIZE_WORD]
    pos, out = 0, []
    while pos + 4 <= len(data):
        word = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4
        if word == LZ4_LEGACY_MAGIC:
            continue
        if word == 0 or pos + word > len(data):
            raise ValueError(f"lz4 block of {word} bytes at {pos - 4:#x} runs past the payload")
        out.append(lz4.block.decompress(bytes(data[pos:pos + word]),
                                        uncompressed_size=LZ4_LEGACY_BLOCK))
        pos += word
    return b"".join(out)


def _tool(tool: str, data: bytes, path: str, pypkg: str) -> bytes:
    exe = shutil.which(tool)
    if exe is None:
        raise ImageError(f"{path}: the kernel payload is {tool}-compressed; install the "
                         f"`{pypkg}` Python package (pip install {pypkg}) or the `{tool}` tool "
                         f"(apt-get install {tool}), or boot without --fast-boot")
    p = subprocess.run([exe, "-d", "-c", "-q"], input=data, capture_output=True)
    if p.returncode != 0:
        last = (p.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise OSError(f"{tool} -d failed: {last}")
    return p.stdout


_DECOMPRESSORS = {"gzip": _gzip, "xz": _xz, "lzma": _lzma, "bzip2": _bzip2, "zstd": _zstd,
                  "lz4": _lz4}
