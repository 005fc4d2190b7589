"""ELF kernels: the loadable segments of a vmlinux (or of a multiboot ELF), and its Xen PVH note.

An ELF kernel is loaded segment by segment: each PT_LOAD's file bytes go to its *physical*
address ``p_paddr`` and the rest of ``p_memsz`` is zeroed. A Linux vmlinux built with CONFIG_PVH
also carries an ELF note, name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), whose descriptor is the
32-bit physical address of its PVH entry ``pvh_start_xen`` (arch/x86/platform/pvh/head.S); the
PVH boot protocol (kvmpy.loader.pvh) enters there.

Layouts: the System V gABI ("ELF header", "Program header", "Sections", "Note Section"), with the
x86-64 and i386 psABI machine numbers. ELF and program headers are read with ``struct``; notes,
a boot-time format kvmpy must get exactly right, with ``construct``.

This module parses; it does not place segments in guest memory or choose an entry protocol.
"""
from __future__ import annotations

import collections
import struct

from construct import Int32ul, Struct
from kvmpy.errors import ImageError
from kvmpy.loader import ELF_MAGIC

# gABI "ELF Identification": e_ident[]
EI_CLASS, EI_DATA = 4, 5
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
# gABI "ELF Header" e_machine (and the psABIs): EM_386 = 3, EM_X86_64 = 62
EM_386, EM_X86_64 = 3, 62
# gABI "Program Header" p_type, "Sections" sh_type
PT_LOAD, PT_NOTE = 1, 4
SHT_NOTE = 7
# xen/include/public/elfnote.h: "XEN_ELFNOTE_PHYS32_ENTRY 18", the PVH 32-bit physical entry
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen"

_EHDR = {ELFCLASS32: struct.Struct("<16sHHIIIIIHHHHHH"),   # Elf32_Ehdr, 52 bytes
         ELFCLASS64: struct.Struct("<16sHHIQQQIHHHHHH")}   # Elf64_Ehdr, 64 bytes
# Elf32_Phdr: type, offset, vaddr, paddr, filesz, memsz, flags, align
_PHDR32 = struct.Struct("<IIIIIIII")
# Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz, memsz, align
_PHDR64 = struct.Struct("<IIQQQQQQ")
# Elf32_Shdr / Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
_SHDR = {ELFCLASS32: struct.Struct("<IIIIIIIIII"), ELFCLASS64: struct.Struct("<IIQQQQIIQQ")}

# gABI "Note Section": namesz, descsz, type, then name and desc, each padded to 4 bytes
# (8 in a segment aligned to 8).
NoteHeader = Struct("namesz" / Int32ul, "descsz" / Int32ul, "type" / Int32ul)


# The records below are namedtuples, not dataclasses: dataclasses (and the inspect module they
# import) cost `kvmpy boot` milliseconds of startup (benchmarks/boot).
class Segment(collections.namedtuple("Segment", "paddr memsz data vaddr flags",
                                     defaults=(0, 0))):
    """``data`` goes to guest-physical ``paddr``; bytes ``len(data)..memsz`` are zeroed."""

    __slots__ = ()

    def __repr__(self) -> str:      # without ``data``: a vmlinux segment is megabytes
        return (f"Segment(paddr={self.paddr:#x}, memsz={self.memsz:#x}, vaddr={self.vaddr:#x}, "
                f"flags={self.flags:#x})")

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


Note = collections.namedtuple("Note", "name type desc")   # name: bytes, type: int, desc: bytes


