"""virtio-net over a loopback backend: frames both ways, no RX buffer -> held, not lost."""
import pytest

from kvmpy.memory import GuestMemory
from kvmpy.vmexit.bus import MmioBus
from kvmpy.virtio.mmio import VirtioMmio
from kvmpy.virtio.net import HDR_LEN, VirtioNet
from virtio_driver import IrqRecorder, MmioDriver, Regs

BASE = 0xD0000000


class FakeBackend:
    """Records sent frames; delivers injected frames like a real backend (holds on False)."""

    def __init__(self):
        self.sent, self.held, self.receiver, self.closed = [], [], None, False

    def set_receiver(self, fn):
        self.receiver = fn

    def send(self, frame):
        self.sent.append(frame)

    def inject(self, frame):
        self.held.append(frame)
        self.rx_ready()

    def rx_ready(self):
        while self.held and self.receiver(self.held[0]):
            self.held.pop(0)

    def close(self):
        self.closed = True


@pytest.fixture
def net():
    with GuestMemory([(0, 1 << 20)]) as mem:
        be = FakeBackend()
        dev = VirtioNet(mem, be, mac=bytes.fromhex("525400123456"))
        irq = IrqRecorder()
        bus = MmioBus()
        bus.insert(VirtioMmio(dev, irq=irq), BASE)
        drv = MmioDriver(mem, Regs(bus, BASE))
        assert drv.read(0x008) == 1                       # 5.1.1: network card
        drv.init(queues=2)
        yield drv, dev, be, irq


def test_config_mac_and_link(net):
    drv, *_ = net
    assert bytes(drv.config(i, 1) for i in range(6)) == bytes.fromhex("525400123456")
    assert drv.config(6, 2) == 1                           # VIRTIO_NET_S_LINK_UP
    assert drv.features & (1 << 5) and drv.features & (1 << 16)


def test_tx_strips_header(net):
    drv, dev, be, _ = net
    frame = bytes(range(60))
    drv.queues[1].submit(out=[bytes(HDR_LEN), frame])
    drv.notify(1)
    assert be.sent == [frame]


def test_rx_waits_for_buffers_then_delivers(net):
    drv, dev, be, irq = net
    be.inject(b"A" * 60)
    assert be.held and dev.rx_frames == 0                 # no buffer yet: held by the backend
    r = drv.queues[0].submit(in_=[1526])
    drv.notify(0)                                         # buffers posted -> rx_ready
    (req, n), = drv.queues[0].get_used()
    assert n == HDR_LEN + 60 and req.written()[HDR_LEN:n] == b"A" * 60
    assert req.written()[10:12] == b"\x01\x00"            # num_buffers = 1
    assert not be.held and irq.raised >= 1


def test_oversized_frame_dropped_not_stuck(net):
    drv, dev, be, _ = net
    drv.queues[0].submit(in_=[64])
    drv.notify(0)
    be.inject(b"B" * 200)
    assert dev.rx_dropped == 1 and not be.held


def test_dhcp_through_virtio_net_and_slirp():
    """The whole path: a DHCPDISCOVER posted on the TX queue by the test driver reaches
    libslirp, and its DHCPOFFER comes back in a receive buffer."""
    import socket
    import time

    from kvmpy.net.slirp import SlirpBackend
    from test_net_frames import Frame, dhcp

    with GuestMemory([(0, 1 << 20)]) as mem:
        backend = SlirpBackend()
        backend.run_in_thread()
        dev = VirtioNet(mem, backend, mac=bytes.fromhex("525400123456"))
        try:
            bus = MmioBus()
            bus.insert(VirtioMmio(dev, irq=IrqRecorder()), BASE)
            drv = MmioDriver(mem, Regs(bus, BASE))
            drv.init(queues=2)
            for _ in range(4):
                drv.queues[0].submit(in_=[1526])
            drv.notify(0)
            drv.queues[1].submit(out=[bytes(HDR_LEN), dhcp(1, 0x4242)])
            drv.notify(1)
            offer = None
            deadline = time.monotonic() + 10
            while offer is None and time.monotonic() < deadline:
                for req, n in drv.queues[0].get_used():
                    f = Frame(req.written()[HDR_LEN:n])
                    if f.proto == 17 and f.sport == 67:
                        offer = f
                time.sleep(0.01)
            assert offer is not None, "no DHCPOFFER"
            assert offer.dhcp_options()[53] == b"\x02"
            assert socket.inet_ntoa(offer.data[16:20]) == "10.0.2.15"
        finally:
            dev.close()
