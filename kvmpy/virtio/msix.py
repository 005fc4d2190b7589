"""MSI-X for an emulated PCI function (PCI Local Bus Specification 3.0, section 6.8.2), and the
one GSI routing table that carries MSI messages into KVM.

:class:`Msix` is the function's side: the capability's Message Control bits (enable, function
mask), the vector table (16 bytes per vector: address low/high, data, vector control whose bit 0
masks the vector) and the Pending Bit Array. A device asks for vector ``v`` with
:meth:`Msix.notify`; a masked vector (function mask or its own mask bit) sets its pending bit
instead, and the message goes out when the vector is unmasked (6.8.2.9: a masked vector with its
pending bit set sends its message once unmasked).

The guest is untrusted (shared/hostile-inputs.md items 24, 25): table and PBA take aligned 4- or
8-byte accesses only (6.8.2: "software must use aligned full DWORD or aligned full QWORD
transactions"); anything else, and any access past the last vector or the last PBA QWORD, reads
all-ones and is dropped on write; a vector number past the table is never delivered
(CVE-2020-13754 class). Reserved bits read 0.

Where messages go: with a Vm, each vector owns a GSI (from :class:`MsiRouter`) and a KVM irqfd on
it; a message is an eventfd write, and KVM injects the MSI that the GSI's route says. The route
is pushed to KVM when a vector is unmasked, when its address/data change while it is unmasked,
and (if still stale) before each message, so KVM always delivers what the table holds. Without a
Vm (tests, or a VM without an in-kernel irqchip), messages go to a ``msi(address, data)``
callable.

:class:`MsiRouter` owns the VM's whole KVM_SET_GSI_ROUTING table, because that ioctl replaces
the table: the irqchip routes KVM installs at KVM_CREATE_IRQCHIP (GSI 0-23) plus one MSI route
per GSI handed out. There is one per Vm (:meth:`MsiRouter.of`); every MSI-X function shares it.

This module knows nothing about virtio, config-space layout or BAR placement: the function that
embeds it maps the table and PBA into a BAR and forwards Message Control writes.
"""
from __future__ import annotations

import os
import struct
import sys
import threading
import weakref
from collections.abc import Callable

from kvmpy.errors import KvmpyError
from kvmpy.vm import IrqchipRoute, MsiRoute

MSIX_CAP_ID = 0x11                 # PCI 3.0, Appendix H: capability ID of MSI-X
# Message Control (6.8.2.3)
CTRL_TABLE_SIZE = 0x07FF           # bits 10:0: table size - 1 (read-only)
CTRL_FUNCTION_MASK = 1 << 14
CTRL_ENABLE = 1 << 15
MAX_VECTORS = 2048
# Table entry (6.8.2.6-6.8.2.9)
ENTRY_SIZE = 16
ENTRY_ADDR_LO, ENTRY_ADDR_HI, ENTRY_DATA, ENTRY_CTRL = 0, 4, 8, 12
VECTOR_MASKED = 1                  # vector control bit 0; the other bits are reserved (read 0)
_ENTRY = struct.Struct("<IIII")

# KVM_CREATE_IRQCHIP's routing on x86 (arch/x86/kvm/irq_comm.c, default_routing[]): GSI 0-15 to
# IOAPIC pin gsi and to the 8259 pair (master for 0-7, slave for 8-15, pin gsi % 8); 16-23 to
# the IOAPIC only. irqchip numbers: KVM_IRQCHIP_PIC_MASTER 0, _PIC_SLAVE 1, _IOAPIC 2.
IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS
# Routing entries KVM takes (KVM_MAX_IRQ_ROUTES, include/linux/kvm_host.h), when the VM cannot
# say (KVM_CHECK_EXTENSION(KVM_CAP_IRQ_ROUTING) returns it): 4096 now, 1024 on older kernels.
MAX_ROUTES = 1024


