/* Lesson 1: the smallest useful guest. Run it with
 *
 *     kvmpy run examples/01-real-mode-hello/hello.S --mode real --stats
 *
 * kvmpy assembles this file for address 0x7c00, copies it into guest RAM there and starts one
 * vCPU in real mode with CS=0, IP=0x7c00 -- where a BIOS would start a boot sector.
 *
 * The guest runs natively (on VT-x/AMD-V) until it does something the CPU is configured to
 * trap. Here that is every `in` and `out`: the CPU leaves the guest (a "VM exit"), KVM sees an
 * I/O instruction it does not emulate itself, and KVM_RUN returns to kvmpy with
 * exit_reason = KVM_EXIT_IO and the port, size, direction and data in the shared kvm_run page.
 * kvmpy hands the access to the device that owns the port -- here the 16550 UART at 0x3f8 --
 * and calls KVM_RUN again.
 */
        .code16
        .set COM1, 0x3f8        /* THR: transmit holding register (write) */
        .set COM1_LSR, 0x3fd    /* LSR: line status register (read) */

        mov $message, %si
next:   lodsb                   /* al = next byte of the message */
        test %al, %al
        jz done
        mov %al, %bl
        mov $COM1_LSR, %dx
wait:   in %dx, %al             /* VM exit: KVM_EXIT_IO, port 0x3fd, size 1, in */
        test $0x20, %al         /* LSR bit 5 (THRE): the UART can take a byte */
        jz wait
        mov $COM1, %dx
        mov %bl, %al
        out %al, %dx            /* VM exit: KVM_EXIT_IO, port 0x3f8, size 1, out: printed */
        jmp next

done:   cli                     /* no interrupts can wake us ... */
        hlt                     /* VM exit: KVM_EXIT_HLT; kvmpy ends the VM with status 0 */

message:
        .asciz "Hello from real mode! Each character cost two VM exits.\n"
