"""The virtio-pci transport (virtio 1.2 section 4.1) and MSI-X (PCI 3.0 section 6.8.2).

A driver written from the spec and from the way Linux's virtio_pci_modern probes a device:
config space through PCI configuration mechanism #1 (the capability chain walked as
virtio_pci_find_capability does: first capability of each cfg_type, its BAR, offset and length),
BAR sizing with decoding off, then the modern init sequence through BAR 0 on an MmioBus, MSI-X
programmed in the table, a virtio-blk queue against a temporary file, and the interrupt seen as
an MSI message. Then the same on /dev/kvm: a guest's notify through a KVM ioeventfd, the I/O
thread, an MSI-X vector through a GSI route and an irqfd, and the guest's interrupt handler.

Hostile sequences: shared/hostile-inputs.md items 7-9, 24, 25.
"""
from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices.pci import HostBridge, PciBus, PciConfigIo
from kvmpy.memory import GuestMemory
from kvmpy.virtio.blk import VirtioBlk
from kvmpy.virtio.iothread import IoThread
from kvmpy.virtio.msix import MsiRouter, default_irqchip_routes
from kvmpy.virtio.pci import BAR_SIZE, PCI_MMIO_BASE, VirtioPci, add_to_machine
from kvmpy.virtio.rng import VirtioRng
from kvmpy.vm import IrqchipRoute, MsiRoute
from kvmpy.vmexit.bus import BusDevice, MmioBus
from virtio_driver import (ACKNOWLEDGE, DRIVER, DRIVER_OK, F_EVENT_IDX, FEATURES_OK,
                           NEEDS_RESET, Allocator, IrqRecorder, Regs, Virtqueue)

kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")

BAR = 0xE000_0000
ENABLE = 1 << 31
# PCI 3.0 header / capability constants, written out again here on purpose.
COMMAND, STATUS, CAP_PTR, BAR0 = 0x04, 0x06, 0x34, 0x10
CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 1 << 1, 1 << 2, 1 << 10
CAP_ID_VNDR, CAP_ID_MSIX = 0x09, 0x11
MSIX_ENABLE, MSIX_MASKALL = 1 << 15, 1 << 14
# virtio_pci_cap cfg_type (4.1.4)
COMMON, NOTIFY, ISR, DEVICE, PCI_CFG = 1, 2, 3, 4, 5
# struct virtio_pci_common_cfg (4.1.4.3)
DFSELECT, DF, GFSELECT, GF, MSIX_CONFIG, NUM_QUEUES = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x12
DEVICE_STATUS, CONFIG_GENERATION, Q_SELECT, Q_SIZE, Q_MSIX_VECTOR = 0x14, 0x15, 0x16, 0x18, 0x1A
Q_ENABLE, Q_NOTIFY_OFF, Q_DESC, Q_DRIVER, Q_DEVICE = 0x1C, 0x1E, 0x20, 0x28, 0x30
NO_VECTOR = 0xFFFF
MSI_ADDRESS = 0xFEE0_0000        # x86 MSI: LAPIC 0, physical destination
A, D, FO, DO = ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK
HDR = struct.Struct("<IIQ")      # virtio_blk_req header (5.2.6)
BLK_IN, BLK_OUT = 0, 1


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 13 + seed + i // 512) & 0xFF for i in range(n))


class ConfigSpace:
    """PCI configuration mechanism #1 as a guest uses it: 0xCF8 then 0xCFC-0xCFF."""

    def __init__(self, io: PciConfigIo, slot: int):
        self.io, self.slot = io, slot

    def read(self, reg: int, size: int = 4) -> int:
        self.io.write(0, 4, ENABLE | (self.slot << 11) | (reg & 0xFC))
        return self.io.read(4 + (reg & 3), size)

    def write(self, reg: int, value: int, size: int = 4) -> None:
        self.io.write(0, 4, ENABLE | (self.slot << 11) | (reg & 0xFC))
        self.io.write(4 + (reg & 3), size, value)