def default_irqchip_routes() -> list:
    """The routes KVM_CREATE_IRQCHIP installs, which every table we set must keep."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        routes.append(IrqchipRoute(gsi, 2, gsi))
        if gsi < 16:
            routes.append(IrqchipRoute(gsi, 0 if gsi < 8 else 1, gsi % 8))
    return routes


class MsiRouter:
    """The VM's GSI routing table: the irqchip routes plus an MSI route per allocated GSI.
    Every change is one KVM_SET_GSI_ROUTING with the whole table (it replaces, never merges)."""

    _by_vm: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _by_vm_lock = threading.Lock()

    def __init__(self, vm, base_routes: list | None = None, first_gsi: int = FIRST_MSI_GSI,
                 max_routes: int | None = None):
        self.vm = vm
        self.base_routes = default_irqchip_routes() if base_routes is None else list(base_routes)
        if max_routes is None:
            max_routes = _max_routes(vm)
        # GSIs below max_routes, and no more entries in all than max_routes
        self.max_routes = max_routes
        self._next = first_gsi
        self._limit = min(max_routes, first_gsi + max_routes - len(self.base_routes))
        self._free: list[int] = []
        self._allocated: set[int] = set()
        self._msi: dict[int, MsiRoute] = {}
        self._lock = threading.Lock()
        self.commits = 0                   # KVM_SET_GSI_ROUTING calls made

    @classmethod
    def of(cls, vm) -> "MsiRouter":
        """The router of ``vm``, created on first use: one routing table per VM."""
        with cls._by_vm_lock:
            router = cls._by_vm.get(vm)
            if router is None:
                router = cls._by_vm[vm] = cls(vm)
            return router

    def allocate(self) -> int:
        """A GSI for one MSI vector (it has no route until :meth:`set_route`)."""
        with self._lock:
            if self._free:
                gsi = self._free.pop()
            elif self._next < self._limit:
                gsi, self._next = self._next, self._next + 1
            else:
                raise KvmpyError(f"no GSI left for MSI-X vectors (KVM takes "
                                 f"{self.max_routes} routes)")
            self._allocated.add(gsi)
            return gsi

    def release(self, gsi: int) -> None:
        """Give ``gsi`` back; its route, if any, is removed from KVM's table."""
        with self._lock:
            if gsi not in self._allocated:
                return
            self._allocated.discard(gsi)
            self._free.append(gsi)
            if self._msi.pop(gsi, None) is not None:
                self._commit()

    def set_route(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI (address, data); nothing is sent to KVM if it already is."""
        route = MsiRoute(gsi, address & 0xFFFF_FFFF_FFFF_FFFF, data & 0xFFFFFFFF)
        with self._lock:
            if gsi not in self._allocated:
                raise KvmpyError(f"GSI {gsi} was not allocated by this router")
            old = self._msi.get(gsi)
            if old == route:
                return
            self._msi[gsi] = route
            try:
                self._commit()
            except BaseException:
                if old is None:
                    del self._msi[gsi]
                else:
                    self._msi[gsi] = old
                raise

    def route(self, gsi: int) -> MsiRoute | None:
        return self._msi.get(gsi)

    def table(self) -> list:
        """The whole table, as KVM was last given it."""
        with self._lock:
            return self._routes()

    def _routes(self) -> list:
        return self.base_routes + [self._msi[g] for g in sorted(self._msi)]

    def _commit(self) -> None:
        self.vm.set_gsi_routing(self._routes())
        self.commits += 1


def _max_routes(vm) -> int:
    check = getattr(vm, "check_extension", None)
    if check is None:
        return MAX_ROUTES
    from kvmpy.kvm import Cap

    try:
        return check(Cap.IRQ_ROUTING) or MAX_ROUTES
    except KvmpyError:
        return MAX_ROUTES


class Msix:
    """One function's MSI-X state with a table of ``vectors`` entries. Messages go through KVM
    irqfds when ``vm`` is given (it needs the in-kernel irqchip), else to ``msi(address, data)``
    (or nowhere)."""

    def __init__(self, vectors: int, vm=None, msi: Callable[[int, int], None] | None = None,
                 router: MsiRouter | None = None):
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X table size {vectors} is not in 1..{MAX_VECTORS}")
        self.vectors = vectors
        self.table = bytearray(ENTRY_SIZE * vectors)
        for v in range(vectors):             # 6.8.2.9: the mask bit is set after reset
            self.table[ENTRY_SIZE * v + ENTRY_CTRL] = VECTOR_MASKED
        self.pending = bytearray(vectors)    # the PBA, one byte per bit
        self.enabled = False
        self.function_masked = False
        self._msi = msi
        self._lock = threading.Lock()
        self.delivered = 0                   # messages sent
        self.ignored = 0                     # accesses and requests dropped
        self.errors = 0                      # routes KVM refused (their messages were dropped)
        self._reported = False
        self._vm = None
        self._router: MsiRouter | None = None
        self._gsis: list[int] = []
        self._fds: list[int] = []
        self._routed: list[tuple[int, int] | None] = [None] * vectors
        if vm is not None:
            self._attach_irqfds(vm, router or MsiRouter.of(vm))

    # -- sizes and the capability --------------------------------------------------------------
    @property
    def table_size(self) -> int:
        return ENTRY_SIZE * self.vectors

    @property
    def pba_size(self) -> int:
        return 8 * -(-self.vectors // 64)   # whole QWORDs (6.8.2.10)

    def capability(self, table_bar: int, table_offset: int, pba_bar: int,
                   pba_offset: int) -> tuple[bytes, bytes]:
        """(body, write mask) of the capability after its ID and next pointer (6.8.2.2):
        Message Control, Table Offset/BIR, PBA Offset/BIR. Only enable and function mask are
        writable."""
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA offsets must be QWORD aligned")
        body = struct.pack("<HII", self.vectors - 1, table_offset | table_bar,
                           pba_offset | pba_bar)
        mask = struct.pack("<HII", CTRL_ENABLE | CTRL_FUNCTION_MASK, 0, 0)
        return body, mask

    def set_control(self, control: int) -> None:
        """The guest wrote Message Control (the embedding function forwards the new value)."""
        with self._lock:
            self.enabled = bool(control & CTRL_ENABLE)
            self.function_masked = bool(control & CTRL_FUNCTION_MASK)
            for v in range(self.vectors):
                if not self._masked(v):
                    self._update_route(v)
                    if self.pending[v]:
                        self.pending[v] = 0
                        self._send(v)

    # -- table and PBA (BAR accesses; offsets from their start) -------------------------------
    def read_table(self, offset: int, size: int) -> int:
        if not _aligned(offset, size, self.table_size):
            self.ignored += 1
            return (1 << (8 * size)) - 1
        with self._lock:
            return int.from_bytes(self.table[offset:offset + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        if not _aligned(offset, size, self.table_size):
            self.ignored += 1
            return
        v = offset // ENTRY_SIZE                  # an aligned access stays in one entry
        with self._lock:
            was_masked = self._masked(v)
            for i in range(size // 4):
                off = offset + 4 * i
                word = (value >> (32 * i)) & 0xFFFFFFFF
                field = off % ENTRY_SIZE
                if field == ENTRY_ADDR_LO:
                    word &= ~3            # 6.8.2.6: bits 1:0 are for DWORD alignment, read 0
                elif field == ENTRY_CTRL:
                    word &= VECTOR_MASKED
                struct.pack_into("<I", self.table, off, word)
            if not self._masked(v):
                self._update_route(v)
                if was_masked and self.pending[v]:
                    self.pending[v] = 0
                    self._send(v)

    def read_pba(self, offset: int, size: int) -> int:
        if not _aligned(offset, size, self.pba_size):
            self.ignored += 1
            return (1 << (8 * size)) - 1
        with self._lock:
            value = 0
            for bit in range(8 * size):
                v = 8 * offset + bit
                if v < self.vectors and self.pending[v]:
                    value |= 1 << bit
            return value

    def write_pba(self, offset: int, size: int, value: int) -> None:
        self.ignored += 1                 # 6.8.2.10: the PBA is read-only

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(address, data, masked bit) of table entry ``vector``."""
        lo, hi, data, ctrl = _ENTRY.unpack_from(self.table, ENTRY_SIZE * vector)
        return lo | hi << 32, data, bool(ctrl & VECTOR_MASKED)

    # -- messages ------------------------------------------------------------------------------
    def notify(self, vector: int) -> bool:
        """The function interrupts with ``vector``. True if a message went out; a masked
        vector's pending bit is set instead. Ignored while MSI-X is disabled and for a vector
        that is not in the table."""
        if not 0 <= vector < self.vectors:
            self.ignored += 1
            return False
        with self._lock:
            if not self.enabled:
                self.ignored += 1
                return False
            if self._masked(vector):
                self.pending[vector] = 1
                return False
            return self._send(vector)

    def clear_pending(self) -> None:
        """Forget pending messages (the function was reset)."""
        with self._lock:
            self.pending[:] = bytes(self.vectors)

    def _masked(self, v: int) -> bool:
        return (not self.enabled or self.function_masked
                or bool(self.table[ENTRY_SIZE * v + ENTRY_CTRL] & VECTOR_MASKED))

    def _update_route(self, v: int) -> bool:
        """Make KVM's route for vector ``v`` what the table says. False if KVM refused it."""
        if self._router is None:
            return True
        address, data, _ = self.entry(v)
        if self._routed[v] == (address, data):
            return True
        try:
            self._router.set_route(self._gsis[v], address, data)
        except KvmpyError as e:
            self.errors += 1
            if not self._reported:
                self._reported = True
                print(f"kvmpy: MSI-X vector {v}: KVM refused the route to {address:#x} data "
                      f"{data:#x}: {e}", file=sys.stderr)
            return False
        self._routed[v] = (address, data)
        return True

    def _send(self, v: int) -> bool:
        if self._router is not None:
            if not self._update_route(v):
                return False
            try:
                os.eventfd_write(self._fds[v], 1)
            except BlockingIOError:       # counter saturated: an injection is pending anyway
                pass
        elif self._msi is not None:
            address, data, _ = self.entry(v)
            self._msi(address, data)
        else:
            self.ignored += 1
            return False
        self.delivered += 1
        return True

    # -- KVM irqfds ----------------------------------------------------------------------------
    def _attach_irqfds(self, vm, router: MsiRouter) -> None:
        self._vm, self._router = vm, router
        try:
            for _ in range(self.vectors):
                self._gsis.append(router.allocate())
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                try:
                    vm.irqfd(fd, self._gsis[-1])
                except BaseException:
                    os.close(fd)
                    raise
                self._fds.append(fd)
        except BaseException:
            self.close()
            raise

    @property
    def gsis(self) -> list[int]:
        """The GSI of each vector (empty without a Vm)."""
        return list(self._gsis)

    @property
    def eventfds(self) -> list[int]:
        """The irqfd eventfd of each vector (empty without a Vm)."""
        return list(self._fds)

    def close(self) -> None:
        """Deassign the irqfds and give the GSIs back. Idempotent."""
        with self._lock:
            fds, self._fds = self._fds, []
            gsis, self._gsis = self._gsis, []
            router, self._router = self._router, None
            self._routed = [None] * self.vectors
        for fd, gsi in zip(fds, gsis):
            try:
                self._vm.irqfd(fd, gsi, deassign=True)
            except KvmpyError:            # the VM may be closing; closing the fd detaches it
                pass
            os.close(fd)
        for gsi in gsis:
            try:
                router.release(gsi)
            except KvmpyError:
                pass


def _aligned(offset: int, size: int, limit: int) -> bool:
    return size in (4, 8) and offset % size == 0 and 0 <= offset and offset + size <= limit
