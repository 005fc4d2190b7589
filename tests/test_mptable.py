"""The MP table read back with plain struct at Intel MP spec 1.4 offsets (4.1 floating pointer,
4.2 configuration table header, 4.3 entries), the way Linux's mpparse.c walks it."""
from __future__ import annotations

import struct

import pytest

from kvmpy.errors import KvmpyError
from kvmpy.mptable import build_mptable

BASE = 0x9FC00
ENTRY_SIZE = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}      # MP spec 4.3, Table 4-3


def parse(blob: bytes, base: int = BASE):
    sig, physptr, length, spec, checksum = struct.unpack_from("<4sIBBB", blob, 0)
    assert sig == b"_MP_" and length == 1 and spec == 4
    assert sum(blob[:16]) % 256 == 0
    off = physptr - base
    (sig, table_len, spec, _, oem, product, _, _, count,
     lapic) = struct.unpack_from("<4sHBB8s12sIHHI", blob, off)
    assert sig == b"PCMP" and spec == 4
    assert sum(blob[off:off + table_len]) % 256 == 0
    entries, pos = [], off + 44
    for _ in range(count):
        etype = blob[pos]
        entries.append(blob[pos:pos + ENTRY_SIZE[etype]])
        pos += ENTRY_SIZE[etype]
    assert pos == off + table_len
    return physptr, table_len, lapic, entries


def test_structure_and_checksums():
    blob = build_mptable(BASE, nr_cpus=4, ioapic_id=4)
    physptr, table_len, lapic, entries = parse(blob)
    assert physptr == BASE + 16                       # the table right after the pointer
    assert lapic == 0xFEE00000
    # 4 CPUs, 1 bus, 1 IOAPIC, 15 I/O interrupts (ISA 0-15 less the cascade), 2 local
    assert [e[0] for e in entries] == [0] * 4 + [1, 2] + [3] * 15 + [4] * 2
    assert table_len == 44 + 4 * 20 + 8 + 8 + 15 * 8 + 2 * 8
    assert len(blob) == 16 + table_len


def test_processor_entries():
    _, _, _, entries = parse(build_mptable(BASE, nr_cpus=3, ioapic_id=3))
    cpus = [struct.unpack_from("<BBBBII", e) for e in entries if e[0] == 0]
    # (type, APIC id, APIC version, flags: bit 0 EN, bit 1 BP, signature, features)
    assert [(c[1], c[3]) for c in cpus] == [(0, 0b11), (1, 0b01), (2, 0b01)]
    assert all(c[2] == 0x14 and c[5] & (1 << 9) for c in cpus)   # xAPIC, CPUID APIC bit


def test_bus_ioapic_and_interrupts():
    _, _, _, entries = parse(build_mptable(BASE, nr_cpus=2, ioapic_id=2, ioapic_addr=0xFEC01000))
    (bus,) = [e for e in entries if e[0] == 1]
    assert bus[1] == 0 and bus[2:8] == b"ISA   "
    (ioapic,) = [struct.unpack_from("<BBBBI", e) for e in entries if e[0] == 2]
    assert ioapic == (2, 2, 0x14, 1, 0xFEC01000)
    ints = [struct.unpack_from("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert all(i[1] == 0 and i[2] == 0 and i[3] == 0 and i[5] == 2 for i in ints)  # INT, ISA
    routing = {i[4]: i[6] for i in ints}               # source ISA IRQ -> IOAPIC INTIN
    assert routing == {0: 2, **{irq: irq for irq in range(1, 16) if irq != 2}}
    local = [struct.unpack_from("<BBHBBBB", e) for e in entries if e[0] == 4]
    # ExtINT (3) to the BSP's LINT0; NMI (1) to every LAPIC's (0xff) LINT1
    assert [(i[1], i[5], i[6]) for i in local] == [(3, 0, 0), (1, 0xFF, 1)]


def test_identity_irq0_for_kvm_default_routing():
    _, _, _, entries = parse(build_mptable(BASE, nr_cpus=1, ioapic_id=1, irq0_pin=0))
    routing = {e[5]: e[7] for e in entries if e[0] == 3}
    assert routing == {irq: irq for irq in range(16)}


def test_many_cpus():
    physptr, table_len, _, entries = parse(build_mptable(BASE, nr_cpus=254, ioapic_id=254))
    assert sum(1 for e in entries if e[0] == 0) == 254
    assert [e[1] for e in entries if e[0] == 0] == list(range(254))


def test_limits():
    with pytest.raises(KvmpyError, match="255 vCPUs"):
        build_mptable(BASE, nr_cpus=255, ioapic_id=255)
    with pytest.raises(KvmpyError):
        build_mptable(BASE, nr_cpus=0, ioapic_id=1)
    with pytest.raises(ValueError, match="collides"):
        build_mptable(BASE, nr_cpus=4, ioapic_id=2)
    with pytest.raises(ValueError, match="16-byte aligned"):
        build_mptable(BASE + 4, nr_cpus=1, ioapic_id=1)


def test_pci_bus_and_intx_entries():
    """With PCI: bus 0 is the PCI bus (Linux matches a PCI entry's source bus against the
    device's bus number), ISA moves to bus 1, and each wired INTx pin has an entry whose source
    IRQ is device << 2 | pin - 1 (MP spec D.3), flags 0: PCI's level, active low."""
    _, _, _, entries = parse(build_mptable(BASE, nr_cpus=2, ioapic_id=2,
                                           pci_intx=[(1, 1, 17), (3, 2, 20)]))
    buses = {e[1]: e[2:8] for e in entries if e[0] == 1}
    assert buses == {0: b"PCI   ", 1: b"ISA   "}
    ints = [struct.unpack_from("<BBHBBBB", e) for e in entries if e[0] == 3]
    pci = [(i[4], i[6]) for i in ints if i[3] == 0]
    assert pci == [(1 << 2 | 0, 17), (3 << 2 | 1, 20)]
    assert all(i[1] == 0 and i[2] == 0 and i[5] == 2 for i in ints)
    isa = {i[4]: i[6] for i in ints if i[3] == 1}
    assert isa == {0: 2, **{irq: irq for irq in range(1, 16) if irq != 2}}
    local = [struct.unpack_from("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [i[3] for i in local] == [1, 1]               # ExtINT and NMI name the ISA bus
    with pytest.raises(ValueError, match="INTx route"):
        build_mptable(BASE, nr_cpus=1, ioapic_id=1, pci_intx=[(1, 1, 5)])   # an ISA pin
    # a PCI bus with nothing wired still says bus 0 is PCI
    _, _, _, entries = parse(build_mptable(BASE, nr_cpus=1, ioapic_id=1, pci_intx=[]))
    assert {e[1]: e[2:8] for e in entries if e[0] == 1} == {0: b"PCI   ", 1: b"ISA   "}