class PciDriver:
    """The guest's side of virtio-pci (4.1.3-4.1.5), probing as drivers/virtio/
    virtio_pci_modern_dev.c does. Register accesses go through an MmioBus at absolute
    addresses, as the vCPU exit path would."""

    def __init__(self, memory, cfg: ConfigSpace, bus, area=(0x10000, 0x200000)):
        self.memory, self.cfg, self.bus = memory, cfg, bus
        self.regs = Regs(bus, 0)
        self.alloc = Allocator(*area)
        self.queues: list[Virtqueue] = []
        self.features = 0
        self.msi: list[tuple[int, int]] = []

    # -- PCI -----------------------------------------------------------------------------------
    def capabilities(self) -> list[tuple[int, int]]:
        """(position, id) of each capability, following the chain from CAP_PTR."""
        assert self.cfg.read(STATUS, 2) & 0x10, "no capability list"
        out, pos, seen = [], self.cfg.read(CAP_PTR, 1) & 0xFC, set()
        while pos:
            assert pos >= 0x40 and pos not in seen, "the chain loops or points into the header"
            seen.add(pos)
            out.append((pos, self.cfg.read(pos, 1)))
            pos = self.cfg.read(pos + 1, 1) & 0xFC
        return out

    def size_bar(self, index: int) -> tuple[int, int]:
        """(size, flags) of a memory BAR, sized with decoding off (drivers/pci/probe.c)."""
        reg = BAR0 + 4 * index
        cmd = self.cfg.read(COMMAND, 2)
        self.cfg.write(COMMAND, cmd & ~CMD_MEMORY, 2)
        lo = self.cfg.read(reg)
        self.cfg.write(reg, 0xFFFFFFFF)
        mask = self.cfg.read(reg)
        self.cfg.write(reg, lo)
        flags = lo & 0xF
        if flags & 0x6 == 0x4:                       # 64-bit
            hi = self.cfg.read(reg + 4)
            self.cfg.write(reg + 4, 0xFFFFFFFF)
            mask |= self.cfg.read(reg + 4) << 32
            self.cfg.write(reg + 4, hi)
            size = (~(mask & ~0xF) + 1) & 0xFFFF_FFFF_FFFF_FFFF
        else:
            size = (~(mask & ~0xF) + 1) & 0xFFFFFFFF
        self.cfg.write(COMMAND, cmd, 2)
        return size, flags

    def bar_address(self, index: int) -> int:
        reg = BAR0 + 4 * index
        lo = self.cfg.read(reg)
        hi = self.cfg.read(reg + 4) if lo & 0x6 == 0x4 else 0
        return (lo & ~0xF) | hi << 32

    def find_virtio_cap(self, cfg_type: int) -> dict | None:
        """virtio_pci_find_capability: the first vendor capability of ``cfg_type`` whose BAR
        is a memory BAR with a size."""
        for pos, cap_id in self.capabilities():
            if cap_id != CAP_ID_VNDR:
                continue
            ctype, bar = self.cfg.read(pos + 3, 1), self.cfg.read(pos + 4, 1)
            if bar >= 6 or ctype != cfg_type:
                continue
            if not self.size_bar(bar)[0]:
                continue
            cap = dict(pos=pos, cap_len=self.cfg.read(pos + 2, 1), bar=bar,
                       offset=self.cfg.read(pos + 8), length=self.cfg.read(pos + 12))
            if cfg_type == NOTIFY:
                cap["multiplier"] = self.cfg.read(pos + 16)
            return cap
        return None

    def probe(self, assign: int | None = None) -> None:
        """vp_modern_probe: map common, notify, ISR (and device) through BAR addresses."""
        if assign is not None:                     # what the OS does when firmware did not
            self.cfg.write(COMMAND, 0, 2)
            self.cfg.write(BAR0, assign & 0xFFFFFFFF)
            self.cfg.write(BAR0 + 4, assign >> 32)
        self.cfg.write(COMMAND, self.cfg.read(COMMAND, 2) | CMD_MEMORY | CMD_MASTER, 2)
        self.caps = {t: self.find_virtio_cap(t) for t in (COMMON, NOTIFY, ISR, DEVICE, PCI_CFG)}
        for t in (COMMON, NOTIFY, ISR):
            assert self.caps[t] is not None, f"no capability of cfg_type {t}"
        size, _ = self.size_bar(0)
        for t, minlen in ((COMMON, 0x38), (NOTIFY, 2), (ISR, 1), (DEVICE, 0)):
            cap = self.caps[t]
            if cap is None:
                continue
            assert cap["length"] >= minlen and cap["offset"] + cap["length"] <= size
        base = {t: self.bar_address(c["bar"]) + c["offset"]
                for t, c in self.caps.items() if c is not None and t != PCI_CFG}
        self.common, self.notify_base, self.isr = base[COMMON], base[NOTIFY], base[ISR]
        self.device_cfg = base.get(DEVICE)
        self.multiplier = self.caps[NOTIFY]["multiplier"]
        msix = [pos for pos, cap_id in self.capabilities() if cap_id == CAP_ID_MSIX]
        self.msix_cap = msix[0] if msix else None
        if self.msix_cap is not None:
            ctrl = self.cfg.read(self.msix_cap + 2, 2)
            self.msix_vectors = (ctrl & 0x7FF) + 1
            table = self.cfg.read(self.msix_cap + 4)
            pba = self.cfg.read(self.msix_cap + 8)
            self.msix_table = self.bar_address(table & 7) + (table & ~7)
            self.msix_pba = self.bar_address(pba & 7) + (pba & ~7)

    # -- registers -----------------------------------------------------------------------------
    def rd(self, off: int, size: int) -> int:
        return self.regs.read(self.common + off, size)

    def wr(self, off: int, value: int, size: int) -> None:
        self.regs.write(self.common + off, size, value)

    def status(self) -> int:
        return self.rd(DEVICE_STATUS, 1)

    def set_status(self, value: int) -> None:
        self.wr(DEVICE_STATUS, value, 1)

    def read_isr(self) -> int:
        return self.regs.read(self.isr, 1)

    def notify(self, index: int = 0, value: int | None = None, size: int = 2) -> None:
        self.wr(Q_SELECT, index, 2)
        off = self.rd(Q_NOTIFY_OFF, 2)
        self.regs.write(self.notify_base + off * self.multiplier, size,
                        index if value is None else value)

    # -- MSI-X ---------------------------------------------------------------------------------
    def msix_control(self, value: int) -> None:
        self.cfg.write(self.msix_cap + 2, value, 2)

    def msix_entry(self, vector: int, address: int, data: int, masked: bool = False) -> None:
        e = self.msix_table + 16 * vector
        self.regs.write(e + 12, 4, 1)                # mask while changing it (as Linux does)
        self.regs.write(e, 4, address & 0xFFFFFFFF)
        self.regs.write(e + 4, 4, address >> 32)
        self.regs.write(e + 8, 4, data)
        self.regs.write(e + 12, 4, int(masked))

    def mask_vector(self, vector: int, masked: bool) -> None:
        self.regs.write(self.msix_table + 16 * vector + 12, 4, int(masked))

    def pba(self) -> int:
        return self.regs.read(self.msix_pba, 8)

    # -- 3.1.1 ---------------------------------------------------------------------------------
    def negotiate(self, want: int | None = None) -> int:
        self.set_status(0)
        assert self.status() == 0                   # 4.1.4.3.2: reset is complete at 0
        self.set_status(A)
        self.set_status(A | D)
        offered = 0
        for sel in (0, 1):
            self.wr(DFSELECT, sel, 4)
            offered |= self.rd(DF, 4) << (32 * sel)
        self.features = offered if want is None else offered & want
        for sel in (0, 1):
            self.wr(GFSELECT, sel, 4)
            self.wr(GF, (self.features >> (32 * sel)) & 0xFFFFFFFF, 4)
        self.set_status(A | D | FO)
        assert self.status() & FO, "device refused our features"
        return self.features

    def setup_queue(self, index: int, size: int | None = None,
                    vector: int = NO_VECTOR) -> Virtqueue:
        """vp_modern setup_vq + vp_active_vq: size, addresses as two 32-bit halves each,
        vector (read back), and enable last."""
        self.wr(Q_SELECT, index, 2)
        max_size = self.rd(Q_SIZE, 2)
        assert max_size and not self.rd(Q_ENABLE, 2), f"queue {index} is not available"
        size = size or max_size
        base = self.alloc.alloc(16 * size + 6 + 2 * size + 4 + 6 + 8 * size, align=4096)
        vq = Virtqueue(self.memory, index, size, base, self.alloc,
                       event_idx=bool(self.features & F_EVENT_IDX))
        self.wr(Q_SIZE, size, 2)
        for reg, addr in ((Q_DESC, vq.desc), (Q_DRIVER, vq.avail), (Q_DEVICE, vq.used)):
            self.wr(reg, addr & 0xFFFFFFFF, 4)
            self.wr(reg + 4, addr >> 32, 4)
        if vector != NO_VECTOR:
            self.wr(Q_MSIX_VECTOR, vector, 2)
            assert self.rd(Q_MSIX_VECTOR, 2) == vector, "vector mapping failed"
        self.wr(Q_ENABLE, 1, 2)
        while len(self.queues) <= index:
            self.queues.append(None)
        self.queues[index] = vq
        return vq

    def init(self, want: int | None = None, queues: int = 1, size: int | None = None,
             msix: bool = True) -> None:
        """The whole of 3.1.1 with MSI-X as Linux sets it up: vector 0 for config changes,
        vector 1 + i for queue i, message data = 0x40 + vector."""
        self.negotiate(want)
        if msix:
            self.msix_control(MSIX_ENABLE | MSIX_MASKALL)
            for v in range(queues + 1):
                self.msix_entry(v, MSI_ADDRESS, 0x40 + v, masked=True)
            self.wr(MSIX_CONFIG, 0, 2)
            assert self.rd(MSIX_CONFIG, 2) == 0
        for i in range(queues):
            self.setup_queue(i, size, vector=1 + i if msix else NO_VECTOR)
        if msix:
            self.msix_control(MSIX_ENABLE)
            for v in range(queues + 1):
                self.mask_vector(v, False)
        self.set_status(A | D | FO | DO)
        assert self.status() & DO


