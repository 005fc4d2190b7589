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

Then ``python -X importtime`` of the same kvmpy command shows which modules it imports and what
they cost, and cProfile of kvmpy.cli.main shows the rest of the time.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys

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


def table(title: str, samples: dict[str, list[tuple[float, int]]]) -> dict[str, tuple[float, float]]:
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


def importtime(argv: list[str], env: dict[str, str], runs: int) -> list[tuple[str, int, int, int]]:
    """(module, self µs, cumulative µs, depth) from ``-X importtime``, median over ``runs``."""
    per: dict[str, list[tuple[int, int, int]]] = collections.defaultdict(list)
    order: list[str] = []
    for _ in range(runs):
        p = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env,
                           capture_output=True, text=True, timeout=60)
        for line in p.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum_us, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip())) // 2
            name = name.strip()
            if name not in per:
                order.append(name)
            per[name].append((int(self_us), int(cum_us), depth))
    return [(n, int(statistics.median(s for s, _, _ in per[n])),
             int(statistics.median(c for _, c, _ in per[n])), per[n][0][2]) for n in order]


def report_imports(kvmpy_cmd: list[str], python_cmd: list[str], env: dict[str, str],
                   runs: int) -> None:
    mods = importtime([python_cmd[0], *kvmpy_cmd], env, runs)
    base = {n for n, *_ in importtime(python_cmd, env, runs)}
    total = sum(s for _, s, _, _ in mods)
    extra = [m for m in mods if m[0] not in base]
    extra_total = sum(s for _, s, _, _ in extra)
    print(f"\n`python -X importtime` of `kvmpy run` (median of {runs} runs): {len(mods)} modules, "
          f"{total / 1000:.1f} ms of import time in all; {len(extra)} of them "
          f"({extra_total / 1000:.1f} ms) are not imported by `python -c pass`")
    groups: collections.Counter[str] = collections.Counter()
    for name, self_us, _, _ in extra:
        top = name.split(".")[0]
        groups["kvmpy (its own modules)" if top == "kvmpy" else
               "_cffi_backend / cffi" if "cffi" in top else top] += self_us
    print("self time by top-level package, modules beyond `python -c pass`:")
    for top, us in groups.most_common(12):
        print(f"  {top:<30}{us / 1000:>8.2f} ms")
    print("kvmpy modules (self / cumulative ms, in import order):")
    for name, self_us, cum_us, depth in mods:
        if name.split(".")[0] == "kvmpy":
            print(f"  {'  ' * depth}{name:<40}{self_us / 1000:>7.2f}{cum_us / 1000:>9.2f}")
    print("slowest other modules kvmpy pulls in (self ms):")
    others = sorted((m for m in extra if m[0].split(".")[0] != "kvmpy"), key=lambda m: -m[1])
    for name, self_us, cum_us, _ in others[:12]:
        print(f"  {name:<40}{self_us / 1000:>7.2f}")


def profile_main(guest: str, env: dict[str, str], python: str, top: int) -> str:
    """cProfile of kvmpy.cli.main in a child (imports included: kvmpy's are lazy)."""
    code = ("import cProfile, pstats, sys\n"
            "from kvmpy.cli import main\n"
            "p = cProfile.Profile()\n"
            f"p.enable(); rc = main(['run', {guest!r}, '--mode', 'real']); p.disable()\n"
            f"pstats.Stats(p, stream=sys.stderr).sort_stats('cumulative').print_stats({top})\n")
    p = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return p.stderr


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
    p.add_argument("--profile", action="store_true", help="also cProfile kvmpy.cli.main")
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
        print("\ncProfile of kvmpy.cli.main (one run, .pyc cached), by cumulative time:")
        print(profile_main(guest, env, python, 25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
