#!/usr/bin/env python3
"""Run kvmpy's `hwvirt` tests (real Linux guests) on a host without VT-x/AMD-V, inside QEMU.

On a software KVM such as PVM a stock kernel cannot boot, so the `hwvirt` tests skip. QEMU's
TCG emulates AMD SVM with nested paging (`-cpu max`), so a Linux VM under TCG ("L1") can load
kvm_amd and offer a hardware-style /dev/kvm. This script boots such an L1 (Debian's kernel, the
one the default guest uses, and a small busybox initramfs written with kvmpy.image's own
helpers), shares this machine's root file system with it over virtio-9p, and inside it, in a
chroot of that share, runs pytest on this checkout with the same Python and .venv. kvmpy then
boots the default guest ("L2") under L1's KVM: Linux to a shell, SMP, virtio devices, panic.

Everything is emulated, so it is slow (an L2 boot to the shell takes ~25-40 s instead of ~1 s);
the tests' timeouts are scaled with KVMPY_TEST_TIME_SCALE (default here 4). What this proves is
kvmpy's side against a real kernel; KVM's here is the L1 kernel's kvm_amd running on QEMU's
emulated SVM, whose own gaps show up as such (e.g. XSETBV is not intercepted, so the L2 kernel
warns about an XSAVE size mismatch; QEMU with -enable-kvm in L1 shows the same).

    make test-nested          # = .venv/bin/python tests/nested/hwvirt_in_qemu.py --if-needed
    .venv/bin/python tests/nested/hwvirt_in_qemu.py -k panic     # always; extra pytest args

Needs qemu-system-x86_64 (`make deps` installs it when missing) and about 6 GiB of RAM.

Not in `make test`: the nested stack itself fails now and then. Seen: a run silent during the
fast-boot test (second session, no heartbeat yet); in the third session, 3 of about 15 runs
of the SMP boot test: its L2 kernel stopping at ~17 s of its boot with one L1 CPU busy, the
test failing after its 480 s timeout (a clean-clone CI run); the L2 kernel's output cut
mid-line at ~12 s and, in a later run, at ~18.5 s, the VM ended by a triple fault of L2
(KVM_EXIT_SHUTDOWN, which expect() now reports as GuestEnded), in a test with no virtio
device, so with nothing of kvmpy's writing guest memory after the kernel was loaded; L1
going silent, heartbeat included (the watchdog killed it, the retry passed); and L1's own
kernel dying: "BUG: TASK stack guard page was hit" at error_entry in the thread of kvmpy's vCPU
1, then "Kernel panic - not syncing: corrupted stack end detected inside scheduler", while the
heartbeat showed both vCPU threads running (state R, in KVM_RUN), none waiting in kvmpy. A
kernel stack overflow on the exception path of L1's kvm_amd on QEMU's emulated SVM is not
something kvmpy's user space can cause; it is the emulation's (or L1 KVM's) failure, and the
triple faults look the same way. Together too many for a CI gate.

L1 itself has been seen to stop (one run in seven, in the second session: QEMU busy, no output
for 17 minutes, not even pytest's own timeouts firing). So L1's init prints a heartbeat every
20 s (with what the Python processes in it are doing); if no sign of life comes for
HEARTBEAT_LOST_S, L1 is taken to be stuck, QEMU is killed and the run starts again, once.
Inside L1, pytest is bounded too (PYTEST_LIMIT_S) and stops at its first failure, so a hang of
kvmpy or of a test ends as a failure with pytest's status, not as a lost L1.

The whole step is bounded (STEP_LIMIT_S; a retry only with MIN_TRY_S left, pytest in L1 to
each try's time), so that a run with the suite stays under 20 minutes however L1 behaves.

Exit status: pytest's inside L1 (0-5), or the runner's own: NOT_RUN (10: L1 stuck on every try
in different tests, or no SVM in L1's CPU; ``--if-needed`` (`make test-nested`) says so loudly
and returns 0), NOTHING_PASSED (11), NO_KVM (12: SVM but no /dev/kvm in L1), STALLED (13: stuck
on every try in the same test), OUT_OF_TIME (14: L1 alive, tests too slow or hung), NO_STATUS (15).
"""
from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from kvmpy import debian, image                                # noqa: E402
from kvmpy.errors import KvmpyError                            # noqa: E402
from kvmpy.initramfs import CpioArchive, write_archive         # noqa: E402

