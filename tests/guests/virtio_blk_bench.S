/*
 * A guest that benchmarks the VMM's virtio-blk device from inside the VM: 4 KiB random reads
 * by a polling virtio-mmio (v2) driver, the same PVH ELF for kvmpy and for QEMU (-M microvm).
 * Assembled after tests/guests/lib16.inc with these symbols (as --defsym):
 *   QD      requests per batch (1..64): QD chains posted, one notify, wait for all of them
 *   NBATCH  batches per repetition        REPS  repetitions     NBLOCKS  disk size / 4096
 *   IRQ     0 (default): poll used.idx at CPL3; 1: sleep (hlt at CPL0) until the used-buffer
 *           interrupt, as Linux's virtio-blk does without poll queues
 *
 * Why this shape: on this workplace's software-KVM host (PVM) CPL0 code is emulated at ~1 M
 * instructions/s, but 64-bit CPL3 code runs natively (../shared/pvm-host.md). So the driver
 * sets the machine up at CPL0 (long mode, page tables with user access, GDT, TSS, IDT, the
 * device) and then runs its request loop at CPL3, at native speed, as a guest kernel's driver
 * would on hardware. CPL3 cannot do port I/O here (#GP even with IOPL=3), so it asks CPL0 for
 * output by executing ud2 with a command in %eax: the #UD handler prints and returns.
 *
 * Output on COM1 (the host timestamps each '\n'):
 *   "virtio-blk at B irq G\n"   the transport's address and interrupt (GSI) it found
 *   "t\n"                 before each repetition and after the last one
 *   "end err:E sector:S data:D sum:X\n"   E requests whose status byte was not 0
 *                         (VIRTIO_BLK_S_OK) or whose used length was not 4097, S the sector
 *                         and D the first 8 bytes read by the last batch's first request, X a
 *                         hash of every sector read (x = rol(x, 5) ^ its first 8 bytes as a
 *                         little-endian number, in request order; the host checks all three
 *                         against the file)
 *   "irqs:N\n"            (IRQ=1) used-buffer interrupts taken
 * then isa-debug-exit 0x10 (process status 0x21).
 * IRQ=0: completions are polled (used.idx), with VIRTQ_AVAIL_F_NO_INTERRUPT set and interrupts
 * off, as a Linux poll queue (io_uring IOPOLL). IRQ=1: after the notify the driver asks CPL0
 * to wait (ud2, %eax = 3), which sleeps (sti; hlt) until an interrupt, and again until used.idx
 * shows the batch: every batch waits for at least one interrupt, as in Linux; the interrupt
 * handler reads InterruptStatus, writes it to InterruptACK and EOIs the local APIC, as Linux's
 * vm_interrupt does. The IOAPIC routes the transport's GSI (kvmpy: slot k at 0xd0000000 +
 * k * 0x1000 has GSI 5 + k; QEMU microvm: transport i at 0xfeb00000 + i * 0x200 has GSI 5 + i,
 * or 24 + i, on a second IOAPIC at 0xfec10000, when it has 24 transports) to vector 0x30.
 * Either way the notify is skipped while the device sets VIRTQ_USED_F_NO_NOTIFY (virtio 1.2
 * 2.7.10), as Linux does without VIRTIO_F_EVENT_IDX.
 */
        .ifndef IRQ
        .set IRQ, 0
        .endif
        .section .note.Xen, "a"
        .balign 4
        .long 4, 4, 18                  /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long pvh_start

        .set QS, 256                    /* queue size (kvmpy's and QEMU's default maximum) */
        .set TSS, 0x170000
        .set PML4, 0x180000             /* PDPT at +0x1000, 4 page directories after it */
        .set KSTACK, 0x90000
        .set USTACK, 0x1f0000
        .set DESC, 0x200000             /* 16 * QS */
        .set AVAIL, 0x201000            /* flags, idx, ring[QS] */
        .set USED, 0x202000             /* flags, idx, ring[QS] of {id, len} */
        .set HDR, 0x204000              /* QD request headers, 16 bytes each */
        .set STATUS, 0x205000           /* QD status bytes */
        .set DATA, 0x400000             /* QD 4 KiB buffers */
        .set SEED, 0x9e3779b97f4a7c15
        .set VECTOR, 0x30               /* the used-buffer interrupt's IDT vector */
        .set LAPIC, 0xfee00000
        .set IOAPIC, 0xfec00000         /* GSIs 0-23; QEMU microvm's second one at +0x10000 */

        .text
        .code32
        .globl pvh_start
