"""The ioctl layer on the real /dev/kvm: each method does what its ioctl does."""
import os
import select

import pytest

from kvmpy._ffi import lib
from kvmpy.errors import KvmError
from kvmpy.kvm import Cap, Kvm
from kvmpy.memory import GuestMemory
from kvmpy.vcpu.modes import setup_real_mode
from kvmpy.vm import IrqchipRoute, MsiRoute


@pytest.fixture
def vm():
    with Kvm() as kvm, kvm.create_vm() as vm, GuestMemory([(0, 1 << 20)]) as mem:
        mem.register(vm)
        vm.memory = mem
        yield vm


def test_system_ioctls():
    with Kvm() as kvm:
        assert kvm.get_api_version() == 12
        assert kvm.check_extension(Cap.USER_MEMORY) == 1
        assert kvm.get_vcpu_mmap_size() >= 4096
        cpuid = kvm.get_supported_cpuid()
        leaves = {cpuid.entries[i].function for i in range(cpuid.nent)}
        assert 0 in leaves and 1 in leaves


def test_errors_name_the_ioctl(vm):
    with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION failed: EINVAL"):
        vm.set_user_memory_region(0, 0x1001, 4096, vm.memory.host_address(0))  # misaligned


def test_vcpu_register_roundtrip(vm):
    with vm.create_vcpu(0) as v:
        regs = v.get_regs()
        regs.rax, regs.rip = 0x1234, 0x7C00
        v.set_regs(regs)
        assert (v.get_regs().rax, v.get_regs().rip) == (0x1234, 0x7C00)
        s = v.get_sregs()
        s.cr2 = 0xDEAD000
        v.set_sregs(s)
        assert v.get_sregs().cr2 == 0xDEAD000
        v.set_msrs({0x174: 0x10})            # IA32_SYSENTER_CS
        assert v.get_msrs([0x174]) == {0x174: 0x10}
        ev = v.get_vcpu_events()
        v.set_vcpu_events(ev)
        v.get_fpu()


def test_irqchip_lapic_routing_irqfd(vm):
    vm.create_irqchip()
    vm.create_pit2()
    with vm.create_vcpu(0) as v:
        lapic = v.get_lapic()
        v.set_lapic(lapic)
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    vm.set_gsi_routing([IrqchipRoute(4, 2, 4), MsiRoute(24, 0xFEE00000, 0x41)])
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        vm.irqfd(efd, 24)
        vm.irqfd(efd, 24, deassign=True)
    finally:
        os.close(efd)
    assert vm.signal_msi(0xFEE00000, 0x41) >= 0


GUEST = bytes.fromhex("e6 e0" * 3 + "f4")  # out %al,$0xe0 (x3); hlt


def test_ioeventfd_pio_signals_without_exit(vm):
    vm.memory.write(0x7C00, GUEST)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(efd, 0xE0, 1, pio=True)
        with vm.create_vcpu(0) as v:
            setup_real_mode(v, 0x7C00)
            assert v.run()
            # the three OUTs went to the eventfd; the first exit to userspace is the HLT
            assert v.run_struct.exit_reason == lib.KVM_EXIT_HLT
        assert select.select([efd], [], [], 0)[0]
        assert os.eventfd_read(efd) == 3
        vm.ioeventfd(efd, 0xE0, 1, pio=True, deassign=True)
    finally:
        os.close(efd)


def test_guest_debug_single_step(vm):
    vm.memory.write(0x7C00, bytes.fromhex("90 90 f4"))  # nop; nop; hlt
    with vm.create_vcpu(0) as v:
        setup_real_mode(v, 0x7C00)
        v.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        assert v.run() and v.run_struct.exit_reason == lib.KVM_EXIT_DEBUG
        assert v.get_regs().rip == 0x7C01
        v.set_guest_debug(0)
        assert v.run() and v.run_struct.exit_reason == lib.KVM_EXIT_HLT
