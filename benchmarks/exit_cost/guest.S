/*
 * Exit-cost guest: real mode, loaded and entered at 0000:7c00 (CS=0, IP=0x7c00, IF=0).
 *
 * Assembled by bench_exit_cost.py with kvmpy.asm.assemble (as --64 + ld --oformat=binary), with
 * two symbols defined in front of this file:
 *   ITERS  loop iterations (32-bit, in ECX)
 *   OUTS   `out %al, $0xe0` instructions per iteration (0 = the bare loop, for subtraction)
 * so the guest makes ITERS * OUTS exits to port 0xe0. The same bytes are run by baseline.c (C)
 * and by kvmpy's Machine.
 *
 *   port 0xe1  mark: the host starts its clock at this exit (after vCPU setup, before the loop)
 *   port 0xe0  the measured exit; the value written is 0 and ignored
 *   port 0xf4  end: QEMU-style isa-debug-exit, value 0 (kvmpy: status 1); the host stops its clock
 */
        .code16
        .text
start:
        cli
        xor     %ax, %ax
        out     %al, $0xe1              /* mark */
        mov     $ITERS, %ecx
1:
        .rept   OUTS
        out     %al, $0xe0              /* the measured exit */
        .endr
        dec     %ecx
        jnz     1b
        out     %al, $0xf4              /* end (isa-debug-exit, value 0) */
        hlt                             /* not reached; HLT with IF=0 would end the VM too */
