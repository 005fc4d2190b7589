"""ioctl numbers: kvmpy computes them with ioctl-opt from cffi struct sizes; the kernel header's
own macros (compiled into kvmpy._kvm) and a few well-known values must agree."""
from kvmpy import ioctls
from kvmpy._ffi import ffi, lib


def test_every_ioctl_matches_the_kernel_header():
    assert len(ioctls.ALL) >= 30
    for name, value in ioctls.ALL.items():
        assert value == getattr(lib, name), name


def test_known_values():
    # values as printed by C programs against <linux/kvm.h> on x86_64
    assert ioctls.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert ioctls.KVM_RUN == 0xAE80
    assert ioctls.KVM_GET_REGS == 0x8090AE81
    assert ioctls.KVM_SET_SREGS == 0x4138AE84
    assert ioctls.KVM_CREATE_VM == 0xAE01


def test_struct_layouts_come_from_the_header():
    assert ffi.sizeof("struct kvm_regs") == 18 * 8
    assert ffi.sizeof("struct kvm_userspace_memory_region") == 32
    assert ffi.offsetof("struct kvm_run", "exit_reason") == 8
    assert lib.KVMPY_RUN_UNION_OFFSET == 32
