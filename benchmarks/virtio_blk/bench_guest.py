#!/usr/bin/env python3
"""virtio-blk 4 KiB random reads driven by a real guest: kvmpy and QEMU side by side, against
an os.preadv loop on the same offsets.

The guest (tests/guests/virtio_blk_bench.S, also run by tests/test_virtio_cli.py) is one PVH
ELF that both VMMs boot with their own virtio-mmio transport: kvmpy ``boot --transport mmio
--disk IMG,ro`` and QEMU ``-M microvm -device virtio-blk-device``. It sets up long mode and the
device at CPL0, then runs its driver at CPL3 (native speed on this PVM host, where CPL0 is
emulated): batches of QD chains (header | 4 KiB device-writable | status), one avail.idx
store, a QueueNotify store (an ioeventfd in kvmpy and in QEMU with KVM; a TCG vCPU calls
QEMU's device directly), then waits for the batch and checks every status byte and used
length. The sectors come from xorshift64 in the guest; the preadv loop reads the same blocks
in the same order (computed here). The guest waits for a batch in one of two ways
(``--completions``):

- **poll**: spins on used.idx at CPL3, VIRTQ_AVAIL_F_NO_INTERRUPT set (a Linux poll queue);
- **irq**: sleeps in ``hlt`` at CPL0 until the used-buffer interrupt (irqfd in kvmpy; the
  IOAPIC delivers it), whose handler reads InterruptStatus, writes InterruptACK and EOIs the
  local APIC, as Linux's virtio_mmio does. On this PVM host that CPL0 part runs emulated (about
  1 M instructions/s: tens of µs a batch), for both VMMs alike.

The guest prints "t" before and after each repetition; this script timestamps each line as
it arrives on the VMM's stdout (a pipe) and turns the time between two into req/s. Each round
runs the preadv loop once and every VMM once (a fresh process each, two repetitions: the
first is the warm-up and is dropped); the tables show medians over the rounds. Each run must
report no failed request, and the data it read must match the file (the last batch's
first block, and a hash of the first 8 bytes of every sector read, in order).

Exit status 0 unless a run failed or read wrong data; the ratios are reported, not enforced.
"""
from __future__ import annotations

import argparse
import mmap
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from bench_virtio_blk import BLOCK, DISK, make_disk, run_preadv, warm   # noqa: E402
from conftest import pvh_kernel                                               # noqa: E402
from virtio_driver import bench_blocks, bench_end, bench_expect               # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "out", "virtio_blk")
NBLOCKS = DISK // BLOCK
MEM = "64M"


def build_guest(qd: int, nbatch: int, reps: int, irq: bool) -> str:
    d = os.path.join(OUT, f"guest-qd{qd}-{'irq' if irq else 'poll'}")
    os.makedirs(d, exist_ok=True)
    syms = {"QD": qd, "NBATCH": nbatch, "REPS": reps, "NBLOCKS": NBLOCKS, "IRQ": int(irq)}
    return str(pvh_kernel("virtio_blk_bench", Path(d), defsyms=syms))


def commands(names: list[str], kernel: str, disk: str, qemu: str) -> dict[str, tuple]:
    """name -> (argv, extra environment)"""
    kvmpy = [os.path.join(ROOT, ".venv", "bin", "kvmpy"), "boot", "--kernel", kernel,
             "--append", "x", "--mem", MEM, "--transport", "mmio", "--disk", disk + ",ro"]
    q = [qemu, "-M", "microvm", "-m", MEM, "-kernel", kernel, "-append", "x", "-nodefaults",
         "-no-reboot", "-display", "none", "-serial", "stdio",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-global", "virtio-mmio.force-legacy=false", "-device", "virtio-blk-device,drive=d0"]
    drive = f"id=d0,file={disk},format=raw,if=none,readonly=on"
    all_ = {
        "kvmpy": (kvmpy, {}),
        "kvmpy-nopoll": (kvmpy, {"KVMPY_BLK_POLL_US": "0"}),
        "kvmpy-python": (kvmpy, {"KVMPY_BLK_ENGINE": "python"}),
        "qemu-tcg": (q + ["-accel", "tcg", "-drive", drive], {}),
        "qemu-kvm": (q + ["-accel", "kvm", "-drive", drive], {}),
        "qemu-kvm-iouring": (q + ["-accel", "kvm", "-drive", drive + ",aio=io_uring"], {}),
    }
    return {n: all_[n] for n in names}


def run_vm(argv: list[str], env: dict, reps: int,
           timeout: float) -> tuple[list[float], str, int]:
    """Runs one VM; returns the seconds between consecutive "t" lines, the "end" line and the
    interrupts the guest took (0 when it polls)."""
    e = dict(os.environ, **env)
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=e)
    marks, buf, end, irqs = [], b"", None, 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
                raise RuntimeError(f"{argv[0]}: no output for {timeout} s")
            chunk = os.read(p.stdout.fileno(), 4096)
            now = time.perf_counter()
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line == b"t":
                    marks.append(now)
                elif line.startswith(b"end "):
                    end = line.decode()
                elif line.startswith(b"irqs:"):
                    irqs = int(line[5:], 16)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        err = p.stderr.read().decode(errors="replace")
        p.stdout.close()
        p.stderr.close()
    if end is None or len(marks) != reps + 1 or p.returncode != 0x21:
        raise RuntimeError(f"{' '.join(argv)}: status {p.returncode}, {len(marks)} marks, "
                           f"end {end!r}; stderr: {err.strip()[-500:]}")
    return [b - a for a, b in zip(marks, marks[1:])], end, irqs


