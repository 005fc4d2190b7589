"""``Vm``: a VM fd. One method per VM ioctl, named after it (Documentation/virt/kvm/api.rst).

The Vm owns its fd only. Guest RAM is owned by :class:`kvmpy.memory.GuestMemory` and vCPUs by
:class:`kvmpy.vcpu.Vcpu`; the builder ties their lifetimes together.
"""
from __future__ import annotations

import collections

from kvmpy import ioctls
from kvmpy._ffi import ffi, lib
from kvmpy.fd import KvmFd


# GSI routes for set_gsi_routing (struct kvm_irq_routing_msi / _irqchip). namedtuples, not
# dataclasses or typing.NamedTuple: both cost milliseconds of startup.
MsiRoute = collections.namedtuple("MsiRoute", "gsi address data")
#: irqchip: 0 PIC master, 1 PIC slave, 2 IOAPIC (KVM_IRQCHIP_*)
IrqchipRoute = collections.namedtuple("IrqchipRoute", "gsi irqchip pin")


class Vm(KvmFd):
    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self._fd = fd
        self.has_irqchip = False

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (some answers are per VM)."""
        return self._ioctl_int("KVM_CHECK_EXTENSION", ioctls.KVM_CHECK_EXTENSION, int(cap))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: back ``guest_phys_addr`` with host memory (size 0 deletes)."""
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags = slot, flags
        r.guest_phys_addr, r.memory_size, r.userspace_addr = guest_phys_addr, memory_size, userspace_addr
        self._ioctl_ptr("KVM_SET_USER_MEMORY_REGION", ioctls.KVM_SET_USER_MEMORY_REGION, r)

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space Intel VMX needs (real-mode TSS)."""
        self._ioctl_int("KVM_SET_TSS_ADDR", ioctls.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for VMX's unrestricted-guest identity map."""
        p = ffi.new("__u64 *", addr)
        self._ioctl_ptr("KVM_SET_IDENTITY_MAP_ADDR", ioctls.KVM_SET_IDENTITY_MAP_ADDR, p)

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and per-vCPU LAPICs."""
        self._ioctl_int("KVM_CREATE_IRQCHIP", ioctls.KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 (ports 0x40-0x43, 0x61)."""
        c = ffi.new("struct kvm_pit_config *")
        c.flags = flags
        self._ioctl_ptr("KVM_CREATE_PIT2", ioctls.KVM_CREATE_PIT2, c)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set GSI ``irq`` to ``level`` (needs the in-kernel irqchip)."""
        lv = ffi.new("struct kvm_irq_level *")
        lv.irq, lv.level = irq, level
        self._ioctl_ptr("KVM_IRQ_LINE", ioctls.KVM_IRQ_LINE, lv)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write to ``addr`` signals eventfd ``fd`` without an exit."""
        e = ffi.new("struct kvm_ioeventfd *")
        e.addr, e.len, e.fd = addr, length, fd
        flags = 0
        if datamatch is not None:
            e.datamatch = datamatch
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        e.flags = flags
        self._ioctl_ptr("KVM_IOEVENTFD", ioctls.KVM_IOEVENTFD, e)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False, resamplefd: int | None = None) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises GSI ``gsi`` in the guest."""
        e = ffi.new("struct kvm_irqfd *")
        e.fd, e.gsi = fd, gsi
        e.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resamplefd is not None:
            e.flags |= 1 << 1  # KVM_IRQFD_FLAG_RESAMPLE
            e.resamplefd = resamplefd
        self._ioctl_ptr("KVM_IRQFD", ioctls.KVM_IRQFD, e)

    def set_gsi_routing(self, routes: list[MsiRoute | IrqchipRoute]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table with ``routes``.

        The table is one per VM and this call replaces all of it: in a VM with virtio-pci
        devices, whose MSI-X vectors are routes kept by ``kvmpy.virtio.msix.MsiRouter.of(vm)``,
        add routes through that router (``allocate`` / ``set_route``) instead, or theirs are
        lost."""
        size = ffi.sizeof("struct kvm_irq_routing") + len(routes) * ffi.sizeof(
            "struct kvm_irq_routing_entry")
        buf = ffi.new("char[]", size)
        table = ffi.cast("struct kvm_irq_routing *", buf)
        table.nr = len(routes)
        for i, r in enumerate(routes):
            e = table.entries[i]
            e.gsi = r.gsi
            if isinstance(r, MsiRoute):
                e.type = lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r.address & 0xFFFFFFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
            else:
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = r.irqchip, r.pin
        self._ioctl_ptr("KVM_SET_GSI_ROUTING", ioctls.KVM_SET_GSI_ROUTING, table)

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: inject one MSI; returns >0 if delivered, 0 if blocked by the guest."""
        m = ffi.new("struct kvm_msi *")
        m.address_lo, m.address_hi, m.data = address & 0xFFFFFFFF, address >> 32, data
        return self._ioctl_ptr("KVM_SIGNAL_MSI", ioctls.KVM_SIGNAL_MSI, m)

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        """KVM_CREATE_VCPU, and the mmap of its ``struct kvm_run``."""
        from kvmpy.vcpu.vcpu import Vcpu

        fd = self._ioctl_int("KVM_CREATE_VCPU", ioctls.KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(self, fd, vcpu_id)
