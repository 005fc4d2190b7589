/* Real mode with the in-kernel irqchip (`--irqchip`): Linux's AUX IRQ test (drivers/input/serio/
 * i8042.c, i8042_check_aux) by hand. The command byte enables the AUX port and its interrupt,
 * then controller command 0xD3 (write the AUX output buffer, "loopback") puts 0xa5 in the output
 * buffer as if the mouse had sent it, which raises IRQ 12 (slave 8259 input 4, vector 0x74).
 * The handler reads the byte and prints it. Without IRQ 12 wired, the guest waits in `hlt` until
 * the test's timeout (Linux waits 250 ms, then gives up the AUX port).
 */
        .code16
        cli
        xor %ax, %ax
        mov %ax, %ds
        movw $irq12, 0x74 * 4
        movw $0, 0x74 * 4 + 2
        /* both 8259As: ICW1 (edge, cascade, ICW4), ICW2 vector base 0x08 / 0x70, ICW3, ICW4 */
        mov $0x11, %al
        out %al, $0x20
        out %al, $0xa0
        mov $0x08, %al
        out %al, $0x21
        mov $0x70, %al
        out %al, $0xa1
        mov $0x04, %al               /* master: a slave on input 2 */
        out %al, $0x21
        mov $0x02, %al               /* slave: its cascade identity */
        out %al, $0xa1
        mov $0x01, %al
        out %al, $0x21
        out %al, $0xa1
        mov $0xfb, %al               /* master: only the cascade (IRQ 2) */
        out %al, $0x21
        mov $0xef, %al               /* slave: only IRQ 12 */
        out %al, $0xa1
        mov $0x60, %al               /* write the command byte: */
        out %al, $0x64
        mov $0x46, %al               /* XLATE | SYSFLAG | AUXINT; AUX and keyboard enabled */
        out %al, $0x60
        mov $0xa8, %al               /* enable the AUX port */
        out %al, $0x64
        sti
        mov $0xd3, %al               /* write 0xa5 to the AUX output buffer */
        out %al, $0x64
        mov $0xa5, %al
        out %al, $0x60
1:      hlt
        jmp 1b

irq12:  in $0x60, %al
        mov %al, %ah
        PUTS "aux irq:"
        mov %ah, %al
        PUTHEX_AL
        NEWLINE
        EXIT 0x10
