"""kvmpy.VM: the scripting API test rigs use."""
import contextlib
import gc
import os
import resource
import signal
import sys
import threading
import time

import pytest

import kvmpy
from kvmpy.api import ConsoleTimeout
from kvmpy.errors import KvmpyError


VM_RAM = 256 << 20    # kvmpy.VM's default mem="256M"


def vm_mappings() -> int:
    """Mappings that only a VM holds: each vCPU's kvm_run area (a map of its vCPU fd, named
    anon_inode:kvm-vcpu:N) and guest RAM. RAM is an anonymous map that the kernel may merge
    with a neighbour, so it is found by size: nothing else in this process maps 256 MiB or
    more (glibc's malloc arenas are 64 MiB)."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
            if "anon_inode:kvm-vcpu" in line or end - start >= VM_RAM:
                n += 1
    return n


def counts():
    """fds, threads and the VM mappings of this process: equal before and after a VM means it
    left nothing behind."""
    return len(os.listdir("/proc/self/fd")), threading.active_count(), vm_mappings()


def test_console_expect_and_sendline(build_guest):
    with kvmpy.VM(image=build_guest("uart_poll"), mode="real", timeout=20) as vm:
        vm.console.sendline("hello")
        m = vm.console.expect(rb"hel+o\n", timeout=10)
        assert m.group(0) == b"hello\n"
        vm.console.send("q")
        r = vm.wait()
    assert r.status == 0x21 and r.reason == "debug-exit"
    assert r.exits["IO"] > 10
    assert vm.console.output == b"hello\nq"


def test_expect_timeout_names_pattern(build_guest):
    with kvmpy.VM(image=build_guest("spin"), mode="real") as vm:
        vm.console.expect("spinning")
        with pytest.raises(ConsoleTimeout, match="never-printed"):
            vm.console.expect("never-printed", timeout=0.3)


def test_hanging_vm_is_stopped_by_its_timeout(build_guest):
    with kvmpy.VM(image=build_guest("spin"), mode="real", timeout=0.3) as vm:
        r = vm.wait()
    assert (r.status, r.reason) == (124, "timeout")


def test_memory_and_registers(build_guest):
    with kvmpy.VM(image=build_guest("spin"), mode="real") as vm:
        vm.console.expect("spinning")
        regs = vm.registers(0)
        assert 0x7C00 <= regs["rip"] < 0x7E00 and regs["cr0"] & 1 == 0
        assert vm.read_memory(0x7C00, 1) == open(build_guest("spin"), "rb").read()[:1]
        vm.write_memory(0x1000, b"kvmpy")
        assert vm.read_memory(0x1000, 5) == b"kvmpy"
        vm.pause()
        vm.resume()
        r = vm.stop()
    assert r.reason == "stopped"


def test_bad_arguments():
    with pytest.raises(KvmpyError, match="either kernel= .* or image="):
        kvmpy.VM()
    with pytest.raises(KvmpyError, match="mode="):
        kvmpy.VM(image="x.bin", mode="weird")


def test_keyboard_interrupt_releases_everything(build_guest):
    img = build_guest("spin")
    before = counts()
    main = threading.main_thread().ident
    threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        with kvmpy.VM(image=img, mode="real") as vm:
            vm.wait()
    time.sleep(0.05)   # the Timer thread ends
    assert counts() == before


@pytest.mark.parametrize("to", ["main", "process"])
@pytest.mark.parametrize("thread_name", ["kvmpy-vcpu0", "kvmpy-io-virtio0"])
def test_ctrl_c_while_a_thread_starts_leaves_nothing_behind(build_guest, monkeypatch, tmp_path,
                                                            thread_name, to):
    """SIGINT arrives while Thread.start() waits for a new vCPU or I/O thread to run (made
    certain here: the new thread sends it and dawdles before it says it started), sent to the
    main thread or to the process (with another thread about that may take it). Before
    kvmpy/_sigint.py the KeyboardInterrupt left a running thread whose Thread object said it
    never started: closing the VM raised RuntimeError and the spinning vCPU ran on."""
    img = build_guest("spin")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    with kvmpy.VM(image=img, mode="real", disks=[str(disk)]) as vm:   # warm up
        vm.stop()
    before = counts()
    main = threading.main_thread().ident
    real_set_ident = threading.Thread._set_ident
    sent = []

    def set_ident(self):             # runs in the new thread before it reports "started"
        if self.name == thread_name and not sent:
            sent.append(1)
            if to == "main":
                signal.pthread_kill(main, signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)          # the main thread is inside Thread.start() meanwhile
        real_set_ident(self)
    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, daemon=True)   # may take a process signal
    bystander.start()
    monkeypatch.setattr(threading.Thread, "_set_ident", set_ident)
    try:
        with pytest.raises(KeyboardInterrupt):
            with kvmpy.VM(image=img, mode="real", disks=[str(disk)]) as vm:
                vm.wait()
    finally:
        monkeypatch.undo()
        idle.set()
        bystander.join()
    assert sent
    time.sleep(0.05)
    assert counts() == before


def _disk(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    return str(disk)


def _interrupt_the_first_vcpu_join(monkeypatch) -> list:
    """Make the next VcpuThread.join() send SIGINT to the main thread first (the Ctrl-C lands
    in the join's wait). The returned list is non-empty once it did."""
    from kvmpy.vcpu.runner import VcpuThread

    main = threading.main_thread().ident
    real_join = VcpuThread.join
    sent = []

    def join(self, timeout=None):
        if not sent:
            sent.append(1)
            signal.pthread_kill(main, signal.SIGINT)
        return real_join(self, timeout)
    monkeypatch.setattr(VcpuThread, "join", join)
    return sent


@pytest.mark.parametrize("started", [False, True])
def test_a_vm_nobody_holds_is_released(build_guest, tmp_path, started):
    """A VM dropped without close(): built and never entered (a Ctrl-C between ``kvmpy.VM()``
    and ``__enter__``), or started and forgotten. Its virtio I/O thread runs from construction
    and holds the machine, so before the finalizer nothing was ever released."""
    img, disk = build_guest("spin"), _disk(tmp_path)
    with kvmpy.VM(image=img, mode="real", disks=[disk]) as vm:   # warm up
        vm.stop()
    before = counts()
    vm = kvmpy.VM(image=img, mode="real", disks=[disk], trace=str(tmp_path / "t.txt"))
    if started:
        vm.start()
        vm.console.expect("spinning")
    fds, threads, maps = counts()   # vCPUs are created (and their kvm_run mapped) by start()
    assert fds > before[0] and threads > before[1] and maps == before[2] + 1 + started
    del vm
    gc.collect()
    assert counts() == before


def test_a_vm_collected_in_its_own_vcpu_thread_is_released(build_guest, tmp_path):
    """A VM in a reference cycle is freed by the cyclic collector in whichever thread runs it,
    here its own vCPU thread (a review helper's case): the release must not join that thread
    or unmap guest memory under it."""
    img, disk = build_guest("spin"), _disk(tmp_path)
    with kvmpy.VM(image=img, mode="real", disks=[disk]) as vm:   # warm up
        vm.stop()
    before = counts()
    vm = kvmpy.VM(image=img, mode="real", disks=[disk]).start()
    vm.console.expect("spinning")
    vm.me = vm                                   # a cycle: only the collector frees it
    vcpu = vm.machine.vcpu_threads[0]
    del vm
    errors = []
    with contextlib.ExitStack() as stack:
        stack.callback(setattr, threading, "excepthook", threading.excepthook)
        stack.callback(setattr, sys, "unraisablehook", sys.unraisablehook)
        threading.excepthook = sys.unraisablehook = errors.append   # a finalizer's error too
        vcpu.call(lambda v: gc.collect())
        deadline = time.monotonic() + 10
        while counts() != before and time.monotonic() < deadline:
            time.sleep(0.02)
    assert counts() == before and not errors


def test_a_ctrl_c_pending_as_a_machine_closes_does_not_skip_the_release(build_guest,
                                                                         monkeypatch):
    """``signal.signal`` runs a pending handler as sigint_deferred() begins, so the
    KeyboardInterrupt comes before anything is released; close() must still release."""
    import kvmpy.builder
    from kvmpy.builder import FlatConfig, build_flat
    from kvmpy.vcpu.modes import Mode

    cfg = FlatConfig(build_guest("spin"), Mode.REAL, mem_size=16 << 20,
                     console_sink=lambda b: None)
    with build_flat(cfg) as m:   # warm up
        m.start(m.setup)
    before = counts()
    m = build_flat(cfg)
    m.start(m.setup)
    real = kvmpy.builder.sigint_deferred
    calls = []

    def pending_first(*a):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt          # as a handler run at the section's start would
        return real(*a)
    monkeypatch.setattr(kvmpy.builder, "sigint_deferred", pending_first)
    with pytest.raises(KeyboardInterrupt):
        m.close()
    monkeypatch.undo()
    assert len(calls) == 2 and counts() == before


def test_ctrl_c_inside_vm_init_after_the_machine_is_built(build_guest, tmp_path, monkeypatch):
    img, disk = build_guest("spin"), _disk(tmp_path)
    with kvmpy.VM(image=img, mode="real", disks=[disk]) as vm:   # warm up
        vm.stop()
    before = counts()

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(kvmpy.api.Console, "_guest_ended", property(interrupted))
    with pytest.raises(KeyboardInterrupt):
        kvmpy.VM(image=img, mode="real", disks=[disk])
    monkeypatch.undo()
    gc.collect()
    assert counts() == before


def test_a_second_ctrl_c_while_the_vm_closes(build_guest, tmp_path, monkeypatch):
    """A Ctrl-C in the script makes ``with`` close the VM; another one while it closes (here:
    while it joins the vCPU thread, which takes its time to leave) used to end close() there,
    leaving the vCPU, the I/O thread, the fds and guest memory behind. Now the second one is
    raised once everything is released."""
    img, disk = build_guest("spin"), _disk(tmp_path)
    with kvmpy.VM(image=img, mode="real", disks=[disk]) as vm:   # warm up
        vm.stop()
    before = counts()
    main = threading.main_thread().ident
    sent = _interrupt_the_first_vcpu_join(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        with kvmpy.VM(image=img, mode="real", disks=[disk]) as vm:
            threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
            vm.console.expect("never printed", timeout=30)   # the first Ctrl-C lands here
    monkeypatch.undo()
    assert sent
    time.sleep(0.05)   # the Timer thread ends
    assert counts() == before


def test_ctrl_c_while_a_machine_closes_is_raised_after_its_threads_end(build_guest, monkeypatch):
    """Machine.close() of a running machine, interrupted while it joins the vCPU thread:
    the fds and guest memory must not go while the thread runs."""
    from kvmpy.builder import FlatConfig, build_flat
    from kvmpy.vcpu.modes import Mode

    img = build_guest("spin")
    cfg = FlatConfig(img, Mode.REAL, mem_size=16 << 20, console_sink=lambda b: None)
    with build_flat(cfg) as m:   # warm up
        m.start(m.setup)
    before = counts()
    m = build_flat(cfg)
    m.start(m.setup)
    time.sleep(0.1)
    slow_exit = m.vcpu_threads[0].on_exit
    m.vcpu_threads[0].on_exit = lambda outcome: (time.sleep(0.3), slow_exit(outcome))
    sent = _interrupt_the_first_vcpu_join(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        m.close()
    monkeypatch.undo()
    assert sent and not any(t._thread.is_alive() for t in m.vcpu_threads)
    assert counts() == before


def test_many_vms_in_sequence_and_in_threads(build_guest):
    img = build_guest("uart_hello")
    with kvmpy.VM(image=img, mode="real", mem="8M") as vm:   # warm up
        vm.wait(10)
    before = counts()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(50):
        with kvmpy.VM(image=img, mode="real", mem="8M") as vm:
            assert vm.wait(10).status == 0x21
    results = []

    def worker():
        for _ in range(3):
            with kvmpy.VM(image=img, mode="real", mem="8M") as vm:
                results.append((vm.wait(10).status, vm.console.output))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [(0x21, b"hello from a real-mode guest\na5\n")] * 12
    assert counts() == before
    # peak RSS grows by little: no per-VM leak (8 MiB of guest RAM each would show)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000


def test_disks_and_rng_keywords(build_guest, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    with kvmpy.VM(image=build_guest("uart_hello"), mode="real", disks=[f"{disk},ro"],
                  rng=True) as vm:
        assert vm.wait(10).status == 0x21
        names = [m.name for m in vm.machine.mmio.mappings]
    assert names == ["virtio0", "virtio1"]


def test_virtio_console_keyword_takes_the_typed_input(build_guest):
    from kvmpy.virtio.console import RX_BUFFER_MAX, VirtioConsole
    with kvmpy.VM(image=build_guest("uart_hello"), mode="real", virtio_console=True) as vm:
        assert vm.wait(10).status == 0x21
        assert isinstance(vm.console.uart, VirtioConsole)   # send() feeds hvc0, not COM1
        vm.console.send(b"queued")                         # no driver: held, bounded
        assert vm.console.uart.rx_free() == RX_BUFFER_MAX - 6
        names = [m.name for m in vm.machine.mmio.mappings]
    assert names == ["virtio0"]


TICKS = """
        .code16
        xor %ebp, %ebp
1:      PUTS "tick"
        NEWLINE
        inc %ebp                        /* the first instruction after the line's last OUT */
        jmp 1b
"""


def test_pause_on_stops_the_guest_at_the_matching_output(build_guest):
    # Each "tick" line is followed at once by inc %ebp: a pause that came even one instruction
    # late would show %ebp ahead of the number of lines seen.
    vm = kvmpy.VM(image=build_guest("ticks", source=TICKS), mode="real", timeout=30)
    vm.console.pause_on(rb"tick\n")                 # armed before the guest starts
    with vm:
        for i in range(20):
            vm.console.expect(rb"tick\n", timeout=10)
            assert vm.registers(0)["rbp"] == i        # answered while paused (no deadlock)
            vm.console.pause_on(rb"tick\n")
            vm.resume()
        r = vm.stop()
    assert r.reason == "stopped"
    assert vm.console.text().count("tick") >= 20


def test_expect_stops_waiting_when_the_guest_ends(build_guest):
    # like pexpect's EOF: a guest that ended cannot write the pattern any more, so expect()
    # says so at once, with how it ended, instead of waiting out its timeout
    with kvmpy.VM(image=build_guest("uart_hello"), mode="real") as vm:
        assert vm.console.expect(rb"hello from a real-mode guest", timeout=10)
        t = time.monotonic()
        with pytest.raises(kvmpy.GuestEnded) as e:
            vm.console.expect(rb"never printed", timeout=60)
        assert time.monotonic() - t < 10
        assert e.value.outcome.status == 0x21 and "status 33" in str(e.value)
        assert isinstance(e.value, kvmpy.ConsoleTimeout)        # old callers still catch it
        assert vm.wait(5).status == 0x21
