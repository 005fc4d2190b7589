"""Code addresses to symbol names (``startup_64+0x1a``), for exit traces.

A :class:`SymbolTable` comes from a ``System.map`` (``nm -n`` output: ``ffffffff81000000 T
_text``) or from an ELF file's ``.symtab`` (a vmlinux, a multiboot kernel, a guest linked with
``ld``), read with :mod:`struct` (ELF: the System V gABI, "Sections" and "Symbol Table").
Lookup bisects a sorted list of start addresses.

Only code is named: text symbols of a System.map (types T, t, W, w) and ELF symbols of
executable sections, because what gets looked up is a RIP. An ELF symbol covers its ``st_size``
bytes, or, without a size (assembler labels), up to the next symbol or the end of its section.
A System.map has no sizes: each symbol covers up to the next one, and the highest (``_end`` or
``_etext`` in a kernel's map) names only its own address.

A kernel runs at its physical load address before it turns paging on, so a RIP may be physical
while the symbols are virtual. For an ELF the program headers say where each segment sits
physically (``p_paddr``), and such a RIP is named through them; for a System.map of an x86-64
kernel (symbols at or above ``__START_KERNEL_map``) a low RIP is tried at ``RIP +
__START_KERNEL_map``. Neither holds for a kernel that relocated itself (KASLR): boot it with
``nokaslr`` to get names.

Not here: DWARF (file and line), data symbols, symbols of modules loaded later.
"""
from __future__ import annotations

import bisect
import os
import struct

from kvmpy.errors import KvmpyError

# arch/x86/include/asm/page_64_types.h: the virtual address of physical 0 in the kernel map
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000

_MAP_CODE_TYPES = frozenset("TtWw")   # nm(1): text, and weak symbols not tagged as objects

# ELF constants (System V gABI; include/uapi/linux/elf.h)
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32, _ELFCLASS64 = 1, 2
_ELFDATA2LSB, _ELFDATA2MSB = 1, 2
_SHT_SYMTAB = 2
_SHF_EXECINSTR = 0x4
_SHN_UNDEF, _SHN_LORESERVE = 0, 0xFF00
_STT_NOTYPE, _STT_OBJECT, _STT_FUNC = 0, 1, 2
_STB_LOCAL, _STB_GLOBAL, _STB_WEAK = 0, 1, 2
_PT_LOAD = 1

# (header after e_ident, section header, program header, symbol) layouts per class
_LAYOUTS = {
    _ELFCLASS64: ("HHIQQQIHHHHHH", "IIQQQQIIQQ", "IIQQQQQQ", "IBBHQQ"),
    _ELFCLASS32: ("HHIIIIIHHHHHH", "IIIIIIIIII", "IIIIIIII", "IIIBBH"),
}


class SymbolsError(KvmpyError):
    """A symbol source that cannot be read."""


class SymbolTable:
    """Sorted code symbols; :meth:`lookup` names an address as ``name+0xoff``."""

    def __init__(self, symbols, aliases=(), source: str = "") -> None:
        """``symbols``: (start, end, name, rank) tuples; at one start the highest rank wins.
        ``aliases``: (lo, hi, delta) ranges whose addresses are also tried at address + delta.
        """
        best: dict[int, tuple] = {}
        for start, end, name, rank in symbols:
            old = best.get(start)
            if old is None or rank > old[2] or (rank == old[2] and end > old[0]):
                best[start] = (end, name, rank)
        self._starts = sorted(best)
        self._ends = [best[s][0] for s in self._starts]
        self._names = [best[s][1] for s in self._starts]
        self._aliases = [a for a in aliases if a[2] != 0]
        self.source = source

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"<SymbolTable {self.source or '?'}: {len(self)} symbols>"

    def lookup(self, addr: int | None) -> str | None:
        """``name+0xoff`` of the symbol covering ``addr``, or None."""
        if addr is None:
            return None
        hit = self._find(addr)
        if hit is None:
            for lo, hi, delta in self._aliases:
                if lo <= addr < hi:
                    hit = self._find(addr + delta)
                    if hit is not None:
                        break
        return hit

    def _find(self, addr: int) -> str | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self._ends[i]:
            return None
        return f"{self._names[i]}+{addr - self._starts[i]:#x}"


# -- loading --------------------------------------------------------------------------------

def load(path: str | os.PathLike) -> SymbolTable:
    """Symbols from ``path``: an ELF file with a symbol table, or a System.map."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if head == _ELF_MAGIC:
                table = _load_elf(f, path)
                if table is None:
                    raise SymbolsError(f"{path} is an ELF file without a symbol table (stripped?); "
                                       "pass its System.map or an unstripped image")
            else:
                table = _load_system_map(f, path)
    except OSError as e:
        raise SymbolsError(f"cannot read symbols from {path}: {e.strerror}") from None
    if not table:
        raise SymbolsError(f"no code symbols in {path}: expected a System.map "
                           "(`ffffffff81000000 T _text` lines) or an ELF file with .symtab")
    return table


def from_image(path: str | os.PathLike) -> SymbolTable | None:
    """The symbols of a kernel or guest image if it is an ELF file that has code symbols, else
    None (a bzImage, a flat binary, a stripped ELF): for using an image's own symbols by default.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != _ELF_MAGIC:
                return None
            f.seek(0)
            table = _load_elf(f, path)
    except (OSError, SymbolsError):
        return None
    return table if table else None


