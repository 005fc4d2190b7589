"""pvpanic-pci (kvmpy/devices/pvpanic.py): the device on its own, then a guest kernel that finds
it on the PCI bus and panics through it under ``kvmpy boot``."""
from __future__ import annotations

import pytest

from kvmpy.devices.pci import COMMAND, HostBridge, PciBus, PciConfigIo
from kvmpy.devices.pvpanic import BAR_SIZE, CRASH_LOADED, PANICKED, PvPanic
from kvmpy.linux import PVPANIC_BAR
from kvmpy.outcome import ExitStatus, StopReason, VmStop
from kvmpy.vmexit.bus import MmioBus

from conftest import pvh_kernel, run_kvmpy

BAR = 0xC000_1000


def mmio_read(mmio, addr, size):
    m = mmio.lookup(addr)
    return m.device.read(addr - m.base, size)


def mmio_write(mmio, addr, size, value):
    m = mmio.lookup(addr)
    m.device.write(addr - m.base, size, value)


@pytest.fixture
def rig():
    mmio = MmioBus()
    bus = PciBus()
    bus.add(HostBridge(), 0)
    dev = PvPanic(mmio=mmio)
    slot = bus.add(dev)
    cfg = PciConfigIo(bus)

    def config(reg, value=None):
        cfg.write(0, 4, 0x8000_0000 | slot << 11 | reg)
        if value is not None:
            cfg.write(4, 4, value)
        return cfg.read(4, 4)
    return mmio, dev, config


def test_identity_and_bar_sizing(rig):
    mmio, dev, config = rig
    assert config(0x00) == 0x0011_1B36                 # device 0x0011, vendor 0x1b36
    assert config(0x08) >> 16 == 0x0880                # class 08/80, other system peripheral
    assert config(0x10, 0xFFFF_FFFF) == (~(BAR_SIZE - 1)) & 0xFFFF_FFF0   # 32-bit memory BAR
    assert mmio.lookup(BAR) is None                    # nothing decodes before it is placed


def test_register_decodes_only_while_memory_space_is_on(rig):
    mmio, dev, config = rig
    config(0x10, BAR)
    assert mmio.lookup(BAR) is None                    # Memory Space still off
    config(COMMAND, 0x2)
    assert mmio.lookup(BAR).device is dev.region
    assert mmio_read(mmio, BAR, 1) == PANICKED | CRASH_LOADED
    assert mmio_read(mmio, BAR + 4, 4) == 0
    config(COMMAND, 0)
    assert mmio.lookup(BAR) is None
    dev.place(BAR + 0x1000)                            # what the builder does
    assert mmio.lookup(BAR + 0x1000).device is dev.region


def test_events(rig, capsys):
    mmio, dev, _ = rig
    dev.place(BAR)
    mmio_write(mmio, BAR + 1, 1, PANICKED)           # not the register: ignored
    mmio_write(mmio, BAR, 1, 1 << 2)                 # an event it did not offer: ignored
    assert dev.ignored == 2
    mmio_write(mmio, BAR, 1, CRASH_LOADED)           # a crash kernel: reported, VM goes on
    assert dev.crash_loaded == 1 and "crash kernel" in capsys.readouterr().err
    with pytest.raises(VmStop) as e:
        mmio_write(mmio, BAR, 1, PANICKED | CRASH_LOADED)
    assert e.value.outcome.reason is StopReason.GUEST_PANIC
    assert e.value.outcome.status == ExitStatus.GUEST_PANIC == 12


@pytest.fixture(scope="module")
def panic_kernel(tmp_path_factory):
    return str(pvh_kernel("pvpanic32", tmp_path_factory.mktemp("pvpanic")))


def test_guest_panic_ends_kvmpy_boot_with_status_12(panic_kernel):
    p = run_kvmpy("boot", "--kernel", panic_kernel, "--append", "1", "--mem", "64M",
                  "--device-map")
    assert p.returncode == 12, p.stderr
    assert p.stdout.decode().splitlines() == [f"bar:{PVPANIC_BAR:08x} events:03"]
    assert b"pvpanic-pci 00:01.0" in p.stderr                   # in the device map
    assert b"guest kernel panicked" in p.stderr


def test_crash_loaded_lets_the_guest_go_on(panic_kernel):
    p = run_kvmpy("boot", "--kernel", panic_kernel, "--append", "2", "--mem", "64M")
    assert p.returncode == (0x11 << 1) | 1, p.stderr
    assert p.stdout.decode().splitlines()[-1] == "still running"
    assert b"crash kernel took over" in p.stderr
