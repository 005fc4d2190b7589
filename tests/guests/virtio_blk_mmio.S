/* Long mode: a polling virtio-mmio (v2) block driver, as small as it gets (virtio 1.2, 4.2.3
 * device initialization; 5.2.6 block requests). Reads sector 0 and prints its first 8 bytes,
 * writes "kvmpy!!\n" + zeros to sector 1, then FLUSHes, printing each request's status.
 * Notifies go to QueueNotify (an ioeventfd, no exit); completion is seen by polling used.idx. */
        .code64
        .set VM, 0xd0000000             /* virtio-mmio slot 0 */
        .set DESC, 0x200000
        .set AVAIL, 0x201000
        .set USED, 0x202000
        .set HDR, 0x203000
        .set DATA, 0x204000
        .set STATUS, 0x205000
        mov $VM, %ebx
        cmpl $0x74726976, 0x000(%rbx)   /* MagicValue "virt" */
        jne fail
        cmpl $2, 0x004(%rbx)            /* Version 2 */
        jne fail
        cmpl $2, 0x008(%rbx)            /* DeviceID 2: block */
        jne fail
        movl $0, 0x070(%rbx)            /* Status: reset */
        movl $1, 0x070(%rbx)            /* ACKNOWLEDGE */
        movl $3, 0x070(%rbx)            /* | DRIVER */
        movl $1, 0x024(%rbx)            /* DriverFeaturesSel 1 */
        movl $1, 0x020(%rbx)            /* VIRTIO_F_VERSION_1 (bit 32) */
        movl $0, 0x024(%rbx)
        movl $0, 0x020(%rbx)            /* nothing else: no flush bit, plain writes sync */
        movl $0xb, 0x070(%rbx)          /* | FEATURES_OK */
        testl $8, 0x070(%rbx)
        jz fail
        movl $0, 0x030(%rbx)            /* QueueSel 0 */
        movl $8, 0x038(%rbx)            /* QueueNum 8 */
        VIRTIO_MMIO_QUEUE_ADDRS %rbx, DESC, AVAIL, USED
        movl $1, 0x044(%rbx)            /* QueueReady */
        movl $0xf, 0x070(%rbx)          /* | DRIVER_OK */

        /* three descriptors: header (device reads), data (device writes for IN), status */
        movq $HDR, DESC + 0
        movl $16, DESC + 8
        movw $1, DESC + 12              /* NEXT */
        movw $1, DESC + 14
        movq $DATA, DESC + 16
        movl $512, DESC + 24
        movw $3, DESC + 28              /* NEXT | WRITE */
        movw $2, DESC + 30
        movq $STATUS, DESC + 32
        movl $1, DESC + 40
        movw $2, DESC + 44              /* WRITE */

        movl $0, HDR                    /* VIRTIO_BLK_T_IN */
        movq $0, HDR + 8                /* sector 0 */
        movb $0xee, STATUS
        call submit
        PUTS "read:"
        mov DATA, %edi
        PUTHEX32_EDI
        mov DATA + 4, %edi
        PUTHEX32_EDI
        call status

        movl $1, HDR                    /* VIRTIO_BLK_T_OUT */
        movq $1, HDR + 8                /* sector 1 */
        movw $1, DESC + 28              /* data is device-readable now */
        movq $0x0a212179706d766b, %rax  /* "kvmpy!!\n" */
        mov %rax, DATA
        movb $0xee, STATUS
        call submit
        PUTS "write:"
        call status

        movl $4, HDR                    /* VIRTIO_BLK_T_FLUSH: header + status only */
        movw $1, DESC + 12
        movw $2, DESC + 14              /* header -> status */
        movb $0xee, STATUS
        call submit
        PUTS "flush:"
        call status
        EXIT 0x10

/* put descriptor 0 in the avail ring, notify, wait until the used index moves */
submit: movzwl AVAIL + 2, %eax
        mov %eax, %ecx
        and $7, %ecx
        movw $0, AVAIL + 4(,%rcx,2)
        inc %eax
        movw %ax, AVAIL + 2             /* avail.idx */
        mov $VM, %ebx                   /* (the print macros clobber %bl) */
        movl $0, 0x050(%rbx)            /* QueueNotify: queue 0 */
1:      cmpw %ax, USED + 2              /* used.idx */
        jne 1b
        ret

status: movzbl STATUS, %edi
        PUTHEX32_EDI
        NEWLINE
        ret

fail:   PUTS "virtio-mmio probe failed\n"
        EXIT 1