pvh_start:                              /* 32-bit protected mode, paging off (PVH) */
        cli
        mov $KSTACK, %esp
        /* identity map of the first 4 GiB in 2 MiB pages, user-accessible (P|RW|US) */
        movl $(PML4 + 0x1007), PML4
        movl $0, PML4 + 4
        xor %ecx, %ecx
1:      mov %ecx, %eax
        shl $12, %eax
        add $(PML4 + 0x2007), %eax
        movl %eax, PML4 + 0x1000(,%ecx,8)
        movl $0, PML4 + 0x1004(,%ecx,8)
        inc %ecx
        cmp $4, %ecx
        jb 1b
        xor %ecx, %ecx
2:      mov %ecx, %eax
        shl $21, %eax
        or $0x87, %eax                  /* P|RW|US|PS */
        movl %eax, PML4 + 0x2000(,%ecx,8)
        mov %ecx, %eax
        shr $11, %eax                   /* bits 32+ of (%ecx << 21) */
        movl %eax, PML4 + 0x2004(,%ecx,8)
        inc %ecx
        cmp $2048, %ecx
        jb 2b
        lgdtl gdtr
        mov %cr4, %eax
        or $0x20, %eax                  /* PAE */
        mov %eax, %cr4
        mov $PML4, %eax
        mov %eax, %cr3
        mov $0xc0000080, %ecx           /* EFER */
        rdmsr
        or $0x100, %eax                 /* LME */
        wrmsr
        mov %cr0, %eax
        or $0x80000000, %eax            /* PG */
        mov %eax, %cr0
        ljmp $0x18, $lm64

        .code64
lm64:   mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $KSTACK, %rsp
        /* TSS: RSP0 for exceptions from CPL3, no I/O bitmap */
        movq $KSTACK, TSS + 4
        movw $104, TSS + 102
        mov $0x30, %ax
        ltr %ax
        /* IDT: vectors 0-63, 64-bit interrupt gates; #UD (6) is the CPL3 "system call" */
        xor %ecx, %ecx
3:      lea stubs(,%rcx,8), %rax        /* each stub is 8 bytes */
        cmp $6, %ecx
        jne 4f
        lea ud_handler, %rax
4:      cmp $VECTOR, %ecx
        jne 4f
        lea irq_handler, %rax
4:      mov %ecx, %edx
        shl $4, %edx
        movw %ax, idt(%rdx)
        movw $0x18, idt + 2(%rdx)
        movw $0x8e00, idt + 4(%rdx)
        shr $16, %rax
        movw %ax, idt + 6(%rdx)
        movl $0, idt + 8(%rdx)
        movl $0, idt + 12(%rdx)
        inc %ecx
        cmp $64, %ecx
        jb 3b
        lidt idtr

        /* find the block device: kvmpy's virtio-mmio slots, else QEMU microvm's transports;
         * %r8d = its GSI (see the top) */
        mov $0xd0000000, %ebx
        mov $5, %r8d
5:      call probe
        je found
        add $0x1000, %ebx
        inc %r8d
        cmp $0xd0008000, %ebx
        jb 5b
        mov $0xfeb00000, %ebx
        mov $5, %r8d
5:      call probe
        je 6f
        add $0x200, %ebx
        inc %r8d
        cmp $0xfeb00000 + 24 * 0x200, %ebx
        jb 5b
        PUTS "virtio-blk not found\n"
        EXIT 1
6:      cmp $0xfeb00000 + 8 * 0x200, %ebx
        jb found
        add $(24 - 5), %r8d             /* beyond 8 transports: the second IOAPIC's GSIs */
