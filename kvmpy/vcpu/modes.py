"""Put a vCPU into real, 32-bit protected or 64-bit long mode before its first instruction.

What the firmware or boot loader would have done, done with KVM_SET_SREGS/KVM_SET_REGS: for
protected and long mode a flat GDT (and, in long mode, identity-mapped page tables) written into
guest RAM at fixed low addresses. These addresses follow Firecracker's x86_64 layout
(arch/src/x86_64/layout.rs, gdt.rs) and are reserved: an image may not be loaded over them.

    0x0500-0x052f  GDT: null, code32 (0x08), data (0x10), code64 (0x18), 64-bit TSS (0x20)
    0x0530         IDT base (limit 0: no handlers; an exception in such a guest triple-faults)
    0x0580-0x05e7  TSS (needed by VMX entry checks even though it is never used)
    0x9000         PML4, 0xA000 PDPT, 0xB000... one page directory per GiB mapped (2 MiB pages)

This module does not load images or pick entry points; the builder does.
"""
from __future__ import annotations

import enum

from kvmpy.errors import KvmpyError

GDT_ADDR = 0x500
IDT_ADDR = 0x530
TSS_ADDR = 0x580
TSS_LIMIT = 0x67          # 104-byte TSS (Intel SDM vol. 3A, 8.7 "Task management in 64-bit mode")
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000

SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
SEL_TSS = 0x20

# Segment descriptors (Intel SDM vol. 3A, 3.4.5): base 0, limit 0xfffff with G=1 (4 GiB).
#   0x00cf9b000000ffff: P=1 DPL=0 S=1 type=0xb (execute/read, accessed), D=1 G=1  -> code32
#   0x00cf93000000ffff: P=1 DPL=0 S=1 type=0x3 (read/write, accessed), B=1 G=1     -> data
#   0x00af9b000000ffff: as code32 but L=1 D=0                                       -> code64
GDT_CODE32 = 0x00CF9B000000FFFF
GDT_DATA = 0x00CF93000000FFFF
GDT_CODE64 = 0x00AF9B000000FFFF

# Control register bits (Intel SDM vol. 3A, 2.5; EFER: 2.2.1)
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads 1

# Page-table entry bits (Intel SDM vol. 3A, 4.5): present, writable, page size (2 MiB)
PTE_P, PTE_RW, PTE_PS, PTE_PWT, PTE_PCD = 1, 1 << 1, 1 << 7, 1 << 3, 1 << 4
GIB = 1 << 30
MMIO_HOLE_START = 0xC000_0000  # mapped uncached: the 32-bit device window below 4 GiB

REAL_MODE_STACK = 0x7C00      # below a boot sector, as BIOSes leave it
STACK_TOP = 0x8000            # protected/long mode: grows down towards the GDT page


class Mode(enum.Enum):
    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


def reserved_ranges(mode: Mode, ram_top: int) -> list[tuple[int, int, str]]:
    """Guest-physical ranges [start, end) this module writes for ``mode``."""
    if mode is Mode.REAL:
        return []
    ranges = [(GDT_ADDR, TSS_ADDR + TSS_LIMIT + 1, "GDT/IDT/TSS")]
    if mode is Mode.LONG:
        ranges.append((PML4_ADDR, PD_ADDR + pd_pages(ram_top) * 0x1000, "page tables"))
    return ranges


def pd_pages(ram_top: int) -> int:
    """Page directories needed to identity-map max(4 GiB, RAM) with 2 MiB pages."""
    top = max(4 * GIB, ram_top)
    return min(512, (top + GIB - 1) // GIB)


def _segment(seg, selector: int, code: bool, long: bool = False, db: bool = True) -> None:
    seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
    seg.type = 0xB if code else 0x3
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l = 1 if long else 0
    seg.db = 0 if long else (1 if db else 0)


# The Linux boot protocol's selectors (Documentation/arch/x86/boot.rst, "32-bit boot protocol"
# and "64-bit boot protocol"): __BOOT_CS = 0x10 (flat code, 32- or 64-bit), __BOOT_DS = 0x18.
LINUX_BOOT_CS = 0x10
LINUX_BOOT_DS = 0x18


def _write_gdt(memory, linux: int = 0) -> None:
    """kvmpy's GDT (0x08 code32, 0x10 data, 0x18 code64), or with ``linux`` = 32 or 64 the
    Linux boot protocol's (0x10 code of that width, 0x18 data)."""
    entries = {0x00: 0, SEL_CODE32: GDT_CODE32, SEL_DATA: GDT_DATA, SEL_CODE64: GDT_CODE64}
    if linux:
        entries = {0x00: 0, 0x08: 0, LINUX_BOOT_CS: GDT_CODE64 if linux == 64 else GDT_CODE32,
                   LINUX_BOOT_DS: GDT_DATA}
    for sel, desc in entries.items():
        memory.write_u64(GDT_ADDR + sel, desc)
    # 64-bit available TSS descriptor, 16 bytes (SDM vol. 3A, 8.2.3): type 9, P=1
    base, limit = TSS_ADDR, TSS_LIMIT
    lo = ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x9 << 40) | (1 << 47)
          | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56))
    memory.write_u64(GDT_ADDR + SEL_TSS, lo)
    memory.write_u64(GDT_ADDR + SEL_TSS + 8, base >> 32)
    memory.fill(TSS_ADDR, TSS_LIMIT + 1)
    # I/O map base beyond the limit: no I/O permission bitmap (SDM vol. 1, 19.5.2)
    memory.write_u16(TSS_ADDR + 102, TSS_LIMIT + 1)


