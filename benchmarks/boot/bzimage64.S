/*
 * The boot benchmark's bzImage code: the protected-mode part of a synthetic bzImage built by
 * tests/synthetic.py (zeropage_kernel: a real setup header, assembled after lib16.inc for the
 * load address 0x100000). kvmpy enters it at startup_64 = load address + 0x200 in 64-bit mode
 * with %rsi = the zero page (Documentation/arch/x86/boot.rst, "64-bit boot protocol"). It
 * prints one line on COM1:
 *
 *     boot-bench bzimage hdr:53726448
 *
 * (boot_params.hdr.header at zero page offset 0x202, "HdrS": the setup header the loader copied
 * into the zero page) and ends through isa-debug-exit (port 0xf4) with value 0: status 1.
 * QEMU cannot boot this image: it has no real-mode setup code.
 */
        .code64
        hlt                             /* the 32-bit entry, unused by a 64-bit boot */
        .org 0x200
startup_64:
        mov %rsi, %r15
        PUTS "boot-bench bzimage hdr:"
        mov 0x202(%r15), %edi           /* hdr.header */
        PUTHEX32_EDI
        NEWLINE
        EXIT 0