CACHE = os.path.join(os.environ.get("KVMPY_CACHE", os.path.expanduser("~/.cache/kvmpy")),
                     "nested")
# kvm_amd for /dev/kvm; 9p over virtio-pci for the host's root file system.
L1_MODULES = ["kvm_amd", "virtio_pci", "9pnet_virtio", "9p"]
DEFAULT_TESTS = ["tests/test_linux_hwvirt.py", "tests/test_virtio_hwvirt.py"]
STATUS_RE = re.compile(rb"L1: command exit status (\d+)")
SUMMARY_RE = re.compile(rb"^=+ (.+) in [\d.]+s\b")   # pytest's last line
# Time: a normal run takes ~5-6 minutes on 2 cores (L1 boots in ~40 s, the tests ~260 s).
STEP_LIMIT_S = 900              # all tries together: with the suite, < 20 min on 2 cores
LIMIT_S = 720                   # one try (QEMU under timeout(1), as a last bound)
MIN_TRY_S = 420                 # a retry starts only with this much of STEP_LIMIT_S left
PYTEST_MARGIN_S = 90            # pytest in L1 gets the try's time less this (boot, power off)
HEARTBEAT_S = 20                # L1's init prints "L1: alive" this often ...
HEARTBEAT_LOST_S = 240          # ... and L1 is stuck after this long without a sign of life
FIRST_SIGN_S = 480              # QEMU's firmware and L1's kernel before the first "L1:" line
DONE_GRACE_S = 60               # after L1 reported the tests' status, to power off
TRIES = 2
# The runner's own outcomes, above pytest's exit statuses (0-5):
NOT_RUN = 10                    # the tests could not run here (0 under --if-needed)
NOTHING_PASSED = 11             # pytest passed without passing a test
NO_KVM = 12                     # L1's CPU has SVM but L1 has no /dev/kvm: L1's build is broken
STALLED = 13                    # L1 stalled on every try, in the same test
OUT_OF_TIME = 14                # L1 alive but the try's time ran out (tests too slow or hung)
NO_STATUS = 15                  # QEMU ended without L1 reporting the tests' status
L1_MEM = "6G"                   # L1's RAM: L2 guests of 512 MiB and the tests' files in tmpfs
L1_MEM_NEEDED = 7 << 30         # what --if-needed wants available before it starts L1

# L1's /init: mount the basics, load the modules, mount the host's root over 9p and run the
# command file named on the kernel command line (nested.cmd=) in a chroot of it, then power off.
L1_INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read -r cmdline < /proc/cmdline
cmd=
limit=600
for w in $cmdline; do
  case "$w" in nested.cmd=*) cmd="${w#nested.cmd=}";; nested.limit=*) limit="${w#nested.limit=}";; esac
done
# The heartbeat says what each thread of the Python processes (pytest, kvmpy's vCPU and I/O
# threads) is doing: tid:name:state:wchan.
beat() {
  s=""
  for d in /proc/[0-9]*; do
    read -r c < $d/comm 2>/dev/null || continue
    case "$c" in python*)
      for t in $d/task/[0-9]*; do
        read -r n < $t/comm; read -r w < $t/wchan; set -- $(cat $t/stat 2>/dev/null)
        s="$s ${t##*/}:$n:$3:$w"
      done;;
    esac
  done
  read -r l1 rest < /proc/loadavg
  echo "L1: alive, load $l1, threads$s"
}
(while :; do sleep @HEARTBEAT@; beat; done) &
for m in @MODULES@; do insmod /lib/modules/@VERSION@/$m || echo "L1: insmod $m failed"; done
grep -qw svm /proc/cpuinfo && echo "L1: cpu has svm" || echo "L1: cpu has no svm"
[ -c /dev/kvm ] && echo "L1: /dev/kvm ready" || echo "L1: no /dev/kvm"
ifconfig lo 127.0.0.1 up
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /host \
  || echo "L1: 9p mount failed"
