"""What `kvmpy boot` imports, and the lazy stdlib modules (kvmpy._lazy) that keep it lean.

`kvmpy boot`'s time to the guest's first line is measured against QEMU (benchmarks/boot), and
most of it was imports. These tests pin what a PVH ELF boot must not import, check that the
modules kvmpy._lazy defers still work in full when something does use them, and that the parser
main() builds for one subcommand reads as the full one.
"""
import subprocess
import sys
import textwrap

import pytest

from conftest import GUESTS, LIB16, pvh_kernel

# Loaded only by the code of a module kept lazy (pdb -> bdb, inspect -> dis, pickle -> _pickle,
# hashlib -> _hashlib, traceback -> linecache's tokenize, ctypes -> _ctypes) or by dataclasses
# (milliseconds of startup, and inspect with them): no `kvmpy boot` needs them.
NOT_ON_THE_BOOT_PATH = ["bdb", "dis", "_pickle", "_hashlib", "tokenize", "_ctypes", "dataclasses"]
# ... nor, for a PVH ELF kernel, the modules of the other formats.
NOT_ON_THE_PVH_PATH = NOT_ON_THE_BOOT_PATH + ["kvmpy.loader.bzimage", "kvmpy.loader.multiboot",
                                              "kvmpy.bootparams"]


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, as kvmpy runs: nothing imported beforehand."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def pvh_elf(tmp_path_factory):
    return pvh_kernel("pvh32", tmp_path_factory.mktemp("pvh"))


def test_pvh_boot_imports_neither_the_bzimage_loader_nor_construct_debug_deps(pvh_elf):
    p = run_python(f"""
        import sys
        from kvmpy.cli import main
        status = main(["boot", "--kernel", {str(pvh_elf)!r}, "--append", "x", "--mem", "64M"])
        print("status", status)
        print("loaded", *[m for m in {NOT_ON_THE_PVH_PATH!r} if m in sys.modules])
        print("construct", "construct" in sys.modules)
        """)
    lines = p.stdout.splitlines()
    assert "status 33" in lines, (p.stdout, p.stderr)     # the guest's EXIT 0x10: (0x10 << 1) | 1
    assert "magic:336ec578" in lines                        # a real PVH boot
    assert "loaded" in lines, p.stdout                      # none of them
    assert "construct True" in lines                        # the boot formats still use it


def test_bzimage_boot_imports_neither_dataclasses_nor_construct_debug_deps(tmp_path):
    from synthetic import zeropage_kernel

    kernel = tmp_path / "bzImage"
    kernel.write_bytes(zeropage_kernel(LIB16, (GUESTS / "zeropage64.S").read_text()))
    p = run_python(f"""
        import sys
        from kvmpy.cli import main
        status = main(["boot", "--kernel", {str(kernel)!r}, "--append", "x", "--mem", "64M"])
        print("status", status)
        print("loaded", *[m for m in {NOT_ON_THE_BOOT_PATH!r} if m in sys.modules])
        """)
    lines = p.stdout.splitlines()
    assert "status 33" in lines, (p.stdout, p.stderr)
    assert "cmdline:x" in lines
    assert "loaded" in lines, p.stdout


def test_lazy_modules_still_work_in_full():
    """After construct is imported through kvmpy, construct's own Debugger, Probe and Pickled
    and the deferred stdlib modules all work; each loads when first used."""
    p = run_python("""
        import io, sys
        from kvmpy._lazy import defer_for_cli
        defer_for_cli()                            # what `kvmpy` does first
        import kvmpy.loader.pvh                    # construct
        import kvmpy.ioctls                        # ioctl_opt
        lazy = [m for m in ("pdb", "inspect", "traceback", "pickle", "hashlib", "ctypes")
                if type(sys.modules[m]).__name__ == "_LazyModule"]
        print("lazy", *lazy)

        import construct
        import pdb
        from inspect import signature
        assert "bdb" not in sys.modules            # `import pdb` alone does not load it
        assert isinstance(pdb.Pdb(), pdb.Pdb)      # its first attribute does
        assert str(signature(lambda a, b=2: 0)) == "(a, b=2)"
        assert construct.Pickled.parse(construct.Pickled.build([1, "x"])) == [1, "x"]
        out = io.StringIO()
        sys.stdout, real = out, sys.stdout
        construct.Struct("a" / construct.Byte, construct.Probe()).parse(b"\\x07")
        sys.stdout = real
        assert "a = 7" in out.getvalue()
        import hashlib, traceback, ctypes, ctypes.util
        assert hashlib.sha256(b"").hexdigest().startswith("e3b0c442")
        assert "ZeroDivisionError" in "".join(traceback.format_exception(ZeroDivisionError()))
        assert ctypes.sizeof(ctypes.c_int) == 4
        assert all(type(sys.modules[m]).__name__ == "module" for m in lazy)
        print("ok")
        """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["lazy pdb inspect traceback pickle hashlib ctypes", "ok"]


def test_lazy_module_first_use_from_many_threads():
    """Threads touching a lazy module for the first time at once all wait for one load (the
    stdlib's LazyLoader would let some of them see it half-loaded: CPython gh-114763)."""
    p = run_python("""
        import sys, threading
        from kvmpy._lazy import lazy_modules

        lazy_modules("pdb")
        barrier = threading.Barrier(8)
        got = []

        def use():
            barrier.wait()
            got.append(sys.modules["pdb"].Pdb.__name__)

        threads = [threading.Thread(target=use) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(got.count("Pdb"))
        """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "8"


def test_lazy_modules_leaves_imported_and_missing_modules_alone():
    p = run_python("""
        import os, sys
        from kvmpy._lazy import lazy_modules

        before = sys.modules["os"]
        lazy_modules("os", "kvmpy_no_such_module")
        print(sys.modules["os"] is before, "kvmpy_no_such_module" in sys.modules)
        """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "False"]


def test_a_program_using_kvmpy_as_a_library_keeps_its_modules():
    """Only the kvmpy command makes stdlib modules lazy; kvmpy.VM's users keep theirs."""
    p = run_python("""
        import sys
        import kvmpy.linux, kvmpy.loader.pvh, kvmpy.loader.bzimage, kvmpy.mptable, kvmpy.ioctls
        print([m for m, mod in sys.modules.items() if type(mod).__name__ == "_LazyModule"])
        """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
