/* Lesson 5, the guest half (long mode, loaded at 0x100000): drives the "counter" MMIO device
 * that counter.py places at 0xd0100000. Every load or store there is an EPT violation on a
 * guest-physical address with no memory behind it; KVM decodes the instruction and returns
 * KVM_EXIT_MMIO with the address, size and data; kvmpy hands the offset to the device. */
        .code64
        .set DEV, 0xd0100000
        mov $DEV, %ebx
        movl $5, 0x0(%rbx)              /* offset 0: STEP = 5 (a 4-byte MMIO write) */
        mov $3, %ecx
1:      movl $1, 0x4(%rbx)              /* offset 4: TICK (any value): count += STEP */
        loop 1b
        mov 0x8(%rbx), %eax             /* offset 8: COUNT (a 4-byte MMIO read) -> 15 */
        out %al, $0xf4                  /* isa-debug-exit: status (15 << 1) | 1 = 31 */
