"""Legacy PC devices, one per module. Each decodes a window of ports relative to a base the builder
chooses; the usual PC placement (IBM PC/AT Technical Reference I/O map) is:

    0x0060-0x0064  i8042.I8042        keyboard controller: 0x60 data, 0x64 status/command (IRQ 1)
                                      (0x61-0x63 fall inside its window and read as unassigned)
    0x0070-0x0071  cmos.CmosRtc       MC146818 RTC + CMOS RAM: 0x70 index (bit 7: NMI off),
                                      0x71 data
    0x0080         post.PostPort      POST code port; Linux's I/O-delay port
    0x00f4-0x00f7  debug_exit.DebugExit  QEMU isa-debug-exit (iobase=0xf4, iosize=4)
    0x03f8-0x03ff  uart.Uart16550     COM1 (IRQ 4); COM2 would be 0x2f8 (IRQ 3)

Nothing here knows its absolute port or its GSI: the builder inserts devices on the PIO bus and
wires each ``irq`` callable to a line.
"""