class Rig:
    """A VirtioPci on bus 0 (slot 1, BAR 0 at 0xE0000000) with an MmioBus, a recording MSI
    callable and INTx line, and a driver that has probed it."""

    def __init__(self, mem, device=None, vm=None, iothread=None, place=True, **kw):
        self.mem = mem
        self.dev = device or VirtioRng(mem)
        self.msi: list[tuple[int, int]] = []
        self.msi_event = threading.Condition()
        self.irq = IrqRecorder()
        self.mmio = MmioBus()
        self.t = VirtioPci(self.dev, vm, mmio=self.mmio, iothread=iothread, irq=self.irq,
                           msi=self._msi, **kw)
        self.pci = PciBus()
        self.pci.add(HostBridge(), 0)
        self.slot = self.pci.add(self.t)
        assert self.slot == 1
        self.io = PciConfigIo(self.pci)
        self.cfg = ConfigSpace(self.io, self.slot)
        if place:
            self.t.place(BAR)
        self.drv = PciDriver(mem, self.cfg, self.mmio)
        self.drv.probe()

    def _msi(self, address: int, data: int) -> None:
        with self.msi_event:
            self.msi.append((address, data))
            self.msi_event.notify_all()

    def wait_msi(self, count: int, timeout: float = 10.0) -> bool:
        with self.msi_event:
            return self.msi_event.wait_for(lambda: len(self.msi) >= count, timeout)


@pytest.fixture
def mem():
    with GuestMemory([(0, 4 << 20)]) as m:
        yield m


@pytest.fixture
def rig(mem):
    r = Rig(mem)
    yield r
    r.t.close()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(64 * 512))
    return p


# -- config space -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, device_id, class_code", [
    ("blk", 0x1042, 0x010000), ("rng", 0x1044, 0xFF0000)])
def test_identity(mem, image, kind, device_id, class_code):
    dev = VirtioBlk(mem, str(image)) if kind == "blk" else VirtioRng(mem)
    r = Rig(mem, dev)
    try:
        cfg = r.cfg
        assert cfg.read(0x00) == device_id << 16 | 0x1AF4
        assert cfg.read(0x08) == class_code << 8 | 1             # class code, revision 1
        assert cfg.read(0x2C) == device_id << 16 | 0x1AF4        # subsystem IDs
        assert cfg.read(0x0E, 1) == 0                            # header type 0
        assert cfg.read(0x3D, 1) == 1                            # interrupt pin A
        cfg.write(0x3C, 11, 1)                                   # interrupt line: scratch
        assert cfg.read(0x3C, 1) == 11
        cfg.write(0x00, 0xDEADBEEF)                              # read-only IDs
        assert cfg.read(0x00) == device_id << 16 | 0x1AF4
    finally:
        r.t.close()


def test_capability_chain_as_linux_walks_it(mem, image):
    r = Rig(mem, VirtioBlk(mem, str(image)))
    try:
        caps = r.drv.capabilities()
        assert [c for _, c in caps].count(CAP_ID_VNDR) == 5
        assert [c for _, c in caps].count(CAP_ID_MSIX) == 1
        assert all(pos % 4 == 0 and pos >= 0x40 for pos, _ in caps)
        common, notify, isr, device, pcicfg = (r.drv.caps[t] for t in (COMMON, NOTIFY, ISR,
                                                                       DEVICE, PCI_CFG))
        for cap in (common, notify, isr, device):
            assert cap["bar"] == 0 and cap["offset"] + cap["length"] <= BAR_SIZE
        assert common["cap_len"] == 16 and notify["cap_len"] == 20 and pcicfg["cap_len"] == 20
        assert common["length"] >= 0x38 and isr["length"] >= 1
        assert notify["multiplier"] == 4 and notify["offset"] % 2 == 0
        # the regions do not overlap each other or the MSI-X structures
        spans = sorted((c["offset"], c["offset"] + c["length"]) for c in (common, notify, isr,
                                                                          device))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert r.drv.msix_vectors == 2                            # config + one queue
        assert r.drv.msix_table == BAR + 0x3800 and r.drv.msix_pba == BAR + 0x3C00
        assert spans[-1][1] <= 0x3800
    finally:
        r.t.close()


def test_no_device_capability_without_device_config(rig):
    assert rig.drv.caps[DEVICE] is None          # virtio-rng has no config space (4.1.4.6)


def test_bar_sizing(rig):
    assert rig.drv.size_bar(0) == (BAR_SIZE, 0x4)                # 64-bit, not prefetchable
    assert rig.drv.bar_address(0) == BAR                          # restored after sizing
    assert rig.mmio.lookup(BAR).device is rig.t.region
    for index in (2, 3, 4, 5):                                    # unimplemented BARs
        assert rig.cfg.read(BAR0 + 4 * index) == 0
        rig.cfg.write(BAR0 + 4 * index, 0xFFFFFFFF)
        assert rig.cfg.read(BAR0 + 4 * index) == 0


def test_sizing_with_decoding_on_moves_the_window_and_back(rig):
    cfg = rig.cfg
    cfg.write(BAR0, 0xFFFFFFFF)                  # a careless OS: decoding stays on
    assert rig.mmio.lookup(BAR) is None
    assert rig.t.mapped_at == 0xFFFFC000
    cfg.write(BAR0, BAR)
    assert rig.t.mapped_at == BAR and rig.mmio.lookup(BAR + 0x3000).device is rig.t.region


class FakeVm:
    """Records ioeventfd/irqfd/routing ioctls (no /dev/kvm needed)."""

    def __init__(self, has_irqchip: bool = False):
        self.has_irqchip = has_irqchip
        self.ioeventfds: dict[tuple[int, int], int] = {}   # (addr, datamatch) -> fd
        self.ioeventfd_calls: list[tuple] = []
        self.irqfds: dict[int, int] = {}                   # gsi -> fd
        self.tables: list[list] = []

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        self.ioeventfd_calls.append((addr, length, datamatch, deassign))
        if deassign:
            del self.ioeventfds[(addr, datamatch)]
        else:
            assert (addr, datamatch) not in self.ioeventfds
            self.ioeventfds[(addr, datamatch)] = fd

    def irqfd(self, fd, gsi, deassign=False, resamplefd=None):
        if deassign:
            assert self.irqfds.pop(gsi) == fd
        else:
            self.irqfds[gsi] = fd

    def set_gsi_routing(self, routes):
        self.tables.append(list(routes))


def test_ioeventfds_follow_the_bar(mem):
    vm = FakeVm()
    with IoThread() as io:
        r = Rig(mem, VirtioRng(mem), vm=vm, iothread=io)
        assert set(vm.ioeventfds) == {(BAR + 0x3000, 0)}
        assert vm.ioeventfd_calls[0] == (BAR + 0x3000, 2, 0, False)    # 16-bit notify writes
        r.cfg.write(BAR0, 0xE010_0000)                                  # the guest moves it
        assert set(vm.ioeventfds) == {(0xE010_3000, 0)}
        assert r.mmio.lookup(BAR) is None and r.mmio.lookup(0xE010_0000).device is r.t.region
        r.cfg.write(COMMAND, 0, 2)                                      # decoding off
        assert vm.ioeventfds == {} and r.mmio.mappings == []
        r.cfg.write(COMMAND, CMD_MEMORY, 2)
        assert set(vm.ioeventfds) == {(0xE010_3000, 0)}
        r.t.close()
        assert vm.ioeventfds == {} and r.mmio.mappings == []


