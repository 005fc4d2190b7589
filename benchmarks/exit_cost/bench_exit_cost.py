#!/usr/bin/env python3
"""Cost of one port-I/O exit: kvmpy's Machine against a minimal C KVM_RUN loop (baseline.c).

Both run the same real-mode guest (guest.S, assembled here with kvmpy.asm) loaded at 0000:7c00:
a mark exit (port 0xe1), ITERS x OUTS exits to port 0xe0, an end exit (port 0xf4). Each VMM takes
its clock at the mark and at the end exit, so VM creation and vCPU setup are not counted. The
same guest with OUTS=0 (the bare loop) is also timed; subtracting it removes the cost of the
loop's own instructions (emulated by KVM on PVM hosts, identical for both VMMs):

    raw µs/exit = mark_to_end(OUTS) / N
    net µs/exit = (median mark_to_end(OUTS) - median mark_to_end(0)) / N      N = ITERS * OUTS

Repetitions are interleaved (C, kvmpy, kvmpy, C, ...) so that drift of the host hits both alike;
medians are reported. kvmpy's side uses only the public API: Machine, add_pio_device with Python
BusDevices, load_flat, start(setup_vcpu), wait. The C baseline is run as a subprocess.

Options: --profile runs kvmpy's run loop once under cProfile (in the main thread, so the profile
sees it) and prints the top functions; --breakdown times the Python pieces of the exit path
without /dev/kvm (decode, dispatch, the cffi call). Exit status 0 unless a run misbehaved (wrong
exit count or status); the ratio goal is reported, not enforced.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import subprocess
import sys
import time
import timeit

from kvmpy.asm import assemble
from kvmpy.builder import Machine, setup_vcpu
from kvmpy.outcome import Outcome, VmStop
from kvmpy.vcpu.modes import Mode
from kvmpy.vmexit.bus import BusDevice

HERE = os.path.dirname(os.path.abspath(__file__))
LOAD = 0x7C00
COUNT_PORT, MARK_PORT, END_PORT = 0xE0, 0xE1, 0xF4
GOAL = 1.25   # kvmpy / C, net µs per exit


class Counter(BusDevice):
    """Port 0xe0: counts the guest's writes (the measured exit)."""

    name = "counter"
    window = 1

    def __init__(self) -> None:
        self.count = 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.count += 1


class Mark(BusDevice):
    """Port 0xe1: the guest's start mark; the clock starts here."""

    name = "mark"
    window = 1

    def __init__(self) -> None:
        self.t_ns = 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.t_ns = time.perf_counter_ns()


class End(BusDevice):
    """Port 0xf4: stops the clock, then ends the VM as isa-debug-exit does."""

    name = "end"
    window = 4

    def __init__(self) -> None:
        self.t_ns = 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.t_ns = time.perf_counter_ns()
        raise VmStop(Outcome.debug_exit(value & 0xFF))


def build_guest(out_dir: str, iters: int, outs: int) -> str:
    with open(os.path.join(HERE, "guest.S")) as f:
        source = f.read()
    path = os.path.join(out_dir, f"guest-{iters}x{outs}.bin")
    data = assemble(source, LOAD, {"ITERS": iters, "OUTS": outs})
    with open(path, "wb") as f:
        f.write(data)
    return path


def run_c(baseline: str, image: str, mem_mib: int, expected: int) -> dict[str, int]:
    p = subprocess.run([baseline, image, str(mem_mib), str(expected)], capture_output=True,
                       text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"bench_exit_cost: {baseline} failed ({p.returncode}): {p.stderr.strip()}")
    fields = dict(kv.split("=") for kv in p.stdout.split())
    return {k: int(v) for k, v in fields.items()}


def _machine(image: str, mem_mib: int) -> tuple[Machine, Counter, Mark, End]:
    m = Machine(mem_mib << 20)
    try:
        devs = Counter(), Mark(), End()
        for dev, port in zip(devs, (COUNT_PORT, MARK_PORT, END_PORT)):
            m.add_pio_device(dev, port, dev.name)
        m.load_flat(image, LOAD, Mode.REAL)
    except BaseException:
        m.close()
        raise
    return (m, *devs)