found:  mov %rbx, %rbp
        mov %rbx, devbase
        PUTS "virtio-blk at "
        mov %ebp, %edi
        PUTHEX32_EDI
        PUTS " irq "
        mov %r8d, %edi
        PUTHEX32_EDI
        NEWLINE
        .if IRQ
        mov $0xff, %al                  /* mask the 8259s: only the IOAPIC delivers */
        out %al, $0x21
        out %al, $0xa1
        mov $LAPIC, %eax                /* (above 2 GiB: no absolute 32-bit address) */
        movl $0x1ff, 0xf0(%rax)         /* SVR: APIC software enable, spurious vector 0xff */
        mov $IOAPIC, %ebx
        cmp $24, %r8d
        jb 7f
        add $0x10000, %ebx
        sub $24, %r8d
7:      lea 0x10(%r8,%r8), %eax         /* IOREDTBL low dword of pin %r8d */
        movl %eax, (%rbx)               /* IOREGSEL */
        movl $VECTOR, 0x10(%rbx)        /* IOWIN: fixed, physical, edge, high, unmasked */
        inc %eax
        movl %eax, (%rbx)
        movl $0, 0x10(%rbx)             /* destination: APIC id 0 */
        .endif
        movl $0, 0x070(%rbp)            /* Status: reset (4.2.3.1.1) */
        movl $1, 0x070(%rbp)            /* ACKNOWLEDGE */
        movl $3, 0x070(%rbp)            /* | DRIVER */
        movl $1, 0x024(%rbp)            /* DriverFeaturesSel 1 */
        movl $1, 0x020(%rbp)            /* VIRTIO_F_VERSION_1 (feature bit 32) */
        movl $0, 0x024(%rbp)
        movl $0, 0x020(%rbp)            /* no other feature */
        movl $0xb, 0x070(%rbp)          /* | FEATURES_OK */
        testl $8, 0x070(%rbp)
        jz nodev
        movl $0, 0x030(%rbp)            /* QueueSel 0 */
        cmpl $QS, 0x034(%rbp)           /* QueueNumMax */
        jb nodev
        movl $QS, 0x038(%rbp)           /* QueueNum */
        VIRTIO_MMIO_QUEUE_ADDRS %rbp, DESC, AVAIL, USED
        movw $(1 - IRQ), AVAIL          /* VIRTQ_AVAIL_F_NO_INTERRUPT when completions are polled */
        movl $1, 0x044(%rbp)            /* QueueReady */
        movl $0xf, 0x070(%rbp)          /* | DRIVER_OK */
        lea 0x050(%rbp), %rax           /* QueueNotify */
        mov %rax, notify

        /* chain i: descriptors 3i (header, 16 B), 3i+1 (4 KiB, device-writable), 3i+2 (status) */
        xor %ecx, %ecx
6:      lea (%rcx,%rcx,2), %edx
        shl $4, %edx                    /* 3i * 16 */
        mov %ecx, %eax
        shl $4, %eax
        add $HDR, %eax
        movq %rax, DESC(%rdx)
        movl $16, DESC + 8(%rdx)
        movw $1, DESC + 12(%rdx)        /* VIRTQ_DESC_F_NEXT */
        lea (%rcx,%rcx,2), %eax
        inc %eax
        movw %ax, DESC + 14(%rdx)
        mov %ecx, %eax
        shl $12, %eax
        add $DATA, %eax
        movq %rax, DESC + 16(%rdx)
        movl $4096, DESC + 24(%rdx)
        movw $3, DESC + 28(%rdx)        /* NEXT | VIRTQ_DESC_F_WRITE */
        lea (%rcx,%rcx,2), %eax
        add $2, %eax
        movw %ax, DESC + 30(%rdx)
        lea STATUS(%rcx), %eax
        movq %rax, DESC + 32(%rdx)
        movl $1, DESC + 40(%rdx)
        movw $2, DESC + 44(%rdx)        /* WRITE */
        mov %ecx, %eax
        shl $4, %eax
        movl $0, HDR(%rax)              /* VIRTIO_BLK_T_IN */
        inc %ecx
        cmp $QD, %ecx
        jb 6b

        /* to CPL3: iretq with user selectors, interrupts off */
        pushq $0x23                     /* SS: user data | RPL 3 */
        pushq $USTACK
        pushq $0x2                      /* RFLAGS: IF = 0 */
        pushq $0x2b                     /* CS: user code64 | RPL 3 */
        lea user, %rax
        push %rax
        iretq

