"""A writer for the Linux initramfs format: a cpio "newc" archive, optionally gzip-compressed.

The format is Linux's Documentation/driver-api/early-userspace/buffer-format.rst (the SVR4
"new ASCII" cpio format, magic ``070701``): each entry is a 110-byte header of thirteen 8-digit
hex fields, the NUL-terminated name padded so that header + name is a multiple of 4, then the
data padded to a multiple of 4. A symlink's data is its target. The archive ends with an entry
named ``TRAILER!!!``.

Output is deterministic: entries are written sorted by name (so a directory always precedes what
it holds), every entry has the same mtime, uid/gid 0, and inode numbers are assigned 1, 2, 3...
in that order. Files given by path are read while writing (streamed, not held in memory).

What this module does not do: hard links (every file has nlink 1), block devices, reading
archives (the tests use GNU cpio for that), or choosing what goes into a guest (kvmpy/image.py).
"""
from __future__ import annotations

import gzip
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import BinaryIO

from kvmpy.errors import KvmpyError

MAGIC = b"070701"               # buffer-format.rst: "070701" for the newc format
TRAILER = "TRAILER!!!"          # buffer-format.rst: the name of the terminating entry
HEADER_SIZE = 110               # 6-byte magic + 13 fields of 8 hex digits
MAX_FIELD = 0xFFFF_FFFF         # 8 hex digits
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits (S_IFREG, S_IFDIR, ...)."""
    name: str                   # relative path, e.g. "bin/busybox" (no leading "/")
    mode: int
    data: bytes = b""           # file contents or symlink target, unless ``source`` is set
    source: str | None = None   # a host file whose contents are read at write time
    rdev: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> str:
        return {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
                stat.S_IFCHR: "chardev"}[stat.S_IFMT(self.mode)]


def _clean_name(path: str) -> str:
    """Archive names are relative ("bin/sh"); "/bin/sh" and "./bin/sh" mean the same."""
    if "\0" in path:
        raise ValueError(f"NUL in archive path {path!r}")
    name = posixpath.normpath("/" + path).lstrip("/")
    if not name or name == ".":
        raise ValueError(f"archive path {path!r} names the root")
    if name == TRAILER:
        raise ValueError(f"archive path {path!r} is the trailer's name")
    return name


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioArchive:
    """Entries collected in any order, written sorted and deterministically by :meth:`write`.

    Parent directories are added (mode 0755) for any path whose parents were not added
    explicitly, since the kernel does not create them while unpacking.
    """

    def __init__(self, mtime: int = 0):
        if not 0 <= mtime <= MAX_FIELD:
            raise ValueError(f"mtime {mtime} does not fit the 8-hex-digit field")
        self.mtime = mtime
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return _clean_name(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """Every entry, in the order :meth:`write` writes them."""
        return [self._entries[k] for k in sorted(self._entries)]

    def _add(self, entry: Entry) -> None:
        old = self._entries.get(entry.name)
        if old is not None:
            if old.kind == "dir" and entry.kind == "dir":
                self._entries[entry.name] = entry      # an explicit mode wins over the implied
                return
            raise ValueError(f"{entry.name!r} added twice ({old.kind}, then {entry.kind})")
        parent = posixpath.dirname(entry.name)
        if parent:
            if parent in self._entries:
                if self._entries[parent].kind != "dir":
                    raise ValueError(f"{entry.name!r}: parent {parent!r} is not a directory")
            else:
                self._add(Entry(parent, stat.S_IFDIR | 0o755))
        self._entries[entry.name] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(Entry(_clean_name(path), stat.S_IFDIR | stat.S_IMODE(mode)))

    def add_file(self, path: str, data: bytes | None = None, *, source: str | None = None,
                 mode: int = 0o644) -> None:
        """A regular file with ``data``, or with the contents of host file ``source``."""
        if (data is None) == (source is None):
            raise ValueError("add_file needs exactly one of data and source")
        self._add(Entry(_clean_name(path), stat.S_IFREG | stat.S_IMODE(mode),
                        data=bytes(data or b""), source=source))

    def add_symlink(self, path: str, target: str) -> None:
        if not target or "\0" in target:
            raise ValueError(f"bad symlink target {target!r} for {path!r}")
        self._add(Entry(_clean_name(path), stat.S_IFLNK | 0o777, data=target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character device node: /dev/console is 5:1, /dev/null 1:3, /dev/ttyS0 4:64 (Linux
        Documentation/admin-guide/devices.txt)."""
        for v in (major, minor):
            if not 0 <= v <= MAX_FIELD:
                raise ValueError(f"device number {v} out of range for {path!r}")
        self._add(Entry(_clean_name(path), stat.S_IFCHR | stat.S_IMODE(mode),
                        rdev=(major, minor)))

    def write(self, out: BinaryIO, compress: bool = False) -> None:
        """Write the archive to ``out`` (gzip-compressed, with a fixed gzip header, if asked)."""
        if compress:
            # filename="" and a fixed mtime keep the gzip header free of the host's name and time.
            with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9,
                               mtime=self.mtime) as gz:
                self._write(gz)
        else:
            self._write(out)

    def _write(self, out: BinaryIO) -> None:
        for ino, entry in enumerate(self.entries(), start=1):
            if entry.source is None:
                self._header(out, entry.name, entry.mode, ino, len(entry.data), entry.rdev)
                out.write(entry.data)
                out.write(_pad4(len(entry.data)))
            else:
                self._write_source(out, entry, ino)
        self._header(out, TRAILER, 0, 0, 0, (0, 0), nlink=1, mtime=0)

    def _write_source(self, out: BinaryIO, entry: Entry, ino: int) -> None:
        try:
            f = open(entry.source, "rb")
        except OSError as e:
            raise KvmpyError(f"cannot read {entry.source} for {entry.name}: {e.strerror}") from e
        with f:
            size = os.fstat(f.fileno()).st_size
            self._header(out, entry.name, entry.mode, ino, size, entry.rdev)
            left = size
            while left:
                chunk = f.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise KvmpyError(f"{entry.source} shrank while being archived")
                out.write(chunk)
                left -= len(chunk)
        out.write(_pad4(size))

    def _header(self, out: BinaryIO, name: str, mode: int, ino: int, size: int,
                rdev: tuple[int, int], nlink: int | None = None, mtime: int | None = None) -> None:
        if size > MAX_FIELD:
            raise KvmpyError(f"{name} is {size} bytes: newc cpio holds at most 4 GiB per file")
        encoded = name.encode() + b"\0"
        if nlink is None:
            nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            ino,                                    # c_ino
            mode,                                   # c_mode
            0, 0,                                   # c_uid, c_gid
            nlink,                                  # c_nlink
            self.mtime if mtime is None else mtime,  # c_mtime
            size,                                   # c_filesize
            0, 0,                                   # c_maj, c_min (the archive's own device)
            rdev[0], rdev[1],                       # c_rmaj, c_rmin (a device node's number)
            len(encoded),                           # c_namesize, including the NUL
            0,                                      # c_chksum (only for "070702")
        )
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        out.write(header)
        out.write(encoded)
        out.write(_pad4(HEADER_SIZE + len(encoded)))


def write_archive(archive: CpioArchive, path: str, compress: bool = False) -> None:
    """Write ``archive`` to ``path`` atomically (a temporary file renamed into place)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            archive.write(f, compress=compress)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
