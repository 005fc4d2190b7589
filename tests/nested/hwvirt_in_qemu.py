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

L1 itself has been seen to stop (one run in seven, in the second session: QEMU busy, no output
for 17 minutes, not even pytest's own timeouts firing). So L1's init prints a heartbeat every
20 s; if none comes for HEARTBEAT_LOST_S, L1 is taken to be stuck, QEMU is killed and the run
starts again, once. Inside L1, pytest is bounded too (PYTEST_LIMIT_S), so a hang of kvmpy or of
a test ends as a failure with pytest's status, not as a lost L1.

Exit status: pytest's inside L1; 3 if L1 never reported it (see the log); 4 if L1 stopped
responding on both tries (an emulation failure, not a test result). ``--if-needed`` (what
`make test` runs) returns 0 for that last case, saying loudly that the tests were NOT run.
"""
from __future__ import annotations

import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading

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
LIMIT_S = 1800                  # one nested run; it takes ~4-5 minutes on 2 cores
PYTEST_LIMIT_S = 1500           # pytest inside L1 (its tests' own timeouts are far shorter)
HEARTBEAT_S = 20                # L1's init prints "L1: alive" this often ...
HEARTBEAT_LOST_S = 240          # ... and L1 is stuck if the console is silent this long
TRIES = 2
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
for w in $cmdline; do case "$w" in nested.cmd=*) cmd="${w#nested.cmd=}";; esac; done
# The heartbeat says what the Python processes (pytest, kvmpy) are doing: pid:state:wchan.
beat() {
  s=""
  for d in /proc/[0-9]*; do
    read -r c < $d/comm 2>/dev/null || continue
    case "$c" in python*) read -r w < $d/wchan; set -- $(cat $d/stat); s="$s ${d#/proc/}:$3:$w";; esac
  done
  read -r l1 rest < /proc/loadavg
  echo "L1: alive, load $l1, python$s"
}
(while :; do sleep @HEARTBEAT@; beat; done) &
for m in @MODULES@; do insmod /lib/modules/@VERSION@/$m || echo "L1: insmod $m failed"; done
[ -c /dev/kvm ] && echo "L1: /dev/kvm ready" || echo "L1: no /dev/kvm (is SVM emulated?)"
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
chroot /host /usr/bin/env HOME=/root TERM=dumb \
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
                   "poweroff", "cat", "sleep"):
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
    if_needed = argv[:1] == ["--if-needed"]
    if if_needed:
        # `make test`: where this host's KVM boots Linux itself, the suite ran them.
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
    pytest_args = argv or ["-m", "hwvirt", *DEFAULT_TESTS]
    # The tests' temporary files (disk images, the guest's initramfs) go to a tmpfs in L1
    # (/run there), not over 9p; the checkout itself may be anywhere, /tmp included. -v: a
    # line per test as it ends (progress in the log). timeout(1) --foreground and stdin from
    # /dev/null: without them pytest ran in a background process group of L1's console, and
    # kvmpy's first terminal access stopped it (SIGTTIN/SIGTTOU) with L1 idle and alive.
    with tempfile.NamedTemporaryFile("w", dir=CACHE, suffix=".sh", delete=False) as f:
        f.write(f"mkdir -p /run/tmp && cd {shlex.quote(ROOT)} && PYTHONDONTWRITEBYTECODE=1 "
                f"TMPDIR=/run/tmp KVMPY_TEST_TIME_SCALE={shlex.quote(scale)} "
                f"timeout --foreground -k 10 {PYTEST_LIMIT_S} "
                f"{shlex.quote(sys.executable)} -m pytest -p no:cacheprovider -v -rA "
                f"{' '.join(shlex.quote(a) for a in pytest_args)} </dev/null\n")
        script = f.name
    # timeout(1): a bound on the whole run even if the watchdog below failed.
    cmd = ["timeout", "-k", "10", str(LIMIT_S),
           qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", L1_MEM,
           "-M", "q35", "-nographic", "-no-reboot", "-nic", "none",
           "-kernel", kernel, "-initrd", initrd,
           "-append", f"console=ttyS0 panic=-1 quiet loglevel=4 nested.cmd={script}",
           "-fsdev", "local,id=host,path=/,security_model=none,multidevs=remap",
           "-device", "virtio-9p-pci,fsdev=host,mount_tag=hostroot"]
    try:
        for attempt in range(1, TRIES + 1):
            status, lost = run_l1(cmd)
            if not lost:
                break
            print(f"hwvirt_in_qemu: L1 printed nothing for {HEARTBEAT_LOST_S} s, not even its "
                  f"heartbeat: it is stuck (QEMU's emulation), killed (try {attempt} of {TRIES})",
                  file=sys.stderr, flush=True)
    finally:
        os.unlink(script)
    if lost:
        print(f"hwvirt_in_qemu: the hwvirt tests were NOT RUN: L1 got stuck on all {TRIES} tries "
              "(an emulation failure inside QEMU, not a kvmpy test result)", file=sys.stderr)
        return 0 if if_needed else 4
    if status == 3:
        print(f"hwvirt_in_qemu: L1 did not report the tests' status (past {LIMIT_S} s, or no "
              "/dev/kvm in L1: see the log above)", file=sys.stderr)
    return status


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


def run_l1(cmd: list[str], lost_after: float | None = None) -> tuple[int, bool]:
    """Run QEMU (L1) and copy its console here; (the status L1 reported or 3, whether L1 was
    killed for printing nothing for ``lost_after`` seconds)."""
    lost_after = HEARTBEAT_LOST_S if lost_after is None else lost_after
    status = 3
    lines: queue.Queue = queue.Queue()
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as p:
        def pump():
            for line in p.stdout:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=pump, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=lost_after)
            except queue.Empty:
                p.kill()
                p.wait()
                return status, True
            if line is None:
                break
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            m = STATUS_RE.search(line)
            if m:
                status = int(m.group(1))
    return status, False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