nodev:  PUTS "virtio-blk setup failed\n"
        EXIT 1

/* ZF set if %ebx is a virtio-mmio v2 block device (MagicValue "virt", Version 2, DeviceID 2) */
probe:  cmpl $0x74726976, 0x000(%rbx)
        jne 7f
        cmpl $2, 0x004(%rbx)
        jne 7f
        cmpl $2, 0x008(%rbx)
7:      ret

/* CPL3: the request loop. %r15 xorshift64 state, %r14w avail.idx, %r13d repetitions left,
 * %r12d batches left, %r11 QueueNotify's address, %r10 failed requests, %r9 the hash */
user:   mov $SEED, %r15
        xor %r14d, %r14d
        xor %r10d, %r10d
        xor %r9d, %r9d
        mov notify, %r11
        mov $REPS, %r13d
rep:    mov $1, %eax
        ud2                             /* "t\n" */
        mov $NBATCH, %r12d
batch:  xor %ecx, %ecx
fill:   mov %r15, %rax                  /* xorshift64 (13, 7, 17) */
        shl $13, %rax
        xor %rax, %r15
        mov %r15, %rax
        shr $7, %rax
        xor %rax, %r15
        mov %r15, %rax
        shl $17, %rax
        xor %rax, %r15
        mov %r15, %rax
        xor %edx, %edx
        mov $NBLOCKS, %rbx
        div %rbx                        /* %rdx = state % NBLOCKS */
        shl $3, %rdx                    /* 512-byte sector of that 4 KiB block */
        mov %ecx, %eax
        shl $4, %eax
        mov %rdx, HDR + 8(%rax)
        movb $0xff, STATUS(%rcx)
        lea (%r14,%rcx), %eax
        and $(QS - 1), %eax
        lea (%rcx,%rcx,2), %edx
        movw %dx, AVAIL + 4(,%rax,2)    /* avail.ring[idx % QS] = head 3i */
        inc %ecx
        cmp $QD, %ecx
        jb fill
        add $QD, %r14d
        movw %r14w, AVAIL + 2           /* avail.idx: one 16-bit store after the entries */
        mfence                          /* the index before reading used.flags (Linux: mb) */
        testw $1, USED                  /* VIRTQ_USED_F_NO_NOTIFY */
        jnz 8f
        movl $0, (%r11)                 /* QueueNotify: queue 0 */
        .if IRQ
8:      mov $3, %eax
        ud2                             /* sleep until used.idx is %r14w */
        .else
8:      cmpw %r14w, USED + 2            /* used.idx */
        je 9f
        pause
        jmp 8b
        .endif
9:      xor %ecx, %ecx
10:     cmpb $0, STATUS(%rcx)
        je 11f
        inc %r10
11:     mov %ecx, %eax                  /* the checksum: the first 8 bytes of every sector */
        shl $12, %eax
        lea DATA(%rax), %rsi
        mov $8, %edx
16:     rol $5, %r9                     /* (order matters: a rotate before each) */
        xor (%rsi), %r9
        add $512, %rsi
        dec %edx
        jnz 16b
        inc %ecx
        cmp $QD, %ecx
        jb 10b
        lea -QD(%r14), %eax             /* this batch's used elements: each wrote 4097 bytes */
        xor %ecx, %ecx
17:     lea (%rax,%rcx), %edx
        and $(QS - 1), %edx
        cmpl $4097, USED + 8(,%rdx,8)   /* used.ring[slot].len (4 KiB + the status byte) */
        je 18f
        inc %r10
