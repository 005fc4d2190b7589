/* A synthetic PVH kernel that panics the way Linux's pvpanic-pci driver reports it: find the
 * function 1b36:0011 on PCI bus 0 through configuration mechanism #1 (ports 0xcf8/0xcfc), read
 * BAR 0, print the events the device supports (byte 0 of the BAR), write the event given by the
 * kernel command line's first character ('1' PANICKED, '2' CRASH_LOADED) and, if the VM still
 * runs, say so and exit through isa-debug-exit with 0x11. Prints "no pvpanic" and exits with
 * 0x12 when no such function exists. */
        PVH_ENTRY
        mov 24(%ebx), %esi              /* hvm_start_info.cmdline_paddr */
        movzbl (%esi), %ebp
        sub $'0', %ebp                  /* the event to write */
        xor %ecx, %ecx                  /* device number 0..31 */
1:      mov %ecx, %eax
        shl $11, %eax
        or $0x80000000, %eax            /* enable, bus 0, device ecx, function 0, register 0 */
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        cmp $0x00111b36, %eax           /* device 0x0011 << 16 | vendor 0x1b36 */
        je 2f
        inc %ecx
        cmp $32, %ecx
        jb 1b
        PUTS "no pvpanic"
        NEWLINE
        EXIT 0x12
2:      mov %ecx, %eax
        shl $11, %eax
        or $0x80000010, %eax            /* register 0x10: BAR 0 */
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        and $0xfffffff0, %eax           /* memory BAR: the low 4 bits are flags */
        mov %eax, %edi                  /* kept in %edi: the print macros leave it alone */
        PUTS "bar:"
        PUTHEX32_EDI
        PUTS " events:"
        movzbl (%edi), %eax
        PUTHEX_AL
        NEWLINE
        mov %ebp, %eax
        movb %al, (%edi)                /* the event */
        PUTS "still running"
        NEWLINE
        EXIT 0x11