def check_end(end: str, want: dict[str, int]) -> None:
    """The guest's ``end`` line: no failed request, the expected last sector, the file's bytes
    there, and the hash of every sector read (virtio_driver.bench_expect)."""
    got = bench_end(end)
    if got != want:
        raise RuntimeError(f"the guest said {end!r}, expected "
                           + " ".join(f"{k}:{v:x}" for k, v in want.items()))


def run_config(a, names: list[str], disk: str, mode: str, qd: int) -> int:
    """One table: the preadv loop and every VMM, ``a.rounds`` rounds. Returns failed runs."""
    if mode not in ("poll", "irq"):
        raise SystemExit(f"--completions: {mode!r} is neither poll nor irq")
    nbatch = max(1, a.requests // qd)
    n = nbatch * qd
    kernel = build_guest(qd, nbatch, 2, mode == "irq")
    offs = [b * BLOCK for b in bench_blocks(2 * n, NBLOCKS)]
    warmup, timed = offs[:n], offs[n:]        # the guest's two repetitions
    with open(disk, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        want = bench_expect(m, 2 * n, qd)
    cmds = commands(names, kernel, disk, a.qemu)
    rates: dict[str, list[float]] = {k: [] for k in ["preadv", *cmds]}
    irqs: dict[str, list[int]] = {k: [] for k in cmds}
    bad = 0
    for _ in range(a.rounds):
        run_preadv(disk, warmup)              # the same warm-up the guest gets
        rates["preadv"].append(n / run_preadv(disk, timed))
        for name, (argv, env) in cmds.items():
            try:
                secs, end, taken = run_vm(argv, env, 2, a.timeout)
                check_end(end, want)
            except RuntimeError as e:
                print(f"{mode} QD {qd} {name}: FAILED: {e}")
                bad += 1
                continue
            rates[name].append(n / secs[1])
            irqs[name].append(taken)
    base = statistics.median(rates["preadv"])
    print(f"\n## completions by {mode}, QD {qd}: {n} requests per run, median of {a.rounds} "
          f"rounds (load {os.getloadavg()[0]:.2f})")
    print("| driver: the guest, on | req/s | µs/req | / preadv loop | min-max / preadv "
          "| interrupts / batch |")
    print("|---|---|---|---|---|---|")
    for name, v in rates.items():
        if not v:
            print(f"| {name} | failed | | | | |")
            continue
        m = statistics.median(v)
        per = (f"{statistics.median(irqs[name]) / (2 * nbatch):.2f}"
               if name in irqs and mode == "irq" else "")
        print(f"| {name} | {m:,.0f} | {1e6 / m:.2f} | **{m / base:.3f}** | "
              f"{min(v) / base:.3f}-{max(v) / base:.3f} | {per} |")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100_000, help="per timed repetition")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--depths", default="32,1")
    ap.add_argument("--completions", default="poll,irq", help="poll, irq or both")
    ap.add_argument("--vmms", default="kvmpy,kvmpy-python,qemu-tcg,qemu-kvm",
                    help="of kvmpy, kvmpy-nopoll, kvmpy-python, qemu-tcg, qemu-kvm, "
                         "qemu-kvm-iouring")
    ap.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    names = a.vmms.split(",")
    if any(n.startswith("qemu") for n in names) and not a.qemu:
        raise SystemExit("qemu-system-x86_64 not found (make -C benchmarks qemu), or drop the "
                         "qemu entries from --vmms")
    disk = os.path.join(OUT, "disk.img")
    make_disk(disk)
    warm(disk)
    print(f"# {os.uname().nodename}: load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    bad = 0
    for mode in a.completions.split(","):
        for qd in (int(d) for d in a.depths.split(",")):
            bad += run_config(a, names, disk, mode, qd)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