18:     inc %ecx
        cmp $QD, %ecx
        jb 17b
        dec %r12d
        jnz batch
        dec %r13d
        jnz rep
        mov $1, %eax
        ud2                             /* the last "t\n" */
        mov $2, %eax
        ud2                             /* report and exit */

/* #UD from CPL3: %eax = 1 prints "t\n", 2 prints the report and exits, 3 waits for used.idx
 * to reach %r14w; others are faults */
ud_handler:
        testb $3, 8(%rsp)               /* CS of the frame: from CPL3? */
        jz fault6
        push %rax
        push %rbx
        push %rcx
        push %rdx
        push %rsi
        push %rdi
        cmp $1, %eax
        jne 12f
        PUTS "t\n"
        jmp 13f
12:     cmp $3, %eax
        jne 14f
15:     sti                             /* hlt runs before an interrupt can (sti's shadow) */
        hlt                             /* as Linux, wait for the interrupt before looking */
        cli
        cmpw %r14w, USED + 2
        jne 15b                         /* (a stale interrupt from the batch before) */
        jmp 13f
14:     cmp $2, %eax
        jne fault6
        .if IRQ
        PUTS "irqs:"
        mov irqs, %edi
        PUTHEX32_EDI
        NEWLINE
        .endif
        PUTS "end err:"
        mov %r10d, %edi
        PUTHEX32_EDI
        PUTS " sector:"
        mov HDR + 8, %edi
        PUTHEX32_EDI
        PUTS " data:"
        mov DATA, %edi                  /* the bytes in file order */
        bswap %edi
        PUTHEX32_EDI
        mov DATA + 4, %edi
        bswap %edi
        PUTHEX32_EDI
        PUTS " sum:"
        mov %r9, %rdi
        shr $32, %rdi
        PUTHEX32_EDI
        mov %r9d, %edi
        PUTHEX32_EDI
        NEWLINE
        EXIT 0x10
13:     pop %rdi
        pop %rsi
        pop %rdx
        pop %rcx
        pop %rbx
        pop %rax
        addq $2, (%rsp)                 /* past ud2 */
        iretq
fault6: push $6
        jmp fault

/* the used-buffer interrupt: acknowledge it at the transport and at the local APIC */
irq_handler:
        push %rax
        push %rbx
        mov devbase, %rbx
        mov 0x060(%rbx), %eax           /* InterruptStatus */
        mov %eax, 0x064(%rbx)           /* InterruptACK */
        mov $LAPIC, %ebx
        movl $0, 0xb0(%rbx)             /* EOI */
        incl irqs
        pop %rbx
        pop %rax
        iretq

        .balign 8
stubs:                                  /* vector n: push n, jump to fault (8 bytes each) */
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
        .balign 8
        push $\n
        jmp fault
        .endr
fault:  PUTS "fault vector:"
        mov (%rsp), %edi
        PUTHEX32_EDI
        PUTS " next:"
        mov 8(%rsp), %edi
        PUTHEX32_EDI
        SPACE
        mov 16(%rsp), %edi
        PUTHEX32_EDI
        SPACE
        mov 24(%rsp), %edi
        PUTHEX32_EDI
        NEWLINE
        EXIT 1

        .data
        .balign 16
gdt:    .quad 0
        .quad 0x00cf9a000000ffff        /* 0x08 code32 */
        .quad 0x00cf92000000ffff        /* 0x10 data */
        .quad 0x00af9a000000ffff        /* 0x18 code64, DPL 0 */
        .quad 0x00cff2000000ffff        /* 0x20 data, DPL 3 */
        .quad 0x00affa000000ffff        /* 0x28 code64, DPL 3 */
        .quad 0x0000891700000067        /* 0x30 64-bit TSS at 0x170000, limit 103 */
        .quad 0
gdt_end:
        .balign 8
gdtr:   .word gdt_end - gdt - 1
        .quad gdt
idtr:   .word 64 * 16 - 1
        .quad idt
notify: .quad 0
devbase: .quad 0
irqs:   .long 0
        .balign 16
idt:    .fill 64 * 16, 1, 0
