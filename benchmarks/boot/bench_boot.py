#!/usr/bin/env python3
"""Boot time: `kvmpy boot` against `qemu-system-x86_64 -M microvm -kernel`, on the same synthetic
PVH ELF kernel, from exec to the guest's first line on COM1, and as a whole process.

The kernel (pvh.S after tests/guests/lib16.inc, linked like tests/test_boot.py's PVH kernel)
prints `boot-bench pvh magic:336ec578` on COM1 (the start_info magic it finds through %ebx, so
only a PVH boot prints it) and writes 0 to isa-debug-exit: process status 1.

    kvmpy pvh        .venv/bin/kvmpy boot --kernel pvh.elf --append x  (default 512 MiB RAM)
    kvmpy pvh 128M   the same with --mem 128M (QEMU's default RAM size)
    qemu             qemu-system-x86_64 -M microvm -kernel pvh.elf -append x -nodefaults
                     -no-reboot -display none -serial stdio -device isa-debug-exit,iobase=0xf4,
                     iosize=4   (QEMU's default accelerator here: TCG; firmware: qboot)
    qemu-kvm         the same with -accel kvm
    qemu-min         -M microvm,x-option-roms=off,rtc=off (fewer devices and ROMs), TCG
    qemu-min-kvm     the same with -accel kvm
    qemu-kvm-irqchip qemu-kvm with -accel kvm,kernel-irqchip=on: in-kernel PIC, IOAPIC and PIT
                     as kvmpy creates them (QEMU's microvm default with KVM is a split irqchip:
                     only the LAPIC in the kernel)
    kvmpy bzimage    .venv/bin/kvmpy boot --kernel bzImage --append x: a synthetic bzImage
                     (tests/synthetic.py, bzimage64.S) that prints `boot-bench bzimage
                     hdr:53726448`; kvmpy only (QEMU needs real-mode setup code for a bzImage)

With --no-pyc a second table runs the Python children as this workplace runs them:
PYTHONDONTWRITEBYTECODE=1 and no PYTHONPYCACHEPREFIX, so .pyc files are read from kvmpy's own
__pycache__ folders where they are current and never written; a kvmpy module changed since its
.pyc was written is compiled from source on every run (the script counts them).

Each run goes through the C helper firstline.c (fork, exec with stdout on a pipe, stdin and
stderr on /dev/null): time to the first '\\n' on the pipe, wall time fork to reap, the child's
ru_maxrss, its status and its first line, which must be the expected one in every run. Runs are
interleaved (each round runs every command once, in a rotated order); medians are reported.
Before timing, every VMM boots the test suite's kernels (tests/guests/pvh32.S and, for kvmpy,
zeropage64.S), which print the magic, the command line and the memory map they were given.

Then `python -X importtime` of `kvmpy boot` shows what it imports; --profile adds the phases of
one `kvmpy boot` (instrumented: interpreter, imports, Machine(), loader, vCPU setup, guest, exit),
kvmpy.cli.main timed and cProfiled in one process, and the exit counts of one boot (--stats).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
TESTS = os.path.join(REPO, "tests")
sys.path.insert(0, os.path.join(HERE, "..", "startup"))
sys.path.insert(0, TESTS)

from bench_startup import _is_kvmpy, importtime, python_env  # noqa: E402
from synthetic import zeropage_kernel  # noqa: E402  (tests/synthetic.py)

QEMU_TAIL = ["-append", "x", "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
QEMU_MIN = "microvm,x-option-roms=off,rtc=off"
LINES = {"pvh": "boot-bench pvh magic:336ec578", "bzimage": "boot-bench bzimage hdr:53726448"}
STATUS = 1            # isa-debug-exit value 0: (0 << 1) | 1
CHECK_STATUS = 0x21   # the test kernels end with EXIT 0x10


def _lib16() -> str:
    with open(os.path.join(TESTS, "guests", "lib16.inc")) as f:
        return f.read()


def _source(path: str) -> str:
    with open(path) as f:
        return f.read()


def pvh_elf(source: str, out: str) -> str:
    """An ELF kernel with a PVH note from ``source`` (after lib16.inc), linked at 1 MiB, exactly
    as tests/test_boot.py::test_pvh_elf_boot builds its kernel."""
    src, obj = out + ".S", out + ".o"
    with open(src, "w") as f:
        f.write(_lib16() + "\n" + source)
    for cmd in (["as", "--64", "-o", obj, src],
                ["ld", "-m", "elf_x86_64", "-Ttext=0x100000", "-e", "pvh_start", "-o", out, obj]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"bench_boot: {' '.join(cmd)} failed: {p.stderr.strip()}")
    return out


def bzimage(source: str, out: str) -> str:
    with open(out, "wb") as f:
        f.write(zeropage_kernel(_lib16(), source))
    return out


def build(out: str) -> dict[str, str]:
    """The timed kernels and the test suite's checking kernels, under ``out``."""
    guests = os.path.join(TESTS, "guests")
    return {
        "pvh": pvh_elf(_source(os.path.join(HERE, "pvh.S")), os.path.join(out, "pvh.elf")),
        "bzimage": bzimage(_source(os.path.join(HERE, "bzimage64.S")),
                           os.path.join(out, "bzImage")),
        "pvh-check": pvh_elf(_source(os.path.join(guests, "pvh32.S")),
                             os.path.join(out, "pvh-check.elf")),
        "bzimage-check": bzimage(_source(os.path.join(guests, "zeropage64.S")),
                                 os.path.join(out, "bzImage-check")),
    }


def commands(kvmpy: str, qemu: str, pvh: str, bz: str | None) -> dict[str, list[str]]:
    """name -> argv; kernels given by path (``bz`` None: no bzImage row)."""
    cmds = {
        "kvmpy pvh": [kvmpy, "boot", "--kernel", pvh, "--append", "x"],
        "kvmpy pvh 128M": [kvmpy, "boot", "--kernel", pvh, "--append", "x", "--mem", "128M"],
        "qemu": [qemu, "-M", "microvm", "-kernel", pvh, *QEMU_TAIL],
        "qemu-kvm": [qemu, "-M", "microvm", "-accel", "kvm", "-kernel", pvh, *QEMU_TAIL],
        "qemu-min": [qemu, "-M", QEMU_MIN, "-kernel", pvh, *QEMU_TAIL],
        "qemu-min-kvm": [qemu, "-M", QEMU_MIN, "-accel", "kvm", "-kernel", pvh, *QEMU_TAIL],
        "qemu-kvm-irqchip": [qemu, "-M", "microvm", "-accel", "kvm,kernel-irqchip=on", "-kernel",
                             pvh, *QEMU_TAIL],
    }
    if bz is not None:
        cmds["kvmpy bzimage"] = [kvmpy, "boot", "--kernel", bz, "--append", "x"]
    return cmds


def expected_line(name: str) -> str:
    return LINES["bzimage" if "bzimage" in name else "pvh"]


def check(kvmpy: str, qemu: str, kernels: dict[str, str], env: dict[str, str],
          with_bz: bool) -> None:
    """Every VMM boots the test suite's kernels: PVH start_info (magic, command line) or zero
    page (command line) as the guest itself reads them."""
    cmds = commands(kvmpy, qemu, kernels["pvh-check"], kernels["bzimage-check"] if with_bz
                    else None)
    for name, argv in cmds.items():
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        lines = p.stdout.splitlines()
        want = ["cmdline:x"] if "bzimage" in name else ["magic:336ec578", "cmdline:x"]
        if p.returncode != CHECK_STATUS or lines[:len(want)] != want:
            raise SystemExit(f"bench_boot: {name} did not boot the test kernel: status "
                             f"{p.returncode} (expected {CHECK_STATUS:#x}), stdout "
                             f"{p.stdout[:200]!r}, stderr {p.stderr.strip()[:300]!r}")