def _set_tables(sregs, idt_limit: int) -> None:
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, SEL_TSS + 16 - 1
    sregs.idt.base, sregs.idt.limit = IDT_ADDR, idt_limit
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = TSS_ADDR, TSS_LIMIT, SEL_TSS, 0xB  # busy TSS
    tr.present, tr.s, tr.dpl, tr.g, tr.db, tr.l, tr.unusable = 1, 0, 0, 0, 0, 0, 0
    ldt = sregs.ldt
    ldt.base, ldt.limit, ldt.selector, ldt.type, ldt.present, ldt.s = 0, 0xFFFF, 0, 0x2, 1, 0
    ldt.unusable = 1


def write_identity_map(memory, ram_top: int) -> None:
    """PML4 -> one PDPT -> ``pd_pages`` page directories of 2 MiB pages, identity-mapped."""
    n = pd_pages(ram_top)
    memory.fill(PML4_ADDR, 0x2000 + n * 0x1000)
    memory.write_u64(PML4_ADDR, PDPT_ADDR | PTE_P | PTE_RW)
    for i in range(n):
        pd = PD_ADDR + i * 0x1000
        memory.write_u64(PDPT_ADDR + i * 8, pd | PTE_P | PTE_RW)
        entries = bytearray(4096)
        for j in range(512):
            pa = i * GIB + j * (2 << 20)
            flags = PTE_P | PTE_RW | PTE_PS
            if MMIO_HOLE_START <= pa < 4 * GIB:
                flags |= PTE_PCD | PTE_PWT  # device memory: uncached
            entries[j * 8:j * 8 + 8] = (pa | flags).to_bytes(8, "little")
        memory.write(pd, entries)


def setup_real_mode(vcpu, entry: int) -> None:
    """CS:IP = 0:entry (for entries at or above 64 KiB, CS = entry's 64 KiB-aligned segment)."""
    if entry >= 1 << 20:
        raise KvmpyError(f"real-mode entry {entry:#x} is above 1 MiB; real mode reaches only the "
                         "first MiB")
    sregs = vcpu.get_sregs()
    cs_sel = (entry & ~0xFFFF) >> 4
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.selector, seg.base, seg.limit = 0, 0, 0xFFFF
    sregs.cs.selector, sregs.cs.base = cs_sel, cs_sel << 4
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = entry & 0xFFFF, RFLAGS_RESERVED, REAL_MODE_STACK
    vcpu.set_regs(regs)


def setup_protected_mode(vcpu, memory, entry: int, linux: bool = False) -> None:
    """Flat 32-bit protected mode, no paging, interrupts off: CS=0x08, data segments 0x10
    (``linux``: CS=0x10, DS=0x18, as the 32-bit boot protocol, PVH and multiboot loaders do)."""
    _write_gdt(memory, 32 if linux else 0)
    sregs = vcpu.get_sregs()
    _segment(sregs.cs, LINUX_BOOT_CS if linux else SEL_CODE32, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, LINUX_BOOT_DS if linux else SEL_DATA, code=False)
    _set_tables(sregs, idt_limit=0)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    _set_entry(vcpu, entry)


def setup_long_mode(vcpu, memory, entry: int, linux: bool = False) -> None:
    """64-bit mode: RAM (at least the first 4 GiB) identity-mapped, CS=0x18 (L=1), interrupts off.

    ``linux``: the 64-bit boot protocol's state instead (boot.rst): CS=__BOOT_CS (0x10),
    DS/ES/SS=__BOOT_DS (0x18), only the first 4 GiB mapped (the protocol needs the kernel, zero
    page and command line mapped; more would grow the tables into the boot data)."""
    _write_gdt(memory, 64 if linux else 0)
    write_identity_map(memory, 0 if linux else memory.top)
    sregs = vcpu.get_sregs()
    _segment(sregs.cs, LINUX_BOOT_CS if linux else SEL_CODE64, code=True, long=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, LINUX_BOOT_DS if linux else SEL_DATA, code=False)
    _set_tables(sregs, idt_limit=0)
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    _set_entry(vcpu, entry)


def _set_entry(vcpu, entry: int) -> None:
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = entry, RFLAGS_RESERVED, STACK_TOP
    vcpu.set_regs(regs)


def setup_mode(vcpu, memory, mode: Mode, entry: int) -> None:
    if mode is Mode.REAL:
        setup_real_mode(vcpu, entry)
    elif mode is Mode.PROTECTED:
        setup_protected_mode(vcpu, memory, entry)
    else:
        setup_long_mode(vcpu, memory, entry)
