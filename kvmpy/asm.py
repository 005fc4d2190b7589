"""Assemble small guests from GNU assembler source into flat binaries (``as`` + ``ld``).

Used to build the bundled demo guest when kvmpy is built, and by the test suite for its guests.
Sources are assembled with ``as --64`` (switch with ``.code16``/``.code32``/``.code64``) and
linked with ``-Ttext=BASE --oformat=binary``, so the first byte of ``.text`` lands at BASE.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from kvmpy.errors import KvmpyError


def assemble(source: str, base: int, defines: dict[str, int] | None = None) -> bytes:
    """Assemble ``source`` (text) into a flat binary whose first byte is at address ``base``."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise KvmpyError(f"`{tool}` is not installed; install binutils (apt-get install "
                             "binutils) to assemble guests")
    with tempfile.TemporaryDirectory(prefix="kvmpy-asm-") as d:
        src, obj, out = (os.path.join(d, n) for n in ("g.S", "g.o", "g.bin"))
        with open(src, "w") as f:
            for k, v in (defines or {}).items():
                f.write(f".set {k}, {v:#x}\n")
            f.write(source)
            f.write("\n")
        _run(["as", "--64", "-o", obj, src])
        _run(["ld", "-m", "elf_x86_64", "-nostdlib", "-N", f"-Ttext={base:#x}", "-e", f"{base:#x}",
              "--oformat=binary", "-o", out, obj])
        with open(out, "rb") as f:
            return f.read()


def assemble_file(path: str, base: int, out_path: str | None = None) -> bytes:
    with open(path) as f:
        code = assemble(f.read(), base)
    if out_path:
        with open(out_path, "wb") as f:
            f.write(code)
    return code


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise KvmpyError(f"{cmd[0]} failed: {p.stderr.strip()}")
