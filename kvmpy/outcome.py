"""How a VM ended, and the process status ``kvmpy run`` returns for it.

A device or exit handler that ends the VM raises :class:`VmStop` with an :class:`Outcome`; the
vCPU run loop catches it and hands the outcome to the machine. Status numbers chosen by kvmpy are
even, so they never collide with isa-debug-exit's ``(value << 1) | 1``, which is always odd
(QEMU hw/misc/debugexit.c).
"""
from __future__ import annotations

import enum
import collections


class ExitStatus(enum.IntEnum):
    """Process exit status of ``kvmpy run`` / ``kvmpy demo`` (besides debug-exit's odd values)."""

    OK = 0                  #: guest halted with interrupts off, or reset through the i8042
    ERROR = 2               #: kvmpy could not start the VM (bad argument, image, /dev/kvm)
    TRIPLE_FAULT = 4        #: KVM_EXIT_SHUTDOWN: the guest triple-faulted
    EMULATION_FAILURE = 6   #: KVM_EXIT_INTERNAL_ERROR: KVM could not run an instruction
    FAIL_ENTRY = 8          #: KVM_EXIT_FAIL_ENTRY or another exit kvmpy cannot continue from
    VMM_ERROR = 10          #: an error inside kvmpy while the guest ran (a bug: please report)
    GUEST_PANIC = 12        #: the guest kernel reported a panic through pvpanic
    TIMEOUT = 124           #: --timeout elapsed (as timeout(1))
    INTERRUPTED = 130       #: stopped by SIGINT / Ctrl-C (128 + SIGINT)


class StopReason(enum.Enum):
    DEBUG_EXIT = "debug-exit"
    RESET = "reset"
    HALT = "halt"
    TRIPLE_FAULT = "triple-fault"
    EMULATION_FAILURE = "emulation-failure"
    FAIL_ENTRY = "fail-entry"
    SYSTEM_EVENT = "system-event"
    TIMEOUT = "timeout"
    STOPPED = "stopped"
    INTERRUPTED = "interrupted"
    VMM_ERROR = "vmm-error"
    GUEST_PANIC = "guest-panic"


class Outcome(collections.namedtuple("Outcome", "reason status detail report",
                                     defaults=("", None))):
    """The end of a VM: ``reason`` (StopReason), ``status`` (the process status that stands for
    it), a readable ``detail`` and an optional multi-line ``report`` (emulation failures).
    (A namedtuple rather than a dataclass: dataclasses cost ~5 ms of startup.)"""

    __slots__ = ()

    @classmethod
    def debug_exit(cls, value: int) -> "Outcome":
        # QEMU isa-debug-exit: the process exits with (value << 1) | 1.
        return cls(StopReason.DEBUG_EXIT, ((value << 1) | 1) & 0xFF,
                   f"guest wrote {value:#x} to isa-debug-exit")


class VmStop(Exception):
    """Raised by a device or exit handler to end the VM with ``outcome``."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.detail)
        self.outcome = outcome