def test_a_bar_over_another_window_is_not_decoded(mem, capsys):
    r = Rig(mem)
    other = BusDevice()
    other.window = 0x1000
    r.mmio.insert(other, 0xE020_1000, "other")
    r.cfg.write(BAR0, 0xE020_0000)
    assert r.t.mapped_at is None and r.mmio.lookup(0xE020_0000) is None
    assert "not decoded" in capsys.readouterr().err
    r.cfg.write(BAR0, 0xE030_0000)
    assert r.t.mapped_at == 0xE030_0000
    r.t.close()


# -- the modern init sequence and virtio-blk with MSI-X ------------------------------------------

def test_blk_read_and_write_over_msix(mem, image):
    r = Rig(mem, VirtioBlk(mem, str(image)))
    drv = r.drv
    try:
        drv.init()
        assert drv.rd(NUM_QUEUES, 2) == 1
        assert r.dev.status == A | D | FO | DO
        assert drv.regs.read(drv.device_cfg, 8) == 64          # virtio_blk_config.capacity
        vq = drv.queues[0]
        read = vq.submit(out=[HDR.pack(BLK_IN, 0, 2)], in_=[1024, 1])
        data = pattern(512, seed=99)
        write = vq.submit(out=[HDR.pack(BLK_OUT, 0, 5), data], in_=[1])
        drv.notify(0)
        used = dict((req.head, n) for req, n in vq.get_used())
        assert used == {read.head: 1025, write.head: 1}
        assert read.written() == pattern(64 * 512)[1024:2048] + b"\0"
        assert write.written() == b"\0"
        assert image.read_bytes()[5 * 512:6 * 512] == data
        assert r.msi and set(r.msi) == {(MSI_ADDRESS, 0x41)}   # queue 0's vector 1
        assert r.irq.levels == [] and r.t.interrupt_status == 0   # no INTx, no ISR bit
        assert drv.pba() == 0
    finally:
        r.t.close()


def test_config_change_goes_to_the_config_vector(rig):
    rig.drv.init()
    rig.dev.config_changed()
    assert rig.msi == [(MSI_ADDRESS, 0x40)]
    assert rig.drv.rd(CONFIG_GENERATION, 1) == 1
    assert rig.drv.read_isr() == 2                  # 4.1.4.5.1: set even with MSI-X


def test_intx_when_msix_is_off(rig):
    drv = rig.drv
    drv.init(msix=False)
    vq = drv.queues[0]
    vq.submit(in_=[16])
    drv.notify(0)
    assert len(vq.get_used()) == 1
    assert rig.irq.levels == [1] and rig.msi == []
    assert rig.cfg.read(STATUS, 2) & 0x8                  # Interrupt Status
    assert drv.read_isr() == 1                            # read-to-clear
    assert rig.irq.levels == [1, 0] and drv.read_isr() == 0
    assert not rig.cfg.read(STATUS, 2) & 0x8
    rig.cfg.write(COMMAND, rig.cfg.read(COMMAND, 2) | CMD_INTX_DISABLE, 2)
    vq.submit(in_=[16])
    drv.notify(0)
    assert rig.irq.levels == [1, 0]                       # disabled: pending, not asserted
    assert rig.cfg.read(STATUS, 2) & 0x8
    rig.cfg.write(COMMAND, rig.cfg.read(COMMAND, 2) & ~CMD_INTX_DISABLE, 2)
    assert rig.irq.levels == [1, 0, 1]
    drv.msix_control(MSIX_ENABLE)                         # MSI-X on: INTx goes quiet
    assert rig.irq.levels == [1, 0, 1, 0]


def test_reset_withdraws_interrupts_and_vectors(rig):
    drv = rig.drv
    drv.init(msix=False)
    drv.queues[0].submit(in_=[16])
    drv.notify(0)
    assert rig.irq.levels == [1]
    drv.set_status(0)
    assert rig.irq.levels == [1, 0] and drv.status() == 0
    drv.init()
    assert drv.rd(MSIX_CONFIG, 2) == 0
    drv.set_status(0)
    assert drv.rd(MSIX_CONFIG, 2) == NO_VECTOR
    drv.wr(Q_SELECT, 0, 2)
    assert drv.rd(Q_MSIX_VECTOR, 2) == NO_VECTOR and drv.rd(Q_ENABLE, 2) == 0


def test_buffers_made_available_before_driver_ok_are_taken_at_driver_ok(rig):
    drv = rig.drv
    drv.negotiate()
    vq = drv.setup_queue(0)
    req = vq.submit(in_=[8])
    drv.set_status(A | D | FO | DO)
    (got, n), = vq.get_used()
    assert got is req and n == 8


# -- MSI-X masking (PCI 3.0 6.8.2) ---------------------------------------------------------------

def test_masked_vector_sets_pending_and_fires_on_unmask(rig):
    drv = rig.drv
    drv.init()
    drv.mask_vector(1, True)
    drv.queues[0].submit(in_=[8])
    drv.notify(0)
    assert rig.msi == [] and drv.pba() == 0b10
    drv.mask_vector(1, False)
    assert rig.msi == [(MSI_ADDRESS, 0x41)] and drv.pba() == 0


def test_function_mask_and_enable(rig):
    drv = rig.drv
    drv.init()
    drv.msix_control(MSIX_ENABLE | MSIX_MASKALL)
    drv.queues[0].submit(in_=[8])
    drv.notify(0)
    assert rig.msi == [] and drv.pba() == 0b10
    assert drv.regs.read(drv.msix_table + 16 + 12, 4) == 0    # the vector's own bit is clear
    drv.msix_control(MSIX_ENABLE)
    assert rig.msi == [(MSI_ADDRESS, 0x41)] and drv.pba() == 0
    assert rig.cfg.read(drv.msix_cap + 2, 2) == MSIX_ENABLE | 1   # table size - 1 read-only
    rig.cfg.write(drv.msix_cap + 2, 0x07FF, 2)
    assert rig.cfg.read(drv.msix_cap + 2, 2) == 1


def test_entry_rewritten_while_unmasked_uses_the_new_message(rig):
    drv = rig.drv
    drv.init()
    drv.regs.write(drv.msix_table + 16 + 8, 4, 0x77)          # data of vector 1, unmasked
    drv.queues[0].submit(in_=[8])
    drv.notify(0)
    assert rig.msi == [(MSI_ADDRESS, 0x77)]


