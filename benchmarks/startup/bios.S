/*
 * Startup guest for QEMU: a 64 KiB BIOS image for `qemu-system-x86_64 -M microvm -bios bios.bin`.
 *
 * QEMU (hw/i386/x86.c, x86_bios_rom_init) maps the BIOS file so that it ends at 4 GiB, and its
 * last 128 KiB (here all 64 KiB) also below 1 MiB at 0xf0000-0xfffff; the size must be a
 * multiple of 64 KiB. The CPU starts at the reset vector, physical 0xfffffff0 (CS base
 * 0xffff0000, IP 0xfff0, real mode, EAX 0): the image's last 16 bytes. Their first instruction
 * is the same `out %al, $0xf4` as guest.S, to QEMU's isa-debug-exit (iobase=0xf4): status 1.
 * With VALUE defined, AL = VALUE first: status (VALUE << 1) | 1.
 * Linked at 0xf0000 (the code uses no absolute addresses).
 */
        .code16
        .text
        .org    0xfff0, 0xff
reset:
.ifdef VALUE
        mov     $VALUE, %al
.endif
        out     %al, $0xf4
        hlt                             /* not reached */
        .org    0x10000, 0xff
