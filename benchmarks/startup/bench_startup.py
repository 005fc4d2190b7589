#!/usr/bin/env python3
"""Whole-process startup: `kvmpy run` against `qemu-system-x86_64 -M microvm -bios`, for a guest
that ends at its first instruction (`out %al, $0xf4`, isa-debug-exit, status 1).

Each command is run by the small C helper spawn.c (fork, exec with stdio on /dev/null, wait4):
wall time is fork to reap, peak RSS is the child's ru_maxrss. (Not os.wait4 from here: a child
forked from this Python process inherits its ~15 MiB RSS into ru_maxrss; see spawn.c.) Runs are
interleaved (each round runs every command once, in a rotated order) and medians are reported.

    kvmpy        .venv/bin/kvmpy run guest.bin --mode real  (the console script, whose shebang
                 is the venv's python, a link to the real interpreter binary, not a pyenv shim)
    qemu         qemu-system-x86_64 -M microvm -bios bios.bin -device isa-debug-exit,iobase=0xf4,
                 iosize=4 -display none -nodefaults -no-reboot   (QEMU's default accelerator: TCG)
    qemu-kvm     the same with -accel kvm
    python -S    python -S -c pass   (the same interpreter: the floor for any Python program)
    python       python -c pass      (with site and the venv's .pth files)

Python children run with bytecode caching on and PYTHONPYCACHEPREFIX under benchmarks/out, so
the timed runs load .pyc files (as after `pip install`) without writing into kvmpy/; --no-pyc
times them with PYTHONDONTWRITEBYTECODE=1 instead (every kvmpy module compiled from source on
every run, as in an environment that sets it). Before timing, both guests are run once with
VALUE=0x2a to check that each VMM really exits through debug-exit (status 0x55).

Then ``python -X importtime`` of the same kvmpy command shows which modules it imports, what they
cost, and which kvmpy module brings in each stdlib or third-party one. --profile adds the phases
of one `kvmpy run` (interpreter and site, imports, main(), finalization; and how long the run is
when it ends with os._exit), then kvmpy.cli.main timed and cProfiled in one process.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import time

from kvmpy.asm import assemble

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
QEMU_ARGS = ["-M", "microvm", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-display",
             "none", "-nodefaults", "-no-reboot"]
GOAL_WALL = 1.25      # kvmpy wall <= 1.25 x QEMU's
CHECK_VALUE = 0x2A    # the check run's debug-exit value: status 0x55


def build(out_dir: str, value: int | None = None) -> tuple[str, str]:
    """guest.bin (kvmpy, at 0x7c00) and bios.bin (QEMU, 64 KiB ending at the reset vector)."""
    defines = {} if value is None else {"VALUE": value}
    suffix = "" if value is None else f"-{value:#x}"
    paths = []
    for src, base, name in (("guest.S", 0x7C00, "guest"), ("bios.S", 0xF0000, "bios")):
        with open(os.path.join(HERE, src)) as f:
            data = assemble(f.read(), base, defines)
        path = os.path.join(out_dir, f"{name}{suffix}.bin")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths[0], paths[1]


def commands(python: str, kvmpy: str, qemu: str, guest: str, bios: str) -> dict[str, list[str]]:
    return {
        "kvmpy": [kvmpy, "run", guest, "--mode", "real"],
        "qemu": [qemu, *QEMU_ARGS[:2], "-bios", bios, *QEMU_ARGS[2:]],
        "qemu-kvm": [qemu, *QEMU_ARGS[:2], "-accel", "kvm", "-bios", bios, *QEMU_ARGS[2:]],
        "python -S": [python, "-S", "-c", "pass"],
        "python": [python, "-c", "pass"],
    }


def python_env(out_dir: str, pyc: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPYCACHEPREFIX", None)
    if pyc:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(out_dir, "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def spawn(helper: str, argv: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS KiB, exit status) of one run of ``argv``, through spawn.c."""
    p = subprocess.run([helper, *argv], env=env, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise SystemExit(f"bench_startup: {helper} failed: {p.stderr.strip()}")
    f = dict(kv.split("=") for kv in p.stdout.split())
    return int(f["wall_ns"]) / 1e9, int(f["maxrss_kib"]), int(f["status"])


def check(cmds: dict[str, list[str]], env: dict[str, str], want: int) -> None:
    for name in ("kvmpy", "qemu", "qemu-kvm"):
        p = subprocess.run(cmds[name], env=env, capture_output=True, text=True, timeout=60)
        if p.returncode != want:
            raise SystemExit(f"bench_startup: {name} exited with {p.returncode}, expected {want} "
                             f"(debug-exit); stderr: {p.stderr.strip()}")


def measure(helper: str, cmds: dict[str, list[str]], env: dict[str, str], runs: int,
            statuses: dict[str, int]) -> dict[str, list[tuple[float, int]]]:
    names = list(cmds)
    for name in names:   # warm-up: page cache, and .pyc files written under the prefix
        spawn(helper, cmds[name], env)
    samples: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
    for i in range(runs):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            wall, rss, status = spawn(helper, cmds[name], env)
            if status != statuses.get(name, 0):
                raise SystemExit(f"bench_startup: {name} exited with {status}")
            samples[name].append((wall, rss))
    return samples


def table(title: str,
          samples: dict[str, list[tuple[float, int]]]) -> dict[str, tuple[float, float]]:
    print(title)
    print(f"{'command':<12}{'wall ms (median)':>18}{'min':>8}{'max':>8}{'peak RSS MiB':>14}")
    med = {}
    for name, s in samples.items():
        walls = [w * 1000 for w, _ in s]
        rss = statistics.median(r for _, r in s) / 1024
        med[name] = statistics.median(walls), rss
        print(f"{name:<12}{med[name][0]:>18.1f}{min(walls):>8.1f}{max(walls):>8.1f}{rss:>14.1f}")
    k_wall, k_rss = med["kvmpy"]
    for q in ("qemu", "qemu-kvm"):
        q_wall, q_rss = med[q]
        print(f"kvmpy / {q:<9} wall {k_wall / q_wall:.2f}x (goal <= {GOAL_WALL}: "
              f"{'met' if k_wall / q_wall <= GOAL_WALL else 'NOT met'}), peak RSS "
              f"{k_rss / q_rss:.2f}x (goal <= 1: {'met' if k_rss <= q_rss else 'NOT met'})")
    return med


Module = tuple[str, int, int, int, "str | None"]   # name, self µs, cumulative µs, depth, parent


def importtime(argv: list[str], env: dict[str, str], runs: int) -> list[Module]:
    """Modules from ``-X importtime`` of ``argv``, in its order, times the median over ``runs``.

    importtime prints a module after the modules it imported, one indent level deeper, so the
    parent of a line is the next line that is less indented.
    """
    per: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    first: list[tuple[str, int]] = []
    parent: dict[str, str] = {}
    seen: set[str] = set()
    for run in range(runs):
        p = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env,
                           capture_output=True, text=True, timeout=60)
        pending: list[tuple[str, int]] = []
        for line in p.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum_us, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip())) // 2
            name = name.strip()
            per[name].append((int(self_us), int(cum_us)))
            if run == 0:
                while pending and pending[-1][1] > depth:
                    parent.setdefault(pending.pop()[0], name)
                pending.append((name, depth))
                if name not in seen:
                    seen.add(name)
                    first.append((name, depth))
    return [(n, int(statistics.median(s for s, _ in per[n])),
             int(statistics.median(c for _, c in per[n])), d, parent.get(n)) for n, d in first]


def _is_kvmpy(name: str | None) -> bool:
    return name is not None and name.split(".")[0] == "kvmpy"


def report_imports(kvmpy_cmd: list[str], python_cmd: list[str], env: dict[str, str],
                   runs: int) -> None:
    mods = importtime([python_cmd[0], *kvmpy_cmd], env, runs)
    base = {m[0] for m in importtime(python_cmd, env, runs)}
    total = sum(m[1] for m in mods)
    extra = [m for m in mods if m[0] not in base]
    extra_total = sum(m[1] for m in extra)
    print(f"\n`python -X importtime` of `kvmpy run` (median of {runs} runs): {len(mods)} modules, "
          f"{total / 1000:.1f} ms of import time in all; {len(extra)} of them "
          f"({extra_total / 1000:.1f} ms) are not imported by `python -c pass`")
    own = sum(m[1] for m in extra if _is_kvmpy(m[0]))
    print(f"  kvmpy's own {sum(1 for m in extra if _is_kvmpy(m[0]))} modules: "
          f"{own / 1000:.1f} ms self time; the other {(extra_total - own) / 1000:.1f} ms are "
          "stdlib and third-party modules they pull in")
    print("kvmpy modules (self / cumulative ms, in import order):")
    for name, self_us, cum_us, depth, _ in mods:
        if _is_kvmpy(name):
            print(f"  {'  ' * depth}{name:<40}{self_us / 1000:>7.2f}{cum_us / 1000:>9.2f}")
    # Non-kvmpy modules that a kvmpy module imports itself (or that function code imports
    # at run time, at the top level after kvmpy started), with all they import in turn.
    started = False
    blame: list[tuple[int, str, str]] = []
    for name, _, cum_us, depth, par in mods:
        started = started or _is_kvmpy(name)
        if _is_kvmpy(name) or name in base:
            continue
        if _is_kvmpy(par):
            blame.append((cum_us, name, f"imported by {par}"))
        elif par is None and started:
            blame.append((cum_us, name, "imported at run time by function code"))
    print("stdlib / third-party modules that kvmpy brings in, with what they import in turn "
          "(cumulative ms, largest first):")
    for cum_us, name, why in sorted(blame, reverse=True)[:14]:
        print(f"  {name:<22}{cum_us / 1000:>7.2f}  {why}")


PHASES = """\
import cProfile, pstats, statistics, sys, time
t0 = time.perf_counter()
from kvmpy.cli import main
t1 = time.perf_counter()
argv = ['run', sys.argv[1], '--mode', 'real']
main(argv)
t2 = time.perf_counter()
steady = []
for _ in range(7):
    t = time.perf_counter(); main(argv); steady.append(time.perf_counter() - t)
print(f"import kvmpy.cli: {(t1 - t0) * 1e3:.1f} ms; first main() (with its lazy imports): "
      f"{(t2 - t1) * 1e3:.1f} ms; later main() (modules loaded: parse args, build the VM, run, "
      f"tear down): median {statistics.median(steady) * 1e3:.1f} ms")
p = cProfile.Profile()
p.enable(); main(argv); p.disable()
print("cProfile of one later main(), by own time:")
pstats.Stats(p).sort_stats("tottime").print_stats(TOP)
"""


def profile_main(guest: str, env: dict[str, str], python: str, top: int) -> str:
    """Time kvmpy.cli.main in a child: the first call (lazy imports) and later calls, profiled."""
    p = subprocess.run([python, "-c", PHASES.replace("TOP", str(top)), guest], env=env,
                       capture_output=True, text=True, timeout=60)
    return p.stdout + p.stderr


# What the console script does, with monotonic timestamps written to an inherited pipe; with
# FAST_EXIT, it ends by os._exit instead of sys.exit (no interpreter finalization).
PHASE_CHILD = """\
import os, sys, time
a = time.monotonic_ns()
from kvmpy.cli import main
b = time.monotonic_ns()
rc = main(['run', sys.argv[1], '--mode', 'real'])
c = time.monotonic_ns()
os.write(int(sys.argv[2]), f"{a} {b} {c}".encode())
if sys.argv[3] == "1":
    sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)
sys.exit(rc)
"""


def phases(guest: str, env: dict[str, str], python: str, runs: int) -> str:
    """Median wall time of each phase of one `kvmpy run`, from spawn to reap."""
    names = ["spawn, interpreter, site", "import kvmpy.cli", "main(): lazy imports, VM work",
             "finalization and exit", "total"]
    lines = []
    for fast in (False, True):
        rows = []
        for _ in range(runs):
            r, w = os.pipe()
            os.set_inheritable(w, True)
            null = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
            t0 = time.monotonic_ns()
            pid = os.posix_spawn(python, [python, "-c", PHASE_CHILD, guest, str(w),
                                          "1" if fast else "0"], env, file_actions=null)
            os.close(w)
            os.wait4(pid, 0)
            t1 = time.monotonic_ns()
            with os.fdopen(r) as f:
                a, b, c = map(int, f.read().split())
            rows.append((a - t0, b - a, c - b, t1 - c, t1 - t0))
        med = [statistics.median(row[i] for row in rows) / 1e6 for i in range(len(names))]
        how = "os._exit after main()" if fast else "sys.exit, as the console script"
        lines.append(f"  {how}: " + ", ".join(f"{n} {m:.1f} ms" for n, m in zip(names, med)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="timed runs of each command (default 20)")
    p.add_argument("--out", default=os.path.join(HERE, "..", "out", "startup"))
    p.add_argument("--spawn", default=os.path.join(HERE, "spawn"),
                   help="the spawn helper (built from spawn.c)")
    p.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    p.add_argument("--no-pyc", action="store_true",
                   help="also time with PYTHONDONTWRITEBYTECODE=1 (no .pyc for kvmpy)")
    p.add_argument("--imports", type=int, default=5, help="importtime runs (0: skip)")
    p.add_argument("--profile", action="store_true",
                   help="also time the phases of `kvmpy run` and cProfile kvmpy.cli.main")
    args = p.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if not os.access(args.qemu, os.X_OK):
        raise SystemExit("bench_startup: qemu-system-x86_64 is missing; apt-get install "
                         "qemu-system-x86")
    if not os.access(args.spawn, os.X_OK):
        raise SystemExit(f"bench_startup: {args.spawn} is missing; run `make -C benchmarks`")
    python = os.path.join(VENV_BIN, "python")
    kvmpy = os.path.join(VENV_BIN, "kvmpy")
    guest, bios = build(out)
    env = python_env(out, pyc=True)

    check(commands(python, kvmpy, args.qemu, *build(out, CHECK_VALUE)), env,
          (CHECK_VALUE << 1) | 1)
    cmds = commands(python, kvmpy, args.qemu, guest, bios)
    statuses = {"kvmpy": 1, "qemu": 1, "qemu-kvm": 1}
    print(f"python: {os.path.realpath(python)}; qemu: {args.qemu}")
    print(f"checked: kvmpy, qemu and qemu-kvm exit through debug-exit "
          f"(value {CHECK_VALUE:#x} -> status {(CHECK_VALUE << 1) | 1:#x}); timed guest -> 1\n")
    table(f"startup, .pyc cached, median of {args.runs} interleaved runs",
          measure(args.spawn, cmds, env, args.runs, statuses))
    if args.no_pyc:
        print()
        table(f"startup, PYTHONDONTWRITEBYTECODE=1 (kvmpy compiled from source each run), "
              f"median of {args.runs} interleaved runs",
              measure(args.spawn, cmds, python_env(out, pyc=False), args.runs, statuses))
    if args.imports:
        report_imports(cmds["kvmpy"], cmds["python"], env, args.imports)
    if args.profile:
        print(f"\nphases of `kvmpy run` (.pyc cached; median of {args.runs} runs; spawned from "
              "this process, so the first phase includes its posix_spawn):")
        print(phases(guest, env, python, args.runs))
        print("\nkvmpy.cli.main in one process (.pyc cached):")
        print(profile_main(guest, env, python, 12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