def test_table_reads_and_reserved_bits(rig):
    drv = rig.drv
    t = drv.msix_table
    assert drv.regs.read(t + 12, 4) == 1                      # masked after reset
    drv.regs.write(t, 4, 0xFEE0_0003)                         # bits 1:0 read 0
    drv.regs.write(t + 12, 4, 0xFFFF_FFFE)                    # reserved control bits
    assert drv.regs.read(t, 4) == 0xFEE0_0000 and drv.regs.read(t + 12, 4) == 0
    drv.regs.write(t + 16, 8, 0x1_FEE0_1000)                  # QWORD accesses are allowed
    assert drv.regs.read(t + 16, 8) == 0x1_FEE0_1000
    assert drv.regs.read(drv.msix_pba + 8, 8) == 0xFFFF_FFFF_FFFF_FFFF   # past the PBA


# -- hostile register sequences (items 7-9, 24, 25) ---------------------------------------------

def test_queue_registers_ignored_after_driver_ok(rig):
    drv = rig.drv
    drv.init(size=8)
    q = rig.dev.queues[0]
    before = (q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready)
    drv.wr(Q_SELECT, 0, 2)
    drv.wr(Q_SIZE, 0, 2)                      # size 0: the divide-by-zero of CVE-2026-5747
    drv.wr(Q_DESC, 0x4000_0000, 4)
    drv.wr(Q_DESC + 4, 0xFFFF_FFFF, 4)
    drv.wr(Q_DEVICE, 0x1234_5678_9ABC_0000, 8)
    drv.wr(Q_MSIX_VECTOR, 0, 2)
    drv.wr(Q_ENABLE, 0, 2)
    assert (q.size, q.desc_addr, q.avail_addr, q.used_addr, q.ready) == before
    assert drv.rd(Q_MSIX_VECTOR, 2) == 1
    vq = drv.queues[0]                                    # and the queue still works
    vq.submit(in_=[8])
    drv.notify(0)
    assert len(vq.get_used()) == 1


def test_queue_registers_ignored_before_features_ok(rig):
    drv = rig.drv
    drv.set_status(A)
    drv.set_status(A | D)
    drv.wr(Q_SELECT, 0, 2)
    drv.wr(Q_SIZE, 4, 2)
    drv.wr(Q_DESC, 0x5000, 4)
    drv.wr(Q_ENABLE, 1, 2)
    q = rig.dev.queues[0]
    assert (q.size, q.desc_addr, q.ready) == (q.max_size, 0, False)


@pytest.mark.parametrize("sel", [1, 2, 0x7FFF, 0xFFFF])
def test_queue_select_out_of_range(rig, sel):
    drv = rig.drv
    drv.negotiate()
    drv.wr(Q_SELECT, sel, 2)
    assert drv.rd(Q_SELECT, 2) == sel
    assert drv.rd(Q_SIZE, 2) == 0                     # 4.1.4.3: 0 = not available
    assert drv.rd(Q_ENABLE, 2) == 0 and drv.rd(Q_NOTIFY_OFF, 2) == 0
    assert drv.rd(Q_DESC, 8) == 0 and drv.rd(Q_MSIX_VECTOR, 2) == NO_VECTOR
    before = [(q.size, q.desc_addr, q.ready) for q in rig.dev.queues]
    drv.wr(Q_SIZE, 4, 2)
    drv.wr(Q_DESC, 0x1000, 4)
    drv.wr(Q_MSIX_VECTOR, 0, 2)
    drv.wr(Q_ENABLE, 1, 2)
    assert [(q.size, q.desc_addr, q.ready) for q in rig.dev.queues] == before
    assert rig.dev.status == A | D | FO


@pytest.mark.parametrize("value, size, where", [
    (0xFFFF, 2, 0), (1, 2, 0), (0, 1, 0), (0, 8, 0), (0, 2, 2), (0xFFFF, 2, 4 * 0xFFFF)])
def test_bad_notifies_are_ignored(rig, value, size, where):
    drv = rig.drv
    drv.init()
    vq = drv.queues[0]
    vq.submit(in_=[8])
    base = drv.notify_base + where
    if base < BAR + BAR_SIZE:
        drv.regs.write(base, size, value)
    assert vq.get_used() == [] and rig.msi == []
    drv.notify(0)
    assert len(vq.get_used()) == 1


COMMON_4 = [DFSELECT, DF, GFSELECT, GF]
COMMON_2 = [MSIX_CONFIG, NUM_QUEUES, Q_SELECT, Q_SIZE, Q_MSIX_VECTOR, Q_ENABLE, Q_NOTIFY_OFF]


@pytest.mark.parametrize("size", [1, 2, 8])
def test_wrong_width_on_32_bit_registers(rig, size):
    drv = rig.drv
    ones = (1 << (8 * size)) - 1
    drv.set_status(A)
    drv.set_status(A | D)
    for off in COMMON_4:
        assert drv.rd(off, size) == ones
    drv.wr(DFSELECT, 1, size)
    assert drv.rd(DFSELECT, 4) == 0
    drv.wr(GF, 0xFFFF_FFFF, size)
    assert rig.dev.driver_features == 0
    assert drv.rd(0x02, 4) == 0xFFFF_FFFF                     # unaligned
    assert rig.t.ignored >= 7


@pytest.mark.parametrize("size", [1, 4, 8])
def test_wrong_width_on_16_and_8_bit_registers(rig, size):
    drv = rig.drv
    ones = (1 << (8 * size)) - 1
    for off in COMMON_2:
        assert drv.rd(off, size) == ones
    drv.wr(MSIX_CONFIG, 0, size)
    assert drv.rd(MSIX_CONFIG, 2) == NO_VECTOR
    if size != 1:
        assert drv.rd(DEVICE_STATUS, size) == ones
        drv.wr(DEVICE_STATUS, A, size)
        assert drv.status() == 0


def test_unknown_common_offsets_and_write_only_regions(rig):
    drv = rig.drv
    for off in (0x38, 0x3A, 0x3C, 0x100, 0xFFC):
        assert drv.rd(off, 4) == 0xFFFF_FFFF
        drv.wr(off, 0, 4)
    assert rig.t.bar_read(0x3000, 2) == 0xFFFF                   # notify is write-only
    assert rig.t.bar_read(0x1000, 4) == 0xFFFF_FFFF              # ISR is one byte
    assert rig.t.bar_read(0x1001, 1) == 0xFF
    for off in (NUM_QUEUES, Q_NOTIFY_OFF):                       # read-only registers
        before = drv.rd(off, 2)
        drv.wr(off, 0x55, 2)
        assert drv.rd(off, 2) == before


def test_msix_vector_numbers_past_the_table(rig):
    drv = rig.drv
    drv.negotiate()
    for bad in (2, 0x7FF, 0xFFFE):
        drv.wr(MSIX_CONFIG, bad, 2)
        assert drv.rd(MSIX_CONFIG, 2) == NO_VECTOR              # "mapping failed"
        drv.wr(Q_SELECT, 0, 2)
        drv.wr(Q_MSIX_VECTOR, bad, 2)
        assert drv.rd(Q_MSIX_VECTOR, 2) == NO_VECTOR
    drv.wr(MSIX_CONFIG, 1, 2)
    assert drv.rd(MSIX_CONFIG, 2) == 1


