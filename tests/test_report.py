"""Stop reports: CPU mode naming, the page walk that finds the instruction bytes, the hint."""
from kvmpy._ffi import ffi
from kvmpy.memory import GuestMemory
from kvmpy.vcpu import modes
from kvmpy.vcpu.report import cpu_mode, guess_instruction, translate


def sregs(cr0=0, efer=0, l=0, db=0, cr4=0, cr3=0):
    s = ffi.new("struct kvm_sregs *")
    s.cr0, s.efer, s.cs.l, s.cs.db, s.cr4, s.cr3 = cr0, efer, l, db, cr4, cr3
    return s


def test_modes():
    assert cpu_mode(sregs()) == "real mode (16-bit)"
    assert cpu_mode(sregs(cr0=1, db=1)) == "protected mode (32-bit)"
    assert cpu_mode(sregs(cr0=1, db=0)) == "protected mode (16-bit)"
    assert cpu_mode(sregs(cr0=0x80000001, efer=0x500, l=1)) == "long mode (64-bit)"
    assert cpu_mode(sregs(cr0=0x80000001, efer=0x500, db=1)).startswith("compatibility")


def test_translate_walks_kvmpy_identity_map():
    with GuestMemory([(0, 64 << 20)]) as mem:
        modes.write_identity_map(mem, mem.top)
        s = sregs(cr0=0x80000001, efer=0x500, cr4=0x20, cr3=modes.PML4_ADDR)
        assert translate(mem, s, 0x123456) == 0x123456
        assert translate(mem, s, 0xFEDC_BA98) == 0xFEDC_BA98
        assert translate(mem, s, 5 << 30) is None   # beyond the 4 GiB that are mapped
        # a non-identity mapping: point the 2 MiB page at 0 to physical 0x400000
        mem.write_u64(modes.PD_ADDR, 0x400000 | 0x83)
        assert translate(mem, s, 0x1234) == 0x401234


def test_guess_instruction():
    assert guess_instruction(bytes.fromhex("cc90")) == "int3"
    assert guess_instruction(bytes.fromhex("cd80")) == "int n"
    assert guess_instruction(bytes.fromhex("480fc70e")) == "cmpxchg8b/16b"
    assert guess_instruction(bytes.fromhex("90")) is None
