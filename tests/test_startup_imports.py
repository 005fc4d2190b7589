"""The lazy stdlib modules (kvmpy._lazy) that keep `kvmpy boot` lean.

`kvmpy boot`'s time to the guest's first line is measured against QEMU (benchmarks/boot), and
most of it was imports. These tests check that the modules kvmpy._lazy defers still work in full
when something does use them.
"""
import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, as kvmpy runs: nothing imported beforehand."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)


def test_lazy_modules_still_work_in_full():
    """After construct is imported through kvmpy, construct's own Debugger, Probe and Pickled
    and the deferred stdlib modules all work; each loads when first used."""
    p = run_python("""
        import io, sys
        import kvmpy._construct
        import kvmpy.ioctls
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


def test_kvmpy_imports_construct_only_through_kvmpy_construct():
    """A direct ``import construct`` before kvmpy._construct would load pdb and inspect."""
    import pathlib
    import re

    import kvmpy

    root = pathlib.Path(kvmpy.__file__).parent
    direct = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "_construct.py"
              and re.search(r"^\s*(from construct\b|import construct\b)", p.read_text(), re.M)]
    assert direct == []
