"""Virtio devices for a machine, as the command line asks for them (``--disk``, ``--rng``,
``--virtio-console``, ``--net``), in the order given, on the chosen transport.

Layout (fixed and printed by ``--device-map``): virtio-mmio slot k at 0xd0000000 + k*0x1000
with IRQ 5, 6, 7, 9, 10, 11 (kvmpy/virtio/mmio.py placement(): ISA IRQs the PC leaves free;
8 is the RTC's, 12 the i8042 mouse's), announced to Linux as ``virtio_mmio.device=`` arguments;
virtio-pci devices on bus 0 from slot 1 (kvmpy/virtio/pci.py), MSI-X, and INTA# on GSI 16-23
(kvmpy/devices/pci.py intx_gsi; the MP table tells Linux).

Each device gets its own I/O thread (``kvmpy-io-virtioK``) for its queue notifications and its
backend: a disk busy in fdatasync() does not hold up the network or the console, as it would
if one thread served them all (Cloud Hypervisor runs a thread per device for the same reason).
"""
from __future__ import annotations

from kvmpy.errors import KvmpyError


def parse_disk(arg: str) -> tuple[str, bool]:
    """'path[,ro]' -> (path, read_only)."""
    parts = arg.split(",")
    path, opts = parts[0], parts[1:]
    if not path:
        raise KvmpyError(f"--disk {arg!r}: give a file path, e.g. --disk rootfs.ext4[,ro]")
    ro = False
    for o in opts:
        if o in ("ro", "readonly"):
            ro = True
        elif o in ("rw", ""):
            pass
        else:
            raise KvmpyError(f"--disk {arg!r}: unknown option {o!r} (only 'ro')")
    return path, ro


def make_device(machine, kind: str, arg: str | None, io):
    if kind == "disk":
        from kvmpy.virtio.blk import VirtioBlk

        path, ro = parse_disk(arg)
        return VirtioBlk(machine.memory, path, ro=ro), f"virtio-blk {path}{' (ro)' if ro else ''}"
    if kind == "rng":
        from kvmpy.virtio.rng import VirtioRng

        return VirtioRng(machine.memory), "virtio-rng (host getrandom)"
    if kind == "virtio-console":
        from kvmpy.virtio.console import VirtioConsole

        dev = VirtioConsole(machine.memory, sink=machine.console._sink)
        machine.input_device = dev   # host stdin now goes here (the guest's hvc0)
        return dev, "virtio-console (hvc0; takes the host's stdin)"
    if kind == "net":
        from kvmpy.virtio.netsetup import make_net

        return make_net(machine, arg, io)
    raise KvmpyError(f"unknown virtio device kind {kind!r}")


def add_virtio_devices(machine, specs: list[tuple[str, str | None]],
                       transport: str = "mmio") -> list[str]:
    """Create, place and wire ``specs``; returns kernel command-line arguments they need."""
    if not specs:
        return []
    from kvmpy.virtio.iothread import IoThread

    threads = []
    cmdline: list[str] = []
    for k, (kind, arg) in enumerate(specs):
        io = IoThread(name=f"kvmpy-io-virtio{k}")
        machine._stack.callback(io.close)
        threads.append(io)
        device, what = make_device(machine, kind, arg, io)
        try:
            if transport == "mmio":
                cmdline.append(_add_mmio(machine, k, device, what, io))
            elif transport == "pci":
                _add_pci(machine, device, what, io)
            else:
                raise KvmpyError(f"--transport {transport!r}: use mmio or pci")
        except BaseException:
            device.close()
            raise
    for io in threads:
        io.start()
        machine._stack.callback(io.stop)
    # vCPUs must stop before the devices they talk to close (the stack unwinds backwards)
    machine._stack.callback(machine._stop_threads)
    return [c for c in cmdline if c]


def _add_mmio(machine, k, device, what, io) -> str:
    from kvmpy.virtio.irqfd import IrqFd
    from kvmpy.virtio.mmio import VirtioMmio, kernel_cmdline_arg, placement

    base, irq = placement(k)
    line = None
    if machine.vm.has_irqchip:
        line = IrqFd(machine.vm, irq)
        machine._stack.callback(line.close)
    t = VirtioMmio(device, irq=line, name=f"virtio{k}")
    machine._stack.callback(t.close)
    machine.add_mmio_device(t, base, f"virtio{k}")
    t.attach_ioeventfds(machine.vm, base, io)
    machine.device_map.append(f"virtio-mmio {k}: {base:#x}-{base + 0xfff:#x} IRQ {irq}  {what}")
    return kernel_cmdline_arg(base, irq)


def _add_pci(machine, device, what, io) -> None:
    from kvmpy.virtio.pci import add_to_machine

    line = add_to_machine(machine, device, io)
    machine.device_map.append(f"{line}  {what}")