def firstline(helper: str, argv: list[str], env: dict[str, str]) -> dict[str, object]:
    """One run of ``argv`` through firstline.c: first_line_ns, wall_ns, maxrss_kib, status,
    bytes (ints) and line (str)."""
    p = subprocess.run([helper, *argv], env=env, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise SystemExit(f"bench_boot: {helper} failed: {p.stderr.strip()}")
    head, _, line = p.stdout.rstrip("\n").partition(" line=")
    res: dict[str, object] = {k: int(v) for k, v in (kv.split("=") for kv in head.split())}
    res["line"] = line
    return res


Sample = tuple[float, float, int]   # first line s, wall s, peak RSS KiB


def measure(helper: str, cmds: dict[str, list[str]], env: dict[str, str],
            runs: int) -> dict[str, list[Sample]]:
    names = list(cmds)

    def one(name: str) -> Sample:
        r = firstline(helper, cmds[name], env)
        if r["status"] != STATUS or r["line"] != expected_line(name) or r["first_line_ns"] < 0:
            raise SystemExit(f"bench_boot: {name}: status {r['status']}, first line "
                             f"{r['line']!r} (expected status {STATUS} and "
                             f"{expected_line(name)!r})")
        return r["first_line_ns"] / 1e9, r["wall_ns"] / 1e9, r["maxrss_kib"]

    for name in names:   # warm-up: page cache, and .pyc files written under the prefix
        one(name)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(one(name))
    return samples


def table(title: str, samples: dict[str, list[Sample]]) -> dict[str, tuple[float, float, float]]:
    print(title)
    print(f"{'command':<18}{'first line ms':>14}{'min':>7}{'max':>7}{'wall ms':>10}{'min':>7}"
          f"{'max':>7}{'peak RSS MiB':>14}")
    med = {}
    for name, s in samples.items():
        fl = [x[0] * 1000 for x in s]
        wall = [x[1] * 1000 for x in s]
        rss = statistics.median(x[2] for x in s) / 1024
        med[name] = statistics.median(fl), statistics.median(wall), rss
        print(f"{name:<18}{med[name][0]:>14.1f}{min(fl):>7.1f}{max(fl):>7.1f}{med[name][1]:>10.1f}"
              f"{min(wall):>7.1f}{max(wall):>7.1f}{rss:>14.1f}")
    print("\nratios kvmpy pvh / QEMU (goal <= 1 for first line and peak RSS):")
    print(f"{'':<24}{'first line':>12}{'wall':>8}{'peak RSS':>10}")
    k = med["kvmpy pvh"]
    for q in ("qemu", "qemu-kvm", "qemu-min", "qemu-min-kvm"):
        r = [k[i] / med[q][i] for i in range(3)]
        verdict = "met" if r[0] <= 1 and r[2] <= 1 else "NOT met"
        print(f"kvmpy pvh / {q:<12}{r[0]:>11.2f}x{r[1]:>7.2f}x{r[2]:>9.2f}x   goal {verdict}")
    return med


def report_imports(kvmpy_cmd: list[str], python: str, env: dict[str, str], runs: int) -> None:
    mods = importtime([python, *kvmpy_cmd], env, runs)
    base = {m[0] for m in importtime([python, "-c", "pass"], env, runs)}
    total = sum(m[1] for m in mods)
    extra = [m for m in mods if m[0] not in base]
    extra_total = sum(m[1] for m in extra)
    own = [m for m in extra if _is_kvmpy(m[0])]
    print(f"\n`python -X importtime` of `kvmpy boot --kernel pvh.elf` (median of {runs} runs): "
          f"{len(mods)} modules, {total / 1000:.1f} ms of import time; {len(extra)} of them "
          f"({extra_total / 1000:.1f} ms) are not imported by `python -c pass`; kvmpy's own "
          f"{len(own)}: {sum(m[1] for m in own) / 1000:.1f} ms self time")
    print("kvmpy modules (self / cumulative ms, in import order):")
    for name, self_us, cum_us, depth, _ in mods:
        if _is_kvmpy(name):
            print(f"  {'  ' * depth}{name:<40}{self_us / 1000:>7.2f}{cum_us / 1000:>9.2f}")
    started = False
    blame: list[tuple[int, str, str]] = []
    for name, _, cum_us, _, par in mods:
        started = started or _is_kvmpy(name)
        if _is_kvmpy(name) or name in base:
            continue
        if _is_kvmpy(par):
            blame.append((cum_us, name, f"imported by {par}"))
        elif par is None and started:
            blame.append((cum_us, name, "imported at run time by function code"))
    print("stdlib / third-party modules that kvmpy brings in, with what they import in turn "
          "(cumulative ms, largest first; a module imported by several kvmpy modules is "
          "charged to the first):")
    for cum_us, name, why in sorted(blame, reverse=True)[:16]:
        print(f"  {name:<22}{cum_us / 1000:>7.2f}  {why}")


# What the console script (kvmpy.cli.entry) does, with monotonic timestamps at the boundaries of
# the boot, written to an inherited pipe: Machine.__init__ and Machine.start are wrapped, and so
# is the vCPU setup callable (its return is the last host step before the first KVM_RUN).
PHASE_CHILD = """\
import os, sys, time
ts = {"a": time.monotonic_ns()}
from kvmpy.cli import main
ts["b"] = time.monotonic_ns()
import kvmpy.builder as B
ts["c"] = time.monotonic_ns()
init, start = B.Machine.__init__, B.Machine.start
def init_(self, *a, **k):
    ts.setdefault("init0", time.monotonic_ns())
    init(self, *a, **k)
    ts.setdefault("init1", time.monotonic_ns())
def start_(self, setup, n=1):
    def setup_(vcpu):
        setup(vcpu)
        ts.setdefault("entry", time.monotonic_ns())
    ts.setdefault("start", time.monotonic_ns())
    start(self, setup_, n)
B.Machine.__init__, B.Machine.start = init_, start_
rc = main(sys.argv[2:])
ts["end"] = time.monotonic_ns()
os.write(int(sys.argv[1]), " ".join(f"{k}={v}" for k, v in ts.items()).encode())
sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)
"""

PHASES = [("spawn, interpreter, site", "t0", "a"),
          ("import kvmpy.cli (argparse)", "a", "b"),
          ("import kvmpy.builder", "b", "c"),
          ("main() to Machine(): argparse, lazy imports (kvmpy.linux, loaders), read kernel",
           "c", "init0"),
          ("Machine(): /dev/kvm, VM, RAM, irqchip, PIT", "init0", "init1"),
          ("devices, PCI, ELF/PVH loader, start_info, MP table, CPUID; start()", "init1", "start"),
          ("vCPU thread: create vCPU, CPUID, MSRs, registers", "start", "entry"),
          ("guest: entry to its first line on the pipe (PIO exits)", "entry", "line"),
          ("rest of the guest, debug-exit, teardown, main() returns", "line", "end"),
          ("os._exit to reaped", "end", "t1"),
          ("total: spawn to reaped", "t0", "t1")]


def phases(kernel: str, env: dict[str, str], python: str, runs: int) -> str:
    rows = []
    for _ in range(runs):
        r, w = os.pipe()
        out_r, out_w = os.pipe()
        os.set_inheritable(w, True)
        acts = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
        t0 = time.monotonic_ns()
        pid = os.posix_spawn(python, [python, "-c", PHASE_CHILD, str(w), "boot", "--kernel",
                                      kernel, "--append", "x"], env, file_actions=acts)
        os.close(w)
        os.close(out_w)
        line = None
        while True:
            chunk = os.read(out_r, 4096)
            if not chunk:
                break
            if line is None and b"\n" in chunk:
                line = time.monotonic_ns()
        os.close(out_r)
        os.waitpid(pid, 0)
        t1 = time.monotonic_ns()
        with os.fdopen(r) as f:
            ts = {k: int(v) for k, v in (kv.split("=") for kv in f.read().split())}
        ts.update(t0=t0, t1=t1, line=line)
        rows.append(ts)
    lines = []
    for name, a, b in PHASES:
        med = statistics.median((row[b] - row[a]) / 1e6 for row in rows)
        lines.append(f"  {name:<84}{med:>7.1f} ms")
    fl = statistics.median((row["line"] - row["t0"]) / 1e6 for row in rows)
    lines.append(f"  {'of which spawn to the guest first line':<84}{fl:>7.1f} ms")
    return "\n".join(lines)


PROFILE = """\
import cProfile, pstats, statistics, sys, time
t0 = time.perf_counter()
from kvmpy.cli import main
t1 = time.perf_counter()
argv = ['boot', '--kernel', sys.argv[1], '--append', 'x']
p = cProfile.Profile()
p.enable(); main(argv); p.disable()
t2 = time.perf_counter()
steady = []
for _ in range(7):
    t = time.perf_counter(); main(argv); steady.append(time.perf_counter() - t)
print(f"import kvmpy.cli: {(t1 - t0) * 1e3:.1f} ms; first main(), cProfiled (lazy imports, "
      f"profiler overhead included): {(t2 - t1) * 1e3:.1f} ms; later main() (modules loaded: "
      f"parse args, build the VM, boot, tear down): median {statistics.median(steady) * 1e3:.1f} "
      f"ms, min {min(steady) * 1e3:.1f} ms")
print("cProfile of the first main(), by cumulative time (kvmpy functions and imports):")
pstats.Stats(p).sort_stats("cumulative").print_stats("kvmpy|_find_and_load", TOP)
q = cProfile.Profile()
q.enable(); main(argv); q.disable()
print("cProfile of a later main(), by own time:")
pstats.Stats(q).sort_stats("tottime").print_stats(TOP)
"""


def profile_main(kernel: str, env: dict[str, str], python: str, top: int) -> str:
    p = subprocess.run([python, "-c", PROFILE.replace("TOP", str(top)), kernel], env=env,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    # the guest's own lines (it writes to fd 1) are not part of the report
    return "\n".join(l for l in (p.stdout + p.stderr).splitlines()
                     if not l.startswith("boot-bench "))


def stale_pyc(modules: list[str]) -> list[str]:
    """Those of the kvmpy ``modules`` that have no current .pyc in their __pycache__ (what a run
    with PYTHONDONTWRITEBYTECODE=1 and no PYTHONPYCACHEPREFIX compiles from source every time)."""
    import importlib.util

    stale = []
    for mod in modules:
        base = os.path.join(REPO, *mod.split("."))
        src = os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"
        if not os.path.exists(src):
            continue
        d, f = os.path.split(src)
        pyc = os.path.join(d, "__pycache__", f"{f[:-3]}.{sys.implementation.cache_tag}.pyc")
        st = os.stat(src)
        try:
            with open(pyc, "rb") as fh:
                head = fh.read(16)
        except OSError:
            head = b""
        ok = (len(head) == 16 and head[:4] == importlib.util.MAGIC_NUMBER
              and int.from_bytes(head[4:8], "little") == 0
              and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
              and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)
        if not ok:
            stale.append(os.path.relpath(src, REPO))
    return stale


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15, help="timed runs of each command (default 15)")
    p.add_argument("--out", default=os.path.join(HERE, "..", "out", "boot"))
    p.add_argument("--firstline", default=os.path.join(HERE, "firstline"),
                   help="the helper built from firstline.c")
    p.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    p.add_argument("--no-bzimage", action="store_true", help="leave out the kvmpy bzImage row")
    p.add_argument("--no-pyc", action="store_true",
                   help="also time with PYTHONDONTWRITEBYTECODE=1 and no PYTHONPYCACHEPREFIX")
    p.add_argument("--imports", type=int, default=5, help="importtime runs (0: skip)")
    p.add_argument("--profile", action="store_true",
                   help="also time the phases of `kvmpy boot`, cProfile kvmpy.cli.main and show "
                   "the exit counts of one boot")
    args = p.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if not os.access(args.qemu, os.X_OK):
        raise SystemExit("bench_boot: qemu-system-x86_64 is missing; apt-get install "
                         "qemu-system-x86")
    if not os.access(args.firstline, os.X_OK):
        raise SystemExit(f"bench_boot: {args.firstline} is missing; run `make -C benchmarks boot`")
    python = os.path.join(VENV_BIN, "python")
    kvmpy = os.path.join(VENV_BIN, "kvmpy")
    kernels = build(out)
    with_bz = not args.no_bzimage
    env = python_env(out, pyc=True)
    check(kvmpy, args.qemu, kernels, env, with_bz)
    qv = subprocess.run([args.qemu, "--version"], capture_output=True, text=True).stdout
    print(f"python: {os.path.realpath(python)} ({sys.version.split()[0]}); qemu: {args.qemu} "
          f"({qv.splitlines()[0] if qv else '?'}); host: {os.cpu_count()} CPUs")
    print("checked: every command boots the test suite's kernels (tests/guests/pvh32.S: "
          "magic:336ec578, cmdline:x" + ("; zeropage64.S: cmdline:x" if with_bz else "") +
          "; status 0x21); every timed run prints its kernel's line and exits 1\n")

    cmds = commands(kvmpy, args.qemu, kernels["pvh"], kernels["bzimage"] if with_bz else None)
    print(f"load average before timing: {loadavg()} (the host's other work disturbs timings)")
    table(f"boot, .pyc cached, median of {args.runs} interleaved runs (times from fork)",
          measure(args.firstline, cmds, env, args.runs))
    if args.no_pyc:
        no_pyc = python_env(out, pyc=False)
        mods = [m[0] for m in importtime([python, *cmds["kvmpy pvh"]], no_pyc, 1)
                if _is_kvmpy(m[0])]
        stale = stale_pyc(mods)
        print(f"\nPYTHONDONTWRITEBYTECODE=1, no PYTHONPYCACHEPREFIX: .pyc read from kvmpy's "
              f"__pycache__ folders, never written; of the {len(mods)} kvmpy modules that "
              f"`kvmpy boot` imports, {len(stale)} have no current .pyc there (compiled from "
              f"source on every run)"
              + (f": {', '.join(stale)}" if stale else ""))
        table(f"boot, PYTHONDONTWRITEBYTECODE=1, median of {args.runs} interleaved runs",
              measure(args.firstline, cmds, no_pyc, args.runs))
    print(f"load average after timing: {loadavg()}")
    if args.imports:
        report_imports(cmds["kvmpy pvh"], python, env, args.imports)
    if args.profile:
        print(f"\nphases of `kvmpy boot --kernel pvh.elf --append x` (.pyc cached; median of "
              f"{args.runs} runs; spawned from this Python process, instrumented child):")
        print(phases(kernels["pvh"], env, python, args.runs))
        print("\nkvmpy.cli.main in one process (.pyc cached):")
        print(profile_main(kernels["pvh"], env, python, 25))
        s = subprocess.run([*cmds["kvmpy pvh"], "--stats"], env=env, capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        print("\n`kvmpy boot --kernel pvh.elf --append x --stats`:")
        print(s.stderr.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