def test_msix_table_index_out_of_range(rig):
    drv = rig.drv
    drv.init()
    past = drv.msix_table + 16 * drv.msix_vectors               # entry 2 of 2
    for off in (0, 4, 8, 12):
        assert drv.regs.read(past + off, 4) == 0xFFFF_FFFF
        drv.regs.write(past + off, 4, 0)
    drv.regs.write(BAR + 0x3BF8, 8, 0)                           # the table window's last QWORD
    assert bytes(rig.t.msix.table[32:]) == b""                   # nothing grew
    assert rig.t.msix.notify(2) is False and rig.t.msix.notify(-1) is False
    for size, off in ((1, 0), (2, 0), (4, 2), (8, 4)):          # not aligned DWORD/QWORD
        assert drv.regs.read(drv.msix_table + off, size) == (1 << (8 * size)) - 1
        drv.regs.write(drv.msix_table + off, size, 0)
    assert rig.t.msix.entry(0) == (MSI_ADDRESS, 0x40, False)
    drv.regs.write(drv.msix_pba, 8, 0xFF)                        # the PBA is read-only
    assert drv.pba() == 0


@pytest.mark.parametrize("size, desc", [(0, 0x10000), (3, 0x10000), (8, 0x10001),
                                        (8, 0xFFFF_F000)])
def test_bad_queue_is_refused_with_needs_reset_and_a_config_interrupt(rig, size, desc):
    drv = rig.drv
    drv.negotiate()
    drv.msix_control(MSIX_ENABLE)
    drv.msix_entry(0, MSI_ADDRESS, 0x40)
    drv.wr(MSIX_CONFIG, 0, 2)
    drv.wr(Q_SELECT, 0, 2)
    drv.wr(Q_SIZE, size, 2)
    drv.wr(Q_DESC, desc, 4)
    drv.wr(Q_DRIVER, 0x20000, 4)
    drv.wr(Q_DEVICE, 0x21000, 4)
    drv.wr(Q_ENABLE, 1, 2)
    assert drv.rd(Q_ENABLE, 2) == 0
    assert drv.status() & NEEDS_RESET
    assert rig.msi == [(MSI_ADDRESS, 0x40)]


def test_pci_cfg_access_capability(rig):
    cap = rig.drv.caps[PCI_CFG]["pos"]
    cfg = rig.cfg

    def window(offset, length):
        cfg.write(cap + 4, 0, 1)                 # bar
        cfg.write(cap + 8, offset)
        cfg.write(cap + 12, length)
    window(0x12, 2)                              # num_queues through config space
    assert cfg.read(cap + 16) & 0xFFFF == 1
    window(0x14, 1)
    cfg.write(cap + 16, A, 1)                    # device_status = ACKNOWLEDGE
    assert rig.dev.status == A
    for bar, offset, length in ((1, 0x14, 1), (0, 0x15, 2), (0, 0x14, 3), (0, BAR_SIZE - 2, 4),
                                (0, 0xFFFF_FFFC, 4)):
        cfg.write(cap + 4, bar, 1)
        cfg.write(cap + 8, offset)
        cfg.write(cap + 12, length)
        cfg.write(cap + 16, 0)
    assert rig.dev.status == A


