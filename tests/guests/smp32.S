/* A synthetic PVH kernel that brings up its second CPU the way Linux does without ACPI:
 * - find the MP floating pointer ("_MP_") in the last KiB of base memory and print how many
 *   enabled processor entries the configuration table lists and which APIC id is the BSP;
 * - print its own APIC id (LAPIC ID register at 0xfee00020, bits 31:24);
 * - copy a real-mode trampoline to 0x10000 and send INIT, then a STARTUP IPI with vector 0x10
 *   to APIC id 1 through the LAPIC's ICR (Intel SDM vol. 3A, 10.6.1 and 8.4.4.1);
 * - wait for the AP to write its initial APIC id (CPUID leaf 1, EBX bits 31:24) and a marker to
 *   0x10ff0, print them, and exit through isa-debug-exit with 0x10 (status 0x21).
 * Prints "ap:timeout" and exits with 0x11 if the AP never runs. */
        .set LAPIC_ID, 0xfee00020
        .set ICR_LOW, 0xfee00300
        .set ICR_HIGH, 0xfee00310
        .set TRAMPOLINE, 0x10000        /* STARTUP vector 0x10: the AP starts at 0x1000:0000 */
        .set AP_MAILBOX, 0x10ff0        /* the AP writes [0x10ff0] = 0xa9 marker, [0x10ff1] = id */

        PVH_ENTRY
        /* MP spec 4: the floating pointer is on a 16-byte boundary in the last KiB of base
         * memory (0x9fc00-0x9ffff for 639 KiB of it) */
        mov $0x9fc00, %esi
1:      cmpl $0x5f504d5f, (%esi)        /* "_MP_" */
        je 2f
        add $16, %esi
        cmp $0xa0000, %esi
        jb 1b
        PUTS "mp:none"
        NEWLINE
        EXIT 0x12
2:      mov 4(%esi), %esi               /* physical address of the configuration table */
        movzwl 0x22(%esi), %ecx         /* entry count */
        lea 0x2c(%esi), %esi            /* the first entry, after the 44-byte header */
        xor %edi, %edi                  /* enabled processors */
        mov $0xff, %ebp                 /* the BSP's APIC id */
3:      test %ecx, %ecx
        jz 6f
        cmpb $0, (%esi)                 /* type 0: processor, 20 bytes; the others 8 */
        jne 5f
        testb $1, 3(%esi)               /* CPU flags: EN */
        jz 4f
        inc %edi
4:      testb $2, 3(%esi)               /* CPU flags: BP */
        jz 41f
        movzbl 1(%esi), %ebp            /* its local APIC id */
41:     add $20, %esi
        dec %ecx
        jmp 3b
5:      add $8, %esi
        dec %ecx
        jmp 3b
6:      PUTS "mp cpus:"
        PUTHEX32_EDI
        PUTS " bsp:"
        mov %ebp, %edi
        PUTHEX32_EDI
        NEWLINE

        PUTS "bsp apic:"
        mov LAPIC_ID, %edi
        shr $24, %edi
        PUTHEX32_EDI
        NEWLINE

        /* the trampoline goes below 1 MiB, where a real-mode AP can run it */
        mov $ap_start, %esi
        mov $TRAMPOLINE, %edi
        mov $(ap_end - ap_start), %ecx
        rep movsb
        movl $0, AP_MAILBOX

        movl $(1 << 24), ICR_HIGH       /* destination: APIC id 1 */
        movl $0x00004500, ICR_LOW       /* INIT, level assert, physical destination */
        movl $(1 << 24), ICR_HIGH
        movl $0x00004610, ICR_LOW       /* STARTUP, vector 0x10 */

        mov $0x100000, %ecx             /* bounded wait: ~3M instructions, ~1-3 s under PVM */
7:      cmpb $0xa9, AP_MAILBOX
        je 8f
        pause
        loop 7b
        PUTS "ap:timeout"
        NEWLINE
        EXIT 0x11
8:      PUTS "ap apic:"
        movzbl AP_MAILBOX + 1, %edi
        PUTHEX32_EDI
        NEWLINE
        EXIT 0x10

        /* Copied to TRAMPOLINE; runs in real mode with CS = 0x1000, IP = 0. */
        .code16
ap_start:
        mov $1, %eax
        cpuid                           /* EBX bits 31:24: this CPU's initial APIC id */
        shr $24, %ebx
        mov %cs, %ax
        mov %ax, %ds
        mov %bl, (AP_MAILBOX - TRAMPOLINE + 1)
        movb $0xa9, (AP_MAILBOX - TRAMPOLINE)
        cli
9:      hlt
        jmp 9b
ap_end:
