"""The Intel MultiProcessor Specification (version 1.4) table: how a guest without ACPI learns its
CPUs, its I/O APIC and how ISA interrupts reach it.

Two structures, contiguous from ``base_addr``:

    MP floating pointer structure (16 bytes, MP spec 4.1), which the OS finds by scanning (among
        others) the last KiB of base memory, 0x9fc00 (4: "in the last kilobyte of system base
        memory"), and which points at
    MP configuration table (MP spec 4.2): a 44-byte header, then the base table entries (4.3):
        one processor entry per vCPU (APIC ids 0..n-1, cpu 0 the BSP), PCI bus 0 if there is
        one, one ISA bus, the I/O APIC, I/O interrupt assignments for ISA IRQs 0-15 and for
        the PCI functions' INTx pins, and the two local interrupts
        (ExtINT on the BSP's LINT0, NMI on every CPU's LINT1, as SeaBIOS and Firecracker write
        them; kvmpy.vcpu.boot.set_lint programs the LAPICs to match).

ISA IRQ 0 (the PIT) is assigned to I/O APIC pin ``irq0_pin`` (2 by default, as on PCs and in
QEMU, whose GSI routing sends GSI 0 to pin 2); ISA IRQ 2, the 8259 cascade, then gets no entry
(as in QEMU's SeaBIOS table), so no pin is claimed twice. The pin must agree with the VM's GSI
routing: KVM's default routing (kvm_setup_default_irq_routing) sends GSI 0 to pin 0, so a
builder that keeps it should pass ``irq0_pin=0`` (what Firecracker does) or install QEMU's
routing.

The model is Firecracker's arch/src/x86_64/mptable.rs. With many CPUs the table runs past
0xa0000; the builder must keep the range in RAM that the e820 map reports as reserved.
This module builds bytes; it does not write guest memory.
"""
from __future__ import annotations

import enum

from construct import Bytes, Const, Default, Int8ul, Int16ul, Int32ul, Struct
from kvmpy.errors import KvmpyError

# MP spec 4.1: the floating pointer's signature; 4.2: the configuration table's
MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MP_SPEC_REV = 4                     # 4.1/4.2, spec_rev: "04h" for version 1.4
MPF_LENGTH = 1                      # 4.1, length: in 16-byte paragraphs
APIC_VERSION = 0x14                 # LAPIC/IOAPIC version register of an integrated xAPIC
# Processor entry CPU signature and feature flags (4.3.1, Tables 4-5/4-6, from CPUID leaf 1):
# family 6; features FPU (bit 0) and APIC (bit 9), as Firecracker reports them.
CPU_SIGNATURE = 0x600
CPU_FEATURE_FPU = 1 << 0
CPU_FEATURE_APIC = 1 << 9
BUS_TYPE_ISA = b"ISA   "            # 4.3.2, Table 4-8: bus type strings, blank-padded to 6
BUS_TYPE_PCI = b"PCI   "
# Bus ids: a PCI bus's MP bus id is its PCI bus number (Linux's IO_APIC_get_PCI_irq_vector
# matches the entry's source bus against the device's bus number), so PCI bus 0 is id 0 and
# the ISA bus comes after it, as in kvmtool's table; without PCI the ISA bus is 0.
BUS_ID_PCI = 0
ALL_LOCAL_APICS = 0xFF              # 4.3.5, destination local APIC id: "FFh ... all"
BSP_APIC_ID = 0
MAX_CPUS = 254                      # xAPIC ids are 8-bit, 0xff is broadcast, one is the IOAPIC
OEM_ID = b"KVMPY   "
PRODUCT_ID = b"KVMPY VM    "
ISA_IRQS = 16


class EntryType(enum.IntEnum):
    """Base MP configuration table entry types (4.3, Table 4-3)."""

    PROCESSOR = 0           # 20 bytes
    BUS = 1                 # 8 bytes
    IOAPIC = 2              # 8 bytes
    IO_INTERRUPT = 3        # 8 bytes
    LOCAL_INTERRUPT = 4     # 8 bytes


class InterruptType(enum.IntEnum):
    """Interrupt types of I/O and local interrupt assignment entries (4.3.4, Table 4-11)."""

    INT = 0         # vectored interrupt, vector from the APIC redirection table
    NMI = 1
    SMI = 2
    EXTINT = 3      # vectored interrupt, vector from the external 8259A PIC


CPU_ENABLED = 1 << 0        # 4.3.1, CPU flags: EN
CPU_BOOTPROCESSOR = 1 << 1  # 4.3.1, CPU flags: BP
IOAPIC_ENABLED = 1 << 0     # 4.3.3, I/O APIC flags: EN
# 4.3.4, I/O interrupt flags: polarity (bits 0-1) and trigger (bits 2-3), 0 = "conforms to the
# specifications of the bus" (ISA: active high, edge triggered; PCI: active low, level
# triggered). KVM's IOAPIC takes the line's level as given, whatever the polarity bit says.
IRQ_FLAGS_CONFORMING = 0

MpFloatingPointer = Struct(             # 4.1, Figure 4-2: 16 bytes
    "signature" / Const(MPF_SIGNATURE),
    "physptr" / Int32ul,                # address of the configuration table
    "length" / Default(Int8ul, MPF_LENGTH),
    "spec_rev" / Default(Int8ul, MP_SPEC_REV),
    "checksum" / Default(Int8ul, 0),    # all 16 bytes sum to 0
    "feature1" / Default(Int8ul, 0),    # 0: a configuration table is present
    "feature2" / Default(Int8ul, 0),    # bit 7 IMCRP clear: virtual wire mode
    "feature3_5" / Default(Bytes(3), bytes(3)),
)
MpConfigHeader = Struct(                # 4.2, Figure 4-3: 44 bytes
    "signature" / Const(MPC_SIGNATURE),
    "base_table_length" / Int16ul,      # header + base entries
    "spec_rev" / Default(Int8ul, MP_SPEC_REV),
    "checksum" / Default(Int8ul, 0),    # the base table sums to 0
    "oem_id" / Default(Bytes(8), OEM_ID),
    "product_id" / Default(Bytes(12), PRODUCT_ID),
    "oem_table_pointer" / Default(Int32ul, 0),
    "oem_table_size" / Default(Int16ul, 0),
    "entry_count" / Int16ul,
    "lapic_addr" / Int32ul,             # memory-mapped local APIC address
    "extended_table_length" / Default(Int16ul, 0),
    "extended_table_checksum" / Default(Int8ul, 0),
    "reserved" / Default(Int8ul, 0),
)
ProcessorEntry = Struct(                # 4.3.1, Figure 4-5: 20 bytes
    "type" / Const(EntryType.PROCESSOR, Int8ul),
    "lapic_id" / Int8ul,
    "lapic_version" / Default(Int8ul, APIC_VERSION),
    "cpu_flags" / Int8ul,
    "cpu_signature" / Default(Int32ul, CPU_SIGNATURE),
    "feature_flags" / Default(Int32ul, CPU_FEATURE_FPU | CPU_FEATURE_APIC),
    "reserved" / Default(Bytes(8), bytes(8)),
)
BusEntry = Struct(                      # 4.3.2, Figure 4-6: 8 bytes
    "type" / Const(EntryType.BUS, Int8ul),
    "bus_id" / Int8ul,
    "bus_type" / Bytes(6),
)
IoApicEntry = Struct(                   # 4.3.3, Figure 4-7: 8 bytes
    "type" / Const(EntryType.IOAPIC, Int8ul),
    "ioapic_id" / Int8ul,
    "ioapic_version" / Default(Int8ul, APIC_VERSION),
    "flags" / Default(Int8ul, IOAPIC_ENABLED),
    "address" / Int32ul,
)
IoInterruptEntry = Struct(              # 4.3.4, Figure 4-8: 8 bytes
    "type" / Const(EntryType.IO_INTERRUPT, Int8ul),
    "interrupt_type" / Int8ul,
    "flags" / Default(Int16ul, IRQ_FLAGS_CONFORMING),
    "source_bus_id" / Int8ul,
    "source_bus_irq" / Int8ul,
    "dest_ioapic_id" / Int8ul,
    "dest_ioapic_intin" / Int8ul,
)
LocalInterruptEntry = Struct(           # 4.3.5, Figure 4-9: 8 bytes
    "type" / Const(EntryType.LOCAL_INTERRUPT, Int8ul),
    "interrupt_type" / Int8ul,
    "flags" / Default(Int16ul, IRQ_FLAGS_CONFORMING),
    "source_bus_id" / Int8ul,
    "source_bus_irq" / Int8ul,
    "dest_lapic_id" / Int8ul,
    "dest_lapic_lintin" / Int8ul,
)


def _checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def build_mptable(base_addr: int, nr_cpus: int, ioapic_id: int, ioapic_addr: int = 0xFEC00000,
                  lapic_addr: int = 0xFEE00000, irq0_pin: int = 2,
                  pci_intx: list[tuple[int, int, int]] | None = None) -> bytes:
    """The MP floating pointer at ``base_addr`` followed by the configuration table.

    ``ioapic_addr``/``lapic_addr`` default to the PC addresses (arch/x86/include/asm/apicdef.h:
    IO_APIC_DEFAULT_PHYS_BASE, APIC_DEFAULT_PHYS_BASE). ``ioapic_id`` must not be a CPU's APIC id
    (0..nr_cpus-1). ``pci_intx``: with a PCI bus 0, its wired interrupt pins as (device, pin
    1-4 for INTA#-INTD#, IOAPIC input); each gets an I/O interrupt entry (4.3.4: the source bus
    IRQ of a PCI device is ``device << 2 | pin - 1``, MP spec Appendix D.3). Without them, a
    guest without ACPI finds no IRQ for a PCI device ("can't find IRQ for PCI INT A").
    """
    if not 1 <= nr_cpus <= MAX_CPUS:
        raise KvmpyError(f"{nr_cpus} vCPUs cannot be described in an MP table: use 1 to "
                         f"{MAX_CPUS}")
    if not nr_cpus <= ioapic_id <= 0xFE:
        raise ValueError(f"I/O APIC id {ioapic_id} collides with a CPU's APIC id (0..{nr_cpus - 1})"
                         " or is out of range")
    if base_addr % 16:
        raise ValueError(f"the MP floating pointer must be 16-byte aligned, not {base_addr:#x}")

    entries = [ProcessorEntry.build(dict(
        lapic_id=cpu,
        cpu_flags=CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)))
        for cpu in range(nr_cpus)]
    isa = BUS_ID_PCI + 1 if pci_intx is not None else 0
    if pci_intx is not None:
        entries.append(BusEntry.build(dict(bus_id=BUS_ID_PCI, bus_type=BUS_TYPE_PCI)))
    entries.append(BusEntry.build(dict(bus_id=isa, bus_type=BUS_TYPE_ISA)))
    entries.append(IoApicEntry.build(dict(ioapic_id=ioapic_id, address=ioapic_addr)))
    for irq in range(ISA_IRQS):
        pin = irq0_pin if irq == 0 else irq
        if irq == irq0_pin and irq != 0:
            continue                    # the pin belongs to IRQ 0 (on a PC: IRQ 2 is the cascade)
        entries.append(IoInterruptEntry.build(dict(
            interrupt_type=InterruptType.INT, source_bus_id=isa, source_bus_irq=irq,
            dest_ioapic_id=ioapic_id, dest_ioapic_intin=pin)))
    for device, pin, intin in pci_intx or ():
        if not (0 <= device < 32 and 1 <= pin <= 4 and ISA_IRQS <= intin < 0xFF):
            raise ValueError(f"PCI INTx route {(device, pin, intin)}: a device 0-31, a pin 1-4 "
                             f"and an IOAPIC input no ISA IRQ uses")
        entries.append(IoInterruptEntry.build(dict(
            interrupt_type=InterruptType.INT, source_bus_id=BUS_ID_PCI,
            source_bus_irq=device << 2 | (pin - 1), dest_ioapic_id=ioapic_id,
            dest_ioapic_intin=intin)))
    entries.append(LocalInterruptEntry.build(dict(
        interrupt_type=InterruptType.EXTINT, source_bus_id=isa, source_bus_irq=0,
        dest_lapic_id=BSP_APIC_ID, dest_lapic_lintin=0)))
    entries.append(LocalInterruptEntry.build(dict(
        interrupt_type=InterruptType.NMI, source_bus_id=isa, source_bus_irq=0,
        dest_lapic_id=ALL_LOCAL_APICS, dest_lapic_lintin=1)))

    body = b"".join(entries)
    header = dict(base_table_length=MpConfigHeader.sizeof() + len(body),
                  entry_count=len(entries), lapic_addr=lapic_addr)
    unsummed = MpConfigHeader.build(header) + body
    table = MpConfigHeader.build(dict(header, checksum=_checksum(unsummed))) + body

    mpf = dict(physptr=base_addr + MpFloatingPointer.sizeof())
    mpf["checksum"] = _checksum(MpFloatingPointer.build(mpf))
    return MpFloatingPointer.build(mpf) + table
