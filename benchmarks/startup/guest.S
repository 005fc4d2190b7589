/*
 * Startup guest for `kvmpy run guest.bin --mode real` (loaded and entered at 0000:7c00): its
 * first instruction writes AL to QEMU's isa-debug-exit port 0xf4, which ends the VM.
 * AL is 0 at reset, so the VMM exits with status (0 << 1) | 1 = 1. Assembled with VALUE defined
 * (bench_startup.py's check), it first loads AL = VALUE: status (VALUE << 1) | 1.
 */
        .code16
        .text
start:
.ifdef VALUE
        mov     $VALUE, %al
.endif
        out     %al, $0xf4
        hlt                             /* not reached */
