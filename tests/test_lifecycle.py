"""Every fd, thread and mmap is released when a VM ends, however it ends."""
import os
import threading

from kvmpy.builder import FlatConfig, Machine, build_flat
from kvmpy.vcpu.modes import Mode


def counts():
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return fds, threading.active_count(), maps


def test_200_vms_leak_nothing(build_guest):
    img = build_guest("uart_hello")
    out = []
    # warm up (first use loads modules, installs the kick handler)
    with build_flat(FlatConfig(img, Mode.REAL, console_sink=out.append)) as m:
        m.start(m.setup)
        m.wait(10)
    before = counts()
    for i in range(200):
        with build_flat(FlatConfig(img, Mode.REAL, mem_size=8 << 20,
                                   console_sink=out.append)) as m:
            if i % 2 == 0:   # half of them run to the end, half are closed without running
                m.start(m.setup)
                assert m.wait(10).status == 0x21
    after = counts()
    assert after[0] == before[0], "fds leaked"
    assert after[1] == before[1], "threads leaked"
    # glibc may keep a few arenas/thread stacks around; a leak per VM would show 100s of maps
    assert after[2] < before[2] + 20, "mmaps leaked"


def test_timeout_and_exception_paths_release_everything(build_guest):
    spin = build_guest("spin")
    before = counts()
    for _ in range(5):
        with build_flat(FlatConfig(spin, Mode.REAL, console_sink=lambda b: None)) as m:
            m.start(m.setup)
            assert m.wait(0.05).status == 124
    try:
        with build_flat(FlatConfig(spin, Mode.REAL, console_sink=lambda b: None)) as m:
            m.start(m.setup)
            raise KeyError("user code failed while the VM ran")
    except KeyError:
        pass
    assert counts()[:2] == before[:2]


def test_machine_without_devices_closes():
    before = counts()
    with Machine(4 << 20):
        pass
    assert counts()[:2] == before[:2]


def test_pause_and_resume_a_spinning_guest(build_guest):
    out = []
    with build_flat(FlatConfig(build_guest("uart_poll"), Mode.REAL,
                               console_sink=out.append)) as m:
        m.start(m.setup)
        import time
        time.sleep(0.2)
        m.pause()
        before = m.dispatcher.exit_counts()["IO"]
        time.sleep(0.3)
        assert m.dispatcher.exit_counts()["IO"] == before   # no exits while paused
        m.resume()
        time.sleep(0.2)
        assert m.dispatcher.exit_counts()["IO"] > before
        m.console.feed(b"q")
        assert m.wait(10).status == 0x21
    assert b"".join(out) == b"q"


def test_a_vcpu_that_fails_its_setup_does_not_strand_the_others(build_guest):
    # vCPUs wait for each other before running (so an AP exists when the BSP sends INIT/SIPI);
    # one whose setup fails must release the rest, and the VM ends with its error.
    import time

    from kvmpy.errors import KvmpyError

    with build_flat(FlatConfig(build_guest("spin"), Mode.REAL)) as m:
        def setup(vcpu):
            if vcpu.id == 1:
                raise KvmpyError("setup of vCPU 1 failed")
            m.setup(vcpu)
        t0 = time.monotonic()
        m.start(setup, 2)
        outcome = m.wait(10)
        assert outcome.reason.value == "vmm-error" and "vCPU 1" in outcome.detail
        assert time.monotonic() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name.startswith("kvmpy-vcpu")]
