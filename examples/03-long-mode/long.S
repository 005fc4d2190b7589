/* Lesson 3: a guest that starts in 64-bit long mode. Run it with
 *
 *     kvmpy run examples/03-long-mode/long.S --mode long --trace - --stats
 *
 * Long mode needs what a boot loader would have built; with --mode long, kvmpy builds it
 * before the first instruction (kvmpy/vcpu/modes.py): a GDT with a 64-bit code segment
 * (selector 0x18, L=1), page tables that identity-map the first 4 GiB, and CR0.PE|PG,
 * CR4.PAE, EFER.LME|LMA set through KVM_SET_SREGS. The image is loaded at 0x100000 (1 MiB).
 *
 * --trace - prints one JSON line per exit with the guest's RIP, so you can match each line to
 * an instruction below. The MMIO access shows a different exit: guest-physical 0xd0000000 is
 * not RAM, so the load traps as KVM_EXIT_MMIO; nobody owns that address, so it reads all-ones.
 */
        .code64
        .set COM1, 0x3f8

        mov $'6', %al
        mov $COM1, %dx
        out %al, %dx                    /* KVM_EXIT_IO (we skip the LSR poll: kvmpy's UART is
                                           always ready) */
        mov $'4', %al
        out %al, %dx
        mov $'\n', %al
        out %al, %dx

        mov $0xd0000000, %rbx
        mov (%rbx), %eax                /* KVM_EXIT_MMIO, read of 4 bytes -> 0xffffffff */
        cmp $0xffffffff, %eax
        jne fail

        movabs $0x4000000000, %rax      /* a value only a 64-bit register holds */
        shr $38, %rax                   /* 1 */
        out %al, $0xf4                  /* isa-debug-exit: status (1 << 1) | 1 = 3 */
fail:   mov $0x7f, %al
        out %al, $0xf4                  /* status 0xff: the MMIO read was not all-ones */