mount --bind /dev /host/dev
mount -t devpts devpts /host/dev/pts 2>/dev/null
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t tmpfs tmpfs /host/run
echo "L1: running $cmd"
chroot /host /usr/bin/env HOME=/root TERM=dumb NESTED_LIMIT="$limit" \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /bin/sh "$cmd"
echo "L1: command exit status $?"
sync
poweroff -f
"""


def build_l1_initramfs() -> tuple[str, str]:
    """(L1 kernel, L1 initramfs path); the initramfs is written anew on every run (~2 s)."""
    kernel = debian.debian_kernel()
    busybox = debian.busybox_static()
    modules = image.module_closure(kernel.modules, L1_MODULES)
    init = (L1_INIT.replace("@VERSION@", kernel.version)
            .replace("@MODULES@", " ".join(m.path for m in modules))
            .replace("@HEARTBEAT@", str(HEARTBEAT_S)))
    a = CpioArchive()
    for d in ("bin", "dev", "proc", "sys", "tmp", "host", "lib", "lib/modules",
              f"lib/modules/{kernel.version}"):
        a.add_dir(d)
    a.add_file("bin/busybox", source=busybox, mode=0o755)
    for applet in ("sh", "mount", "insmod", "ifconfig", "mkdir", "chroot", "echo", "sync",
                   "poweroff", "cat", "sleep", "grep"):
        a.add_symlink(f"bin/{applet}", "busybox")
    for path, major, minor, mode in image.DEVICES:
        a.add_chardev(path, major, minor, mode)
    for m in modules:
        a.add_file(f"lib/modules/{kernel.version}/{m.path}", image.read_module(m.source),
                   mode=0o644)
    a.add_file("init", init.encode(), mode=0o755)
    os.makedirs(CACHE, exist_ok=True)
    out = os.path.join(CACHE, "l1-initramfs.cpio.gz")
    write_archive(a, out, compress=True)
    return kernel.bzimage, out


def main(argv: list[str]) -> int:
    # SIGTERM/SIGHUP (a cancelled CI job, a closed terminal) must run the finally clauses that
    # kill QEMU: it runs in a session of its own, out of reach of signals to our group.
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        status = _main(argv)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return status


def _main(argv: list[str]) -> int:
    if_needed = argv[:1] == ["--if-needed"]
    if if_needed:
        # `make test-nested`: where this host's KVM boots Linux itself, the suite runs them.
        from kvmpy.doctor import can_boot_linux, kvm_flavour

        kind, desc = kvm_flavour()
        if can_boot_linux(kind):
            print(f"hwvirt tests ran natively on this host ({desc}): no nested run needed")
            return 0
        print(f"this host's KVM is {kind} ({desc}): running the hwvirt tests in a QEMU VM "
              "with emulated SVM (a few minutes)", flush=True)
        argv = argv[1:]
    qemu = "qemu-system-x86_64"
    if subprocess.run(["sh", "-c", f"command -v {qemu}"], capture_output=True).returncode:
        print(f"{qemu} is not installed (apt-get install qemu-system-x86, or `make "
              "test-nested`)", file=sys.stderr)
        return 2
    if if_needed and _mem_available() < L1_MEM_NEEDED:
        print(f"hwvirt_in_qemu: the hwvirt tests were NOT RUN: L1 needs about "
              f"{L1_MEM_NEEDED >> 30} GiB of free memory, this host has "
              f"{_mem_available() / (1 << 30):.1f} GiB available", file=sys.stderr)
        return 0
    try:
        kernel, initrd = build_l1_initramfs()
    except KvmpyError as e:      # e.g. Debian's kernel package could not be fetched
        if not if_needed:
            raise
        print(f"hwvirt_in_qemu: the hwvirt tests were NOT RUN: no L1 kernel: {e}",
              file=sys.stderr)
        return 0
    scale = os.environ.get("KVMPY_TEST_TIME_SCALE", "4")
    pytest_args = argv or ["-m", "hwvirt", "--maxfail=1", *DEFAULT_TESTS]
    # The tests' temporary files (disk images, the guest's initramfs) go to a tmpfs in L1
    # (/run there), not over 9p; the checkout itself may be anywhere, /tmp included. -v: a
    # line per test as it ends (progress in the log). timeout(1) --foreground and stdin from
    # /dev/null: without them pytest ran in a background process group of L1's console, and
    # kvmpy's first terminal access stopped it (SIGTTIN/SIGTTOU) with L1 idle and alive.
    # NESTED_LIMIT: the try's time less PYTEST_MARGIN_S (L1's init passes nested.limit=).
    with tempfile.NamedTemporaryFile("w", dir=CACHE, suffix=".sh", delete=False) as f:
        f.write(f"mkdir -p /run/tmp && cd {shlex.quote(ROOT)} && PYTHONDONTWRITEBYTECODE=1 "
                f"TMPDIR=/run/tmp KVMPY_TEST_TIME_SCALE={shlex.quote(scale)} "
                f'timeout --foreground -k 10 "${{NESTED_LIMIT:-600}}" '
                f"{shlex.quote(sys.executable)} -m pytest -p no:cacheprovider -v -rA "
                f"{' '.join(shlex.quote(a) for a in pytest_args)} </dev/null\n")
        script = f.name

    def command(limit: float) -> list[str]:
        # timeout(1): a bound on the try even if this script died (the watchdog is below).
        return ["timeout", "-k", "10", str(int(limit)),
                qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", L1_MEM,
                "-M", "q35", "-nographic", "-no-reboot", "-nic", "none",
                "-kernel", kernel, "-initrd", initrd,
                "-append", f"console=ttyS0 panic=-1 quiet loglevel=4 nested.cmd={script} "
                           f"nested.limit={int(limit - PYTEST_MARGIN_S)}",
                "-fsdev", "local,id=host,path=/,security_model=none,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=host,mount_tag=hostroot"]

    deadline = _clock() + STEP_LIMIT_S
    runs: list[L1Run] = []
    try:
        for attempt in range(1, TRIES + 1):
            left = deadline - _clock()
            if runs and left < MIN_TRY_S:
                print(f"hwvirt_in_qemu: {left:.0f} s left of {STEP_LIMIT_S} s: no time for "
                      "another try", file=sys.stderr)
                break
            limit = min(LIMIT_S, left)
            runs.append(run_l1(command(limit), deadline=_clock() + limit - 10))
            run = runs[-1]
            if not run.lost:
                break
            print(f"hwvirt_in_qemu: {run.why}: L1 is stuck (QEMU's emulation), killed (try "
                  f"{attempt} of {TRIES}; last test: {run.last_test or '-'}; last heartbeat: "
                  f"{run.last_beat or '-'})", file=sys.stderr, flush=True)
    finally:
        os.unlink(script)
    status = _outcome(runs)
    if status == NOT_RUN and if_needed:
        return 0
    return status


def _outcome(runs: list["L1Run"]) -> int:
    """The exit status for what the tries showed, with a line on stderr for the runner's own
    outcomes (see the module docstring)."""
    run = runs[-1]

    def say(what: str) -> None:
        print(f"hwvirt_in_qemu: {what}", file=sys.stderr)
    if run.lost:
        tests = {r.last_test for r in runs}
        if len(runs) > 1 and len(tests) == 1 and "" not in tests:
            say(f"FAILED: L1 stalled on all {len(runs)} tries in the same test, {run.last_test}: "
                "that looks like kvmpy's doing, not a chance stall of the emulation")
            return STALLED
        say(f"the hwvirt tests were NOT RUN: L1 got stuck ({len(runs)} "
            f"{'try' if len(runs) == 1 else 'tries'}; an emulation failure inside QEMU, not a "
            f"kvmpy test result; last test: {run.last_test or '-'})")
        return NOT_RUN
    if run.svm is False:
        say("the hwvirt tests were NOT RUN: this QEMU does not emulate SVM for L1")
        return NOT_RUN
    if run.kvm is False:
        say("FAILED: L1's CPU has SVM but L1 has no /dev/kvm (kvm_amd did not load: see above)")
        return NO_KVM
    if run.timed_out:
        say(f"FAILED: the try's time ran out with L1 alive (tests too slow or hung; last test: "
            f"{run.last_test or '-'}; last heartbeat: {run.last_beat or '-'})")
        return OUT_OF_TIME
    if run.status is None:
        say("FAILED: QEMU ended without L1 reporting the tests' status (see the log above)")
        return NO_STATUS
    if run.status == 0 and not run.passed:
        say("FAILED: pytest in L1 passed no test (all skipped or none collected?)")
        return NOTHING_PASSED
    return run.status


def _mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class L1Run(typing.NamedTuple):
    status: int | None      # the status L1 reported for the tests
    lost: bool              # killed: no sign of life for too long
    timed_out: bool         # killed at the try's deadline with L1 still alive
    why: str                # what the watchdog saw, when it killed
    svm: bool | None        # L1's CPU has SVM (True) or not (False)
    kvm: bool | None        # L1 said "/dev/kvm ready" (True) or "no /dev/kvm" (False)
    passed: int             # "N passed" from pytest's summary line
    last_test: str          # the last test pytest named
    last_beat: str          # L1's last heartbeat


def run_l1(cmd: list[str], deadline: float | None = None, lost_after: float = HEARTBEAT_LOST_S,
           first_after: float = FIRST_SIGN_S, done_grace: float = DONE_GRACE_S) -> L1Run:
    """Run QEMU (L1), copying its console here, until it exits, or until

    - it shows no sign of life (a line from L1's init, its heartbeat or pytest; kernel
      messages do not count) for ``lost_after`` seconds (``first_after`` before its first
      "L1:" line): lost;
    - ``deadline`` (a _clock() time): timed out, or lost if even the heartbeat had stopped
      for a minute;
    - ``done_grace`` seconds after it reported the tests' status.

    QEMU runs in a session of its own and its whole process group is killed on the way out,
    whatever the way."""
    status = svm = kvm = None
    passed, last_test, last_beat = 0, "", ""
    seen_l1 = lost = timed_out = False
    why = ""
    done_at = None
    lines: queue.Queue = queue.Queue()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)

    def pump():
        for line in p.stdout:
            lines.put(line)
        lines.put(None)
    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        last_sign = last_beat_at = _clock()
        while True:
            now = _clock()
            if done_at is not None:
                wait = done_at + done_grace - now
            else:
                quiet = lost_after if seen_l1 else first_after
                wait = last_sign + quiet - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
            if wait <= 0:        # decided before reading on: a flood of lines cannot hide it
                if done_at is None:
                    if deadline is not None and now >= deadline:
                        lost = now - last_beat_at >= 60
                        timed_out = not lost
                        why = "the try's time ran out" + (", no heartbeat for a minute" if lost
                                                          else "")
                    else:
                        lost = True
                        why = (f"no sign of life for {lost_after:.0f} s" if seen_l1 else
                               f"no line from L1's init within {first_after:.0f} s")
                break
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                continue
            if line is None:
                break
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            text = line.strip()
            if not text.startswith(b"["):        # printk lines of a stuck kernel do not count
                last_sign = _clock()
            beat = text.find(b"L1: alive")       # also after a pytest -v line left open
            if beat >= 0:
                last_beat, last_beat_at = text[beat:].decode(errors="replace"), _clock()
            if text.startswith(b"L1:"):
                seen_l1 = True
                if text == b"L1: cpu has svm":
                    svm = True
                elif text == b"L1: cpu has no svm":
                    svm = False
                elif text == b"L1: /dev/kvm ready":
                    kvm = True
                elif text == b"L1: no /dev/kvm":
                    kvm = False
            if text.startswith(b"tests/"):
                last_test = text.split()[0].decode(errors="replace")
            m = STATUS_RE.search(line)
            if m:
                status, done_at = int(m.group(1)), _clock()
            m = SUMMARY_RE.match(text)
            if m:
                n = re.search(rb"(\d+) passed", m.group(1))
                passed = int(n.group(1)) if n else 0
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)     # timeout(1) and QEMU: its session's group
        except ProcessLookupError:
            pass
        p.wait()
        pumper.join(10)
        if not pumper.is_alive():               # else something outside holds the pipe
            p.stdout.close()
    return L1Run(status, lost, timed_out, why, svm, kvm, passed, last_test, last_beat)


def _clock() -> float:
    return time.monotonic()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