OPS = st.lists(st.tuples(
    st.sampled_from(["bar", "cfg"]),
    st.booleans(),
    st.one_of(st.sampled_from([0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1A,
                               0x1C, 0x1E, 0x20, 0x24, 0x28, 0x30, 0x1000, 0x2000, 0x3000,
                               0x3004, 0x3800, 0x380C, 0x3810, 0x381C, 0x3C00]),
              st.integers(0, BAR_SIZE - 1)),
    st.sampled_from([1, 2, 4, 8]),
    st.one_of(st.integers(0, 16), st.sampled_from([0xFF, 0xFFFF, 0xFFFFFFFF, 0x8000, 0xC000]),
              st.integers(0, (1 << 64) - 1))), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_random_register_and_config_traffic(ops):
    with GuestMemory([(0, 4 << 20)]) as mem:
        r = Rig(mem)
        for where, is_write, off, size, value in ops:
            value &= (1 << (8 * size)) - 1
            if where == "cfg":
                reg = off & 0xFF
                if size == 8 or (reg & 3) + size > 4:
                    size = 1
                    value &= 0xFF
                if is_write:
                    r.cfg.write(reg, value, size)
                else:
                    assert 0 <= r.cfg.read(reg, size) < 1 << (8 * size)
            elif is_write:
                r.t.bar_write(off, size, value)
            else:
                assert 0 <= r.t.bar_read(off, size) < 1 << (8 * size)
        # whatever happened, firmware placement, a probe and a proper init bring it back
        r.t.place(BAR)
        r.cfg.write(BAR0 + 4, 0)
        r.cfg.write(BAR0, BAR)
        r.drv.probe()
        r.drv.init()
        vq = r.drv.queues[0]
        vq.submit(in_=[8])
        r.drv.notify(0)
        assert len(vq.get_used()) == 1
        assert (MSI_ADDRESS, 0x41) in r.msi
        r.t.close()


# -- MsiRouter and irqfds (no /dev/kvm) ----------------------------------------------------------

def test_default_irqchip_routes_are_kvms():
    routes = default_irqchip_routes()
    assert len(routes) == 16 * 2 + 8
    assert IrqchipRoute(4, 2, 4) in routes and IrqchipRoute(4, 0, 4) in routes
    assert IrqchipRoute(10, 1, 2) in routes and IrqchipRoute(23, 2, 23) in routes


def test_msi_through_router_and_irqfd(mem):
    vm = FakeVm(has_irqchip=True)
    r = Rig(mem, vm=vm)
    r2 = Rig(mem, VirtioRng(mem), vm=vm, place=False)
    try:
        router = MsiRouter.of(vm)
        assert router is MsiRouter.of(vm)                      # one table per VM
        gsis = r.t.msix.gsis
        assert gsis == [24, 25] and r2.t.msix.gsis == [26, 27]
        assert set(vm.irqfds) == {24, 25, 26, 27}
        r.drv.negotiate()
        r.drv.msix_control(MSIX_ENABLE | MSIX_MASKALL)
        r.drv.msix_entry(1, MSI_ADDRESS, 0x41, masked=True)   # written masked: no commit
        assert vm.tables == []
        r.drv.setup_queue(0, vector=1)
        r.drv.msix_control(MSIX_ENABLE)
        r.drv.mask_vector(1, False)                            # unmasked: the route goes in
        table = vm.tables[-1]
        assert table[:40] == default_irqchip_routes()
        assert table[40:] == [MsiRoute(25, MSI_ADDRESS, 0x41)]
        r.drv.set_status(A | D | FO | DO)
        vq = r.drv.queues[0]
        vq.submit(in_=[8])
        r.drv.notify(0)
        assert len(vq.get_used()) == 1
        assert os.eventfd_read(vm.irqfds[25]) == 1             # the irqfd was signalled
        assert r.msi == []                                     # not the callable
        commits = len(vm.tables)
        r.drv.regs.write(r.drv.msix_table + 16 + 8, 4, 0x42)   # retargeted while unmasked
        assert vm.tables[-1][40:] == [MsiRoute(25, MSI_ADDRESS, 0x42)]
        assert len(vm.tables) == commits + 1
        r.drv.mask_vector(1, False)                            # no change: no ioctl
        assert len(vm.tables) == commits + 1
    finally:
        r.t.close()
        r2.t.close()
    assert vm.irqfds == {} and vm.tables[-1] == default_irqchip_routes()
    assert MsiRouter.of(vm).allocate() in (24, 25, 26, 27)     # GSIs were given back


def test_router_runs_out_of_gsis_cleanly(mem):
    from kvmpy.errors import KvmpyError

    vm = FakeVm(has_irqchip=True)
    router = MsiRouter(vm, max_routes=40 + 3)          # the irqchip's 40 routes and 3 more
    assert [router.allocate(), router.allocate()] == [24, 25]
    with pytest.raises(KvmpyError, match="no GSI left"):
        VirtioPci(VirtioRng(mem), vm, router=router)   # needs 2 vectors, 1 GSI is left
    assert vm.irqfds == {}                             # what it had taken was given back
    assert router.allocate() == 26
    router.release(24)
    assert router.allocate() == 24
    with pytest.raises(KvmpyError, match="KVM takes 43 routes"):
        router.allocate()


def test_router_keeps_a_route_kvm_refused_out_of_its_table(mem, capsys):
    from kvmpy.errors import KvmError

    class Refusing(FakeVm):
        def set_gsi_routing(self, routes):
            raise KvmError("KVM_SET_GSI_ROUTING", 22)

    vm = Refusing(has_irqchip=True)
    r = Rig(mem, vm=vm)
    try:
        r.drv.init()
        vq = r.drv.queues[0]
        vq.submit(in_=[8])
        r.drv.notify(0)
        assert len(vq.get_used()) == 1                 # the request completed anyway
        assert r.t.msix.errors >= 1 and MsiRouter.of(vm).route(25) is None
        assert "KVM refused the route" in capsys.readouterr().err
    finally:
        r.t.close()


def test_ioeventfd_mode_runs_queues_in_the_iothread(mem, image):
    vm = FakeVm()
    threads = []
    with IoThread(name="virtio-io") as io:
        r = Rig(mem, VirtioBlk(mem, str(image)), vm=vm, iothread=io)
        real = r.dev.notify
        r.dev.notify = lambda i, **k: (threads.append(threading.current_thread().name),
                                       real(i, **k))[1]
        r.drv.init()
        vq = r.drv.queues[0]
        req = vq.submit(out=[HDR.pack(BLK_IN, 0, 0)], in_=[512, 1])
        # KVM would have taken the write; here it exits to the region, which forwards it
        r.drv.notify(0)
        assert r.wait_msi(1)
        deadline = time.monotonic() + 10
        got = vq.get_used()
        while not got and time.monotonic() < deadline:
            time.sleep(0.001)
            got = vq.get_used()
        assert got == [(req, 513)] and req.written()[:512] == pattern(512)
        r.t.close()
    assert set(threads) == {"virtio-io"}


def test_add_to_machine_places_the_bars(tmp_path):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    from kvmpy.builder import Machine

    with Machine(4 << 20, irqchip=True) as m, IoThread() as io:
        lines = [add_to_machine(m, VirtioRng(m.memory), io) for _ in range(2)]
        assert lines[0] == ("virtio-pci 00:01.0: BAR0 0xe0000000-0xe0003fff MSI-X through KVM "
                            "(2 vectors), INTx GSI 17")
        assert lines[1].startswith("virtio-pci 00:02.0: BAR0 0xe0004000-0xe0007fff")
        assert m.mmio.lookup(PCI_MMIO_BASE + BAR_SIZE).device is m.pci.functions[(2, 0)].region
        text = m.describe()
        assert "00:01.0  1af4:1044  virtio0" in text and "0x00e0000000" in text
        cfg = ConfigSpace(m.pio.lookup(0xCF8).device, 1)
        assert cfg.read(0x3C, 1) == 17 and cfg.read(COMMAND, 2) & CMD_MEMORY
        assert m.pci.intx_routes == [(1, 1, 17), (2, 1, 18)]   # (device, INTA#, GSI)


def test_pci_interrupt_lines_are_shared_by_level():
    """More functions than PCI lines share one: the line stays high while any holds it."""
    from kvmpy.devices.pci import PciBus

    levels: dict[int, list] = {}
    bus = PciBus()
    wired = [bus.wire_intx(d, 1, lambda gsi: levels.setdefault(gsi, []).append)
             for d in (1, 9, 2)]
    assert [gsi for gsi, _ in wired] == [17, 17, 18]
    (_, a), (_, b), (_, c) = wired
    a(1), b(1), a(0)
    assert levels[17] == [1]              # b still holds it
    b(0), b(0), c(1)
    assert levels == {17: [1, 0], 18: [1]}


# -- on /dev/kvm: a guest notifies through an ioeventfd and takes the MSI ------------------------

# The real-mode guests below start so: the 8259s initialised and every line masked (only the
# LAPIC delivers), and the LAPIC software-enabled (SVR, Intel SDM vol. 3A 10.9: fixed
# interrupts are dropped while it is disabled).
LAPIC_ONLY = r"""
        mov $0x11, %al                 /* 8259 ICW1..4, then mask every line */
        out %al, $0x20
        mov $0x08, %al
        out %al, $0x21
        mov $0x04, %al
        out %al, $0x21
        mov $0x01, %al
        out %al, $0x21
        mov $0xff, %al
        out %al, $0x21
        out %al, $0xa1
        addr32 movl $0x1ff, 0xfee000f0 /* LAPIC SVR: enabled, spurious vector 0xff */
"""

# Real mode with DS given a 4 GiB limit by the host ("unreal mode"), so 32-bit addresses reach
# the LAPIC and BAR 0. The guest hooks vector 0x41 (the MSI-X data of queue 0's vector), masks
# the 8259s and enables its LAPIC (LAPIC_ONLY), notifies queue 0 with a 16-bit write (an
# ioeventfd: no exit) and halts. The handler reports through isa-debug-exit (status =
# (0x21 << 1) | 1).
GUEST = r"""
        .code16
        cli
        xor %ax, %ax
        mov %ax, %ds
        movw $msi, 0x41 * 4
        movw $0, 0x41 * 4 + 2
""" + LAPIC_ONLY + r"""
        sti
        addr32 movw $0, 0xe0003000     /* queue 0 notify (BAR 0 + 0x3000) */
1:      hlt
        jmp 1b
msi:    mov $0x21, %al
        out %al, $0xf4                 /* isa-debug-exit */
"""


# INTx through the IOAPIC, as a guest without MSI-X takes it: the guest programs its IOAPIC's
# redirection entry for the function's PCI line (GSI_PIN, from the PCI routes the MP table
# gets) as level-triggered, active low (PCI's way, MP spec 4.3.4) to vector 0x42. Its handler
# reads ISR (read-to-clear, which drops INTx), then EOIs the LAPIC; KVM's IOAPIC re-delivers
# a level interrupt whose line is still high at EOI, so more interrupts would mean the line was
# not dropped. The guest waits a while with interrupts on, then exits; it leaves the count
# at 0x600 and each interrupt's ISR value from 0x601 (the first 8) for the test to read.
INTX_COUNT, INTX_ISRS = 0x600, 0x601
INTX_GUEST = r"""
        .code16
        cli
        xor %ax, %ax
        mov %ax, %ds
        movw $intx, 0x42 * 4
        movw $0, 0x42 * 4 + 2
""" + LAPIC_ONLY + r"""
        /* IOAPIC redirection entry GSI_PIN (registers 0x10 + 2n, 0x11 + 2n; 82093AA 3.2.4):
           destination APIC 0; vector 0x42, level (bit 15), active low (bit 13), unmasked */
        addr32 movl $(0x11 + 2 * GSI_PIN), 0xfec00000
        addr32 movl $0, 0xfec00010
        addr32 movl $(0x10 + 2 * GSI_PIN), 0xfec00000
        addr32 movl $(0x42 | 1 << 15 | 1 << 13), 0xfec00010
        sti
        addr32 movw $0, 0xe0003000     /* queue 0 notify (BAR 0 + 0x3000) */
1:      hlt
        cmpb $0, 0x600
        je 1b
        mov $20000, %cx                /* interrupts on: a line left high fires again */
2:      loop 2b
        cli
        mov $0x21, %al
        out %al, $0xf4                 /* isa-debug-exit */
intx:   push %ax
        push %bx
        addr32 mov 0xe0001000, %al     /* ISR (BAR 0 + 0x1000): read-to-clear drops INTx */
        movzbw 0x600, %bx
        cmp $8, %bx
        jae 3f
        mov %al, 0x601(%bx)
3:      cmpb $0xff, 0x600
        je 4f
        incb 0x600
4:      addr32 movl $0, 0xfee000b0     /* LAPIC EOI: the IOAPIC's remote IRR clears */
        pop %bx
        pop %ax
        iret
"""


@kvm
def test_guest_takes_intx_through_the_ioapic(image):
    from kvmpy.asm import assemble
    from kvmpy.builder import Machine
    from kvmpy.devices.debug_exit import DebugExit

    with Machine(4 << 20, irqchip=True) as m, IoThread() as io:
        m.add_pio_device(DebugExit(), 0xF4)
        dev = VirtioBlk(m.memory, str(image))
        add_to_machine(m, dev, io)
        io.start()
        (slot, pin, gsi), = m.pci.intx_routes
        assert (slot, pin) == (1, 1) and gsi >= 16     # a PCI line, not an ISA IRQ
        m.memory.write(0x7C00, assemble(f".set GSI_PIN, {gsi}\n" + INTX_GUEST, 0x7C00))
        drv = PciDriver(m.memory, ConfigSpace(m.pio.lookup(0xCF8).device, 1), m.mmio,
                        area=(0x10000, 0x80000))
        drv.probe()
        kicked, notify = threading.Event(), dev.notify
        dev.notify = lambda i, **k: (notify(i, **k), kicked.set())[0]
        drv.init(msix=False)
        assert kicked.wait(10)
        req = drv.queues[0].submit(out=[HDR.pack(BLK_IN, 0, 5)], in_=[512, 1])
        m.start(unreal_mode_setup)
        outcome = m.wait(30)
        assert outcome.status == (0x21 << 1) | 1, outcome
        count = m.memory.read(INTX_COUNT, 1)[0]
        isrs = list(m.memory.read(INTX_ISRS, min(count, 8)))
        (got, n), = drv.queues[0].get_used()
        assert got is req and n == 513
        assert req.written() == pattern(64 * 512)[5 * 512:6 * 512] + b"\0"
        assert _intx_level(m) == 0
    # The first interrupt saw "used buffer" in ISR, and reading it dropped the line: no more
    # after the guest's EOI. PVM (this workplace's software KVM) EOIs a level-triggered
    # interrupt of this real-mode guest once on its own, before the handler has read ISR
    # (kvm_eoi for vector 0x42 in the host's trace, with no EOI write by the guest): the line
    # is still high then, so the IOAPIC rightly delivers it again, and the second handler reads
    # ISR 0. A line left high would go on firing. Under kvm_amd (tests/nested) it is exactly one.
    assert isrs[:1] == [1], (count, isrs)
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert isrs in ([1], [1, 0]), (count, isrs)
    else:
        assert isrs == [1], (count, isrs)


def _intx_level(m) -> int:
    (t,) = [f for f in m.pci.functions.values() if isinstance(f, VirtioPci)]
    return t.intx_level


def unreal_mode_setup(vcpu):
    from kvmpy.vcpu.modes import setup_real_mode

    setup_real_mode(vcpu, 0x7C00)
    s = vcpu.get_sregs()
    s.ds.limit, s.ds.g = 0xFFFFFFFF, 1
    vcpu.set_sregs(s)


@kvm
def test_guest_notify_and_msix_through_kvm(image):
    from kvmpy.asm import assemble
    from kvmpy.builder import Machine
    from kvmpy.devices.debug_exit import DebugExit

    with Machine(4 << 20, irqchip=True) as m, IoThread() as io:
        m.memory.write(0x7C00, assemble(GUEST, 0x7C00))
        m.add_pio_device(DebugExit(), 0xF4)
        dev = VirtioBlk(m.memory, str(image))
        add_to_machine(m, dev, io)
        io.start()
        t = m.pci.functions[(1, 0)]
        drv = PciDriver(m.memory, ConfigSpace(m.pio.lookup(0xCF8).device, 1), m.mmio,
                        area=(0x10000, 0x80000))
        drv.probe()
        # DRIVER_OK kicks the queue through the I/O thread; let that finish before posting,
        # or it could complete the request (and send the MSI) before the guest can take it.
        kicked, notify = threading.Event(), dev.notify
        dev.notify = lambda i, **k: (notify(i, **k), kicked.set())[0]
        drv.init()
        assert kicked.wait(10)
        router = MsiRouter.of(m.vm)
        gsi = t.msix.gsis[1]
        assert router.route(gsi) == MsiRoute(gsi, MSI_ADDRESS, 0x41)   # KVM took the table
        assert t.ioeventfd_addresses == [BAR + 0x3000]
        vq = drv.queues[0]
        req = vq.submit(out=[HDR.pack(BLK_IN, 0, 3)], in_=[512, 1])
        m.start(unreal_mode_setup)
        outcome = m.wait(30)
        assert outcome.status == (0x21 << 1) | 1, outcome       # the guest took vector 0x41
        (got, n), = vq.get_used()
        assert got is req and n == 513
        assert req.written() == pattern(64 * 512)[3 * 512:4 * 512] + b"\0"
        assert m.dispatcher.exit_counts().get("MMIO", 0) == 0   # notify and LAPIC: no exits
        # the I/O thread counts a message after its irqfd write, which the guest may beat
        deadline = time.monotonic() + 5
        while t.msix.delivered == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.msix.delivered == 1
        m.irq_line(4)(1)                                         # legacy routes still work
        m.irq_line(4)(0)