def parse_system_map(text: str, source: str = "System.map") -> SymbolTable:
    """A System.map's text: ``ADDRESS TYPE NAME`` per line; other lines are ignored."""
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) != 1 or parts[1] not in _MAP_CODE_TYPES:
            continue
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        name = parts[2]
        entries.append((addr, name, _rank(name, parts[1].isupper(), True)))
    entries.sort(key=lambda e: e[0])
    starts = sorted({e[0] for e in entries})
    nxt = {s: n for s, n in zip(starts, starts[1:])}
    symbols = [(a, nxt.get(a, a + 1), name, rank) for a, name, rank in entries]
    aliases = []
    if starts and starts[0] >= START_KERNEL_MAP:
        # an x86-64 kernel map: physical RIPs (before paging) name through the kernel mapping
        aliases.append((starts[0] - START_KERNEL_MAP, starts[-1] + 1 - START_KERNEL_MAP,
                        START_KERNEL_MAP))
    return SymbolTable(symbols, aliases, source)


def _load_system_map(f, path: str) -> SymbolTable:
    return parse_system_map(f.read().decode("utf-8", "replace"), path)


def _rank(name: str, is_global: bool, is_func: bool) -> tuple:
    # Several names at one address (`_text` and `startup_64`): prefer a function, then a name
    # that is not a linker-made marker (leading underscore), then a global one.
    return (is_func, not name.startswith("_"), is_global)


def _load_elf(f, path: str) -> SymbolTable | None:
    """Symbols of an ELF file, or None when it has no .symtab. Every offset read from the file
    is checked against its size: the file is input, not trusted."""
    size = os.fstat(f.fileno()).st_size
    ident = _read(f, 0, 16, size, path)
    cls, data = ident[4], ident[5]
    if cls not in _LAYOUTS or data not in (_ELFDATA2LSB, _ELFDATA2MSB):
        raise SymbolsError(f"{path}: unsupported ELF class {cls} / data encoding {data}")
    end = "<" if data == _ELFDATA2LSB else ">"
    hdr_fmt, sh_fmt, ph_fmt, sym_fmt = (struct.Struct(end + x) for x in _LAYOUTS[cls])
    (_type, _machine, _version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, _shstrndx) = hdr_fmt.unpack(_read(f, 16, hdr_fmt.size, size, path))
    if not shoff:
        return None
    if shentsize < sh_fmt.size:
        raise SymbolsError(f"{path}: bad ELF section header size {shentsize}")
    if shnum == 0:   # extended numbering: the count is in section 0's sh_size
        shnum = sh_fmt.unpack(_read(f, shoff, sh_fmt.size, size, path))[5]
    if shnum > 0x100000:
        raise SymbolsError(f"{path}: implausible ELF section count {shnum}")
    table = _read(f, shoff, shnum * shentsize, size, path)
    sections = [sh_fmt.unpack_from(table, i * shentsize) for i in range(shnum)]
    # (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, align, entsize)
    symtab = next((s for s in sections if s[1] == _SHT_SYMTAB), None)
    if symtab is None:
        return None
    entsize = symtab[9] or sym_fmt.size
    if entsize < sym_fmt.size or symtab[6] >= shnum:
        raise SymbolsError(f"{path}: malformed .symtab header")
    strtab_sec = sections[symtab[6]]
    strtab = _read(f, strtab_sec[4], strtab_sec[5], size, path)
    raw = _read(f, symtab[4], symtab[5], size, path)

    symbols = []
    for off in range(0, len(raw) - entsize + 1, entsize):
        if cls == _ELFCLASS64:
            st_name, st_info, _other, shndx, value, st_size = sym_fmt.unpack_from(raw, off)
        else:
            st_name, value, st_size, st_info, _other, shndx = sym_fmt.unpack_from(raw, off)
        stype, bind = st_info & 0xF, st_info >> 4
        if (shndx == _SHN_UNDEF or shndx >= _SHN_LORESERVE or shndx >= shnum
                or stype not in (_STT_NOTYPE, _STT_FUNC, _STT_OBJECT)):
            continue
        sec = sections[shndx]
        if not sec[2] & _SHF_EXECINSTR:
            continue
        name = _cstr(strtab, st_name)
        if not name or name.startswith(".L") or name.startswith("$"):
            continue   # assembler-local labels, ARM mapping symbols
        sec_end = sec[3] + sec[5]
        stop = value + st_size if st_size else sec_end
        symbols.append((value, max(stop, value + 1), name,
                        _rank(name, bind in (_STB_GLOBAL, _STB_WEAK), stype == _STT_FUNC)))

    aliases = []
    if phoff and phnum and phentsize >= ph_fmt.size:
        ph = _read(f, phoff, phnum * phentsize, size, path)
        for i in range(phnum):
            fields = ph_fmt.unpack_from(ph, i * phentsize)
            if cls == _ELFCLASS64:
                p_type, _pf, _po, vaddr, paddr, _fsz, memsz, _al = fields
            else:
                p_type, _po, vaddr, paddr, _fsz, memsz, _pf, _al = fields
            if p_type == _PT_LOAD and memsz and paddr != vaddr:
                aliases.append((paddr, paddr + memsz, vaddr - paddr))
    return SymbolTable(symbols, aliases, path)


def _read(f, offset: int, n: int, size: int, path: str) -> bytes:
    if offset < 0 or n < 0 or offset + n > size:
        raise SymbolsError(f"{path}: truncated or malformed ELF file (needs bytes "
                           f"{offset:#x}-{offset + n:#x}, file is {size:#x} bytes)")
    f.seek(offset)
    return f.read(n)


def _cstr(table: bytes, off: int) -> str:
    if off >= len(table):
        return ""
    end = table.find(b"\0", off)
    return table[off:end if end >= 0 else len(table)].decode("utf-8", "replace")