class ElfImage(collections.namedtuple("ElfImage", "path bits machine entry segments notes "
                                      "pvh_entry")):
    """An ELF kernel: ``bits`` 32 or 64, ``machine`` EM_386 or EM_X86_64, ``entry`` its e_entry
    as linked (a vmlinux's is physical: startup_64), ``segments`` and ``notes`` tuples of Segment
    and Note, ``pvh_entry`` the XEN_ELFNOTE_PHYS32_ENTRY address or None without a PVH note."""

    __slots__ = ()

    @property
    def load_end(self) -> int:
        """One past the highest byte any PT_LOAD segment occupies."""
        return max(s.end for s in self.segments)

    @classmethod
    def parse(cls, data: bytes, path: str) -> "ElfImage":
        if data[:4] != ELF_MAGIC:
            raise ImageError(f"{path} is not an ELF file (no \\x7fELF magic)")
        if len(data) < 6:
            raise ImageError(f"{path} is truncated: {len(data)} bytes of ELF header")
        klass = data[EI_CLASS]
        if klass not in _EHDR:
            raise ImageError(f"{path}: unknown ELF class {klass}; the file is corrupt")
        if data[EI_DATA] != ELFDATA2LSB:
            raise ImageError(f"{path} is a big-endian ELF; kvmpy boots x86 kernels only")
        ehdr = _EHDR[klass]
        if len(data) < ehdr.size:
            raise ImageError(f"{path} is truncated: {len(data)} bytes, shorter than its ELF "
                             "header; copy the kernel again")
        (_, _, machine, _, entry, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
         _) = ehdr.unpack_from(data)
        if machine not in (EM_386, EM_X86_64):
            raise ImageError(f"{path} is an ELF for machine {machine}, not x86 (EM_386 = 3, "
                             "EM_X86_64 = 62); use an x86 kernel")
        bits = 64 if klass == ELFCLASS64 else 32
        phdr = _PHDR64 if bits == 64 else _PHDR32
        if phnum == 0:
            raise ImageError(f"{path} has no program headers: it is not a loadable ELF kernel")
        if phentsize < phdr.size or phoff + phnum * phentsize > len(data):
            raise ImageError(f"{path} is truncated: its program headers run past the end of the "
                             "file; copy the kernel again")

        segments: list[Segment] = []
        notes: list[Note] = []
        for i in range(phnum):
            fields = phdr.unpack_from(data, phoff + i * phentsize)
            if bits == 64:
                p_type, p_flags, off, vaddr, paddr, filesz, memsz, align = fields
            else:
                p_type, off, vaddr, paddr, filesz, memsz, p_flags, align = fields
            if p_type not in (PT_LOAD, PT_NOTE):
                continue
            if off + filesz > len(data):
                raise ImageError(f"{path} is truncated: segment {i} ({off:#x}+{filesz:#x}) runs "
                                 f"past the end of the file ({len(data):#x}); copy it again")
            if p_type == PT_LOAD:
                if filesz > memsz:
                    raise ImageError(f"{path}: segment {i} has p_filesz {filesz:#x} > p_memsz "
                                     f"{memsz:#x}; the ELF is corrupt")
                if memsz:    # a slice: a copy of bytes, a view of a memoryview (mmap)
                    segments.append(Segment(paddr, memsz, data[off:off + filesz], vaddr,
                                            p_flags))
            else:
                notes += _parse_notes(data[off:off + filesz], 8 if align == 8 else 4, path)
        if not segments:
            raise ImageError(f"{path} has no PT_LOAD segments: nothing to load")
        if not notes:
            notes = _section_notes(data, klass, shoff, shentsize, shnum, path)

        pvh_entry = None
        for note in notes:
            if note.name == XEN_NOTE_NAME and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
                # Xen's ABI is a 32-bit address; Linux emits it as a .quad on x86-64
                # (_ASM_PTR in arch/x86/platform/pvh/head.S), so accept 4 or 8 bytes.
                if len(note.desc) not in (4, 8):
                    raise ImageError(f"{path}: the Xen PHYS32_ENTRY note has a {len(note.desc)}"
                                     "-byte descriptor (expected 4 or 8); the ELF is corrupt")
                pvh_entry = int.from_bytes(note.desc, "little")
                if pvh_entry >= 1 << 32 or not any(s.paddr <= pvh_entry < s.end
                                                   for s in segments):
                    raise ImageError(f"{path}: PVH entry {pvh_entry:#x} is not inside any "
                                     "loaded segment below 4 GiB; the ELF is corrupt")
                break
        return cls(path, bits, machine, entry, tuple(segments), tuple(notes), pvh_entry)


def _parse_notes(blob: bytes, align: int, path: str) -> list[Note]:
    notes = []
    pos = 0
    hsize = NoteHeader.sizeof()

    def pad(n: int) -> int:
        return (n + align - 1) & ~(align - 1)

    while pos + hsize <= len(blob):
        h = NoteHeader.parse(bytes(blob[pos:pos + hsize]))
        name_at = pos + hsize
        desc_at = name_at + pad(h.namesz)
        end = desc_at + pad(h.descsz)
        if desc_at + h.descsz > len(blob):
            raise ImageError(f"{path}: an ELF note runs past its segment; the ELF is corrupt")
        name = bytes(blob[name_at:name_at + h.namesz]).rstrip(b"\0")
        notes.append(Note(name, h.type, bytes(blob[desc_at:desc_at + h.descsz])))
        pos = end
    return notes


def _section_notes(data: bytes, klass: int, shoff: int, shentsize: int, shnum: int,
                   path: str) -> list[Note]:
    """Notes from SHT_NOTE sections (e.g. ``.notes``), for an ELF without PT_NOTE segments."""
    shdr = _SHDR[klass]
    if shoff == 0 or shnum == 0 or shentsize < shdr.size or shoff + shnum * shentsize > len(data):
        return []
    notes: list[Note] = []
    for i in range(shnum):
        _, sh_type, _, _, off, size, _, _, align, _ = shdr.unpack_from(data, shoff + i * shentsize)
        if sh_type == SHT_NOTE and off + size <= len(data):
            notes += _parse_notes(data[off:off + size], 8 if align == 8 else 4, path)
    return notes
