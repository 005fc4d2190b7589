/* Real mode with the in-kernel irqchip (`--irqchip`): program the PIC, hook IRQ 4 (COM1) in the
 * IVT, enable the UART's received-data interrupt and OUT2, then wait in `hlt` with interrupts on.
 * Each byte the host sends raises IRQ 4; the handler echoes it as "rx:<byte>"; on 'q' it exits.
 */
        .code16
        .set PIC1_CMD, 0x20
        .set PIC1_DATA, 0x21
        cli
        xor %ax, %ax
        mov %ax, %ds
        movw $irq4, 0x0c * 4         /* IVT entry for vector 0x0c = PIC base 8 + IRQ 4 */
        movw $0, 0x0c * 4 + 2
        /* 8259A init: ICW1 (edge, cascade, ICW4), ICW2 vector base 8, ICW3, ICW4 8086 mode */
        mov $0x11, %al
        out %al, $PIC1_CMD
        mov $0x08, %al
        out %al, $PIC1_DATA
        mov $0x04, %al
        out %al, $PIC1_DATA
        mov $0x01, %al
        out %al, $PIC1_DATA
        mov $0xef, %al               /* OCW1: unmask IRQ 4 only */
        out %al, $PIC1_DATA
        mov $0x3fc, %dx              /* MCR: DTR | RTS | OUT2 (OUT2 gates the IRQ on a PC) */
        mov $0x0b, %al
        out %al, %dx
        mov $0x3f9, %dx              /* IER: received data available */
        mov $0x01, %al
        out %al, %dx
        PUTS "waiting\n"
        sti
1:      hlt
        jmp 1b

irq4:   mov $0x3f8, %dx
        in %dx, %al                  /* RBR: the byte; reading it clears the interrupt */
        mov %al, %ah
        cmp $'q', %al
        je quit
        PUTS "rx:"
        mov %ah, %al
        PUTC_AL
        NEWLINE
        mov $0x20, %al               /* OCW2: non-specific EOI */
        out %al, $PIC1_CMD
        iret
quit:   EXIT 0x10
