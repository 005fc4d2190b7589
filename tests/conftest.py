"""Shared test helpers: guests assembled from tests/guests/*.S and a `kvmpy` runner. (The hwvirt
marker and its skip come from kvmpy's own pytest plugin, kvmpy/pytest_plugin.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.asm import assemble

GUESTS = Path(__file__).parent / "guests"
# Real-Linux (hwvirt) tests multiply their timeouts by this: tests/nested/hwvirt_in_qemu.py runs
# them under emulation, ~20-40x slower than on VT-x/AMD-V hardware.
TIME_SCALE = float(os.environ.get("KVMPY_TEST_TIME_SCALE", "1"))


def T(seconds: float) -> float:
    """``seconds`` of a hwvirt test's timeout, scaled by KVMPY_TEST_TIME_SCALE."""
    return seconds * TIME_SCALE
LIB16 = (GUESTS / "lib16.inc").read_text()


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(scope="session")
def build_guest(guest_dir):
    """build_guest(name, base, source=None) -> path of the flat binary of tests/guests/NAME.S
    (or of ``source``), assembled for load address ``base``. Real-mode guests get lib16.inc."""
    cache: dict = {}

    def build(name: str, base: int = 0x7C00, source: str | None = None) -> str:
        key = (name, base, source)
        if key not in cache:
            text = source if source is not None else (GUESTS / f"{name}.S").read_text()
            text = LIB16 + "\n" + text
            out = guest_dir / f"{name}-{base:x}.bin"
            out.write_bytes(assemble(text, base))
            cache[key] = str(out)
        return cache[key]

    return build


def pvh_kernel(name: str, out_dir: Path, text: int = 0x100000,
               defsyms: dict[str, int] | None = None) -> Path:
    """tests/guests/NAME.S (a PVH_ENTRY guest, after lib16.inc) assembled (with ``as
    --defsym`` for each of ``defsyms``) and linked into an ELF kernel whose code starts at
    ``text``; returns its path in ``out_dir``."""
    src, obj, elf = out_dir / f"{name}.S", out_dir / f"{name}.o", out_dir / f"{name}.elf"
    src.write_text(LIB16 + "\n" + (GUESTS / f"{name}.S").read_text())
    syms = [f"--defsym={k}={v}" for k, v in (defsyms or {}).items()]
    subprocess.run(["as", "--64", *syms, "-o", obj, src], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", f"-Ttext={text:#x}", "-e", "pvh_start", "-o",
                    elf, obj], check=True)
    return elf


def run_kvmpy(*args: str, timeout: float = 60, input: bytes | None = None,
              env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the kvmpy CLI as a user would (a new process), capturing stdout/stderr as text."""
    e = dict(os.environ)
    e.update(env or {})
    if "stdin" not in kw:
        kw["input"] = input if input is not None else b""
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True,
                          timeout=timeout, env=e, **kw)


@pytest.fixture
def kvmpy_cli():
    return run_kvmpy