def _check(m: Machine, outcome: Outcome, counter: Counter, expected: int) -> None:
    io_exits = m.dispatcher.exit_counts().get("IO", 0)
    if outcome.status != 1 or counter.count != expected or io_exits != expected + 2:
        raise SystemExit(f"bench_exit_cost: kvmpy run went wrong: {outcome}, {counter.count} "
                         f"writes to port {COUNT_PORT:#x} (expected {expected}), "
                         f"{io_exits} IO exits")


def run_kvmpy(image: str, mem_mib: int, expected: int) -> dict[str, int]:
    t0 = time.perf_counter_ns()
    m, counter, mark, end = _machine(image, mem_mib)
    with m:
        memory = m.memory
        m.start(lambda vcpu: setup_vcpu(vcpu, memory, Mode.REAL, LOAD))
        outcome = m.wait(600)
        _check(m, outcome, counter, expected)
    return {"exits": counter.count, "mark_to_end_ns": end.t_ns - mark.t_ns,
            "total_ns": end.t_ns - t0}


def profile_kvmpy(image: str, mem_mib: int, expected: int, top: int) -> str:
    """kvmpy's own run loop (kvmpy.vcpu.runner.run_loop) under cProfile, in this thread."""
    from kvmpy.vcpu.runner import run_loop

    m, counter, mark, end = _machine(image, mem_mib)
    prof = cProfile.Profile()
    with m:
        vcpu = m.vm.create_vcpu(0)
        try:
            setup_vcpu(vcpu, m.memory, Mode.REAL, LOAD)
            prof.enable()
            outcome = run_loop(vcpu, m.dispatcher, lambda: False)
            prof.disable()
        finally:
            vcpu.close()
        _check(m, outcome, counter, expected)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    per = (end.t_ns - mark.t_ns) / expected / 1000
    return f"(under cProfile: {per:.2f} µs/exit)\n" + s.getvalue()


def breakdown(n: int = 200_000) -> list[tuple[str, float]]:
    """Per-exit cost (µs) of the Python pieces of kvmpy's exit path, on a fake kvm_run page."""
    from kvmpy._ffi import ffi, lib
    from kvmpy.vmexit.bus import MmioBus, PioBus
    from kvmpy.vmexit.dispatch import Dispatcher
    from kvmpy.vmexit.exits import ExitDecoder

    run = ffi.new("struct kvm_run *")
    run.exit_reason = lib.KVM_EXIT_IO
    iox = ffi.cast("struct kvmpy_exit_io *", ffi.cast("char *", run) + lib.KVMPY_RUN_UNION_OFFSET)
    iox.direction, iox.size, iox.port, iox.count = 1, 1, COUNT_PORT, 1   # KVM_EXIT_IO_OUT
    iox.data_offset = ffi.sizeof("struct kvm_run") - 8
    buf = memoryview(ffi.buffer(run))

    class FakeVcpu:
        run_struct, run_buffer = run, buf

    pio = PioBus()
    pio.insert(Counter(), COUNT_PORT, "counter")
    disp = Dispatcher(pio, MmioBus())
    vcpu = FakeVcpu()
    decode = ExitDecoder(run, buf).decode
    handle = disp.handle
    e = decode()
    dev = pio.lookup(COUNT_PORT).device
    kvmpy_run = lib.kvmpy_run

    def per(stmt) -> float:
        best = min(timeit.repeat(stmt, number=n, repeat=5))
        return best / n * 1e6

    return [
        ("lib.kvmpy_run(-1): cffi call, GIL release, EBADF ioctl", per(lambda: kvmpy_run(-1))),
        ("ffi.errno read", per(lambda: ffi.errno)),
        ("ExitDecoder.decode (KVM_EXIT_IO)", per(decode)),
        ("Dispatcher.handle (-> handle_io -> device.write)", per(lambda: handle(e, vcpu))),
        ("  of which Counter.write alone", per(lambda: dev.write(0, 1, 0))),
        ("decode + handle", per(lambda: handle(decode(), vcpu))),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10_000, help="loop iterations (default 10000)")
    p.add_argument("--outs", type=int, default=10, help="outs per iteration (default 10)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each run (default 5)")
    p.add_argument("--mem", type=int, default=16, help="guest RAM in MiB (default 16)")
    p.add_argument("--baseline", default=os.path.join(HERE, "baseline"),
                   help="the C baseline binary (built from baseline.c)")
    p.add_argument("--out", default=os.path.join(HERE, "..", "out", "exit_cost"),
                   help="where the guest binaries go")
    p.add_argument("--only", choices=["c", "kvmpy"], help="run one side only (for profilers)")
    p.add_argument("--profile", action="store_true", help="also profile kvmpy with cProfile")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the Python pieces of the exit path")
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    n = args.iters * args.outs
    guest = build_guest(args.out, args.iters, args.outs)
    loop = build_guest(args.out, args.iters, 0)
    sides = {"c": lambda img, exp: run_c(args.baseline, img, args.mem, exp),
             "kvmpy": lambda img, exp: run_kvmpy(img, args.mem, exp)}
    if args.only:
        sides = {args.only: sides[args.only]}
    if "c" in sides and not os.access(args.baseline, os.X_OK):
        raise SystemExit(f"bench_exit_cost: {args.baseline} is missing; run `make -C benchmarks`")

    names = list(sides)
    samples: dict[tuple[str, str], list[dict[str, int]]] = {}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            for kind, image, exp in (("outs", guest, n), ("loop", loop, 0)):
                samples.setdefault((name, kind), []).append(sides[name](image, exp))

    def med(name: str, kind: str, key: str = "mark_to_end_ns") -> float:
        return statistics.median(s[key] for s in samples[(name, kind)])

    print(f"exit cost: {n} exits to port {COUNT_PORT:#x} ({args.iters} iterations x "
          f"{args.outs} outs), real mode, {args.mem} MiB, median of {args.reps} interleaved runs")
    print(f"{'VMM':<8}{'raw µs/exit':>13}{'loop µs/exit':>14}{'net µs/exit':>13}"
          f"{'min raw':>10}{'max raw':>10}{'whole run ms':>14}")
    result: dict[str, tuple[float, float]] = {}
    for name in names:
        raw = med(name, "outs") / n / 1000
        loop_cost = med(name, "loop") / n / 1000
        net = raw - loop_cost
        raws = [s["mark_to_end_ns"] / n / 1000 for s in samples[(name, "outs")]]
        total = med(name, "outs", "total_ns") / 1e6
        result[name] = raw, net
        print(f"{name:<8}{raw:>13.3f}{loop_cost:>14.3f}{net:>13.3f}{min(raws):>10.3f}"
              f"{max(raws):>10.3f}{total:>14.1f}")
    if len(names) == 2:
        (c_raw, c_net), (k_raw, k_net) = result["c"], result["kvmpy"]
        print(f"ratio kvmpy/C: raw {k_raw / c_raw:.3f}, net {k_net / c_net:.3f} "
              f"(goal <= {GOAL}: {'met' if k_net / c_net <= GOAL else 'NOT met'}); "
              f"kvmpy adds {k_net - c_net:.2f} µs per exit")
    print("(whole run: C from open(/dev/kvm), kvmpy from Machine(); both to the end exit)")

    if args.breakdown:
        print("\nPython pieces of kvmpy's exit path, best of 5 (no KVM involved):")
        for what, us in breakdown():
            print(f"  {what:<56}{us:>8.3f} µs")
    if args.profile:
        print("\ncProfile of kvmpy.vcpu.runner.run_loop, one run, sorted by own time:")
        print(profile_kvmpy(guest, args.mem, n, 15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
