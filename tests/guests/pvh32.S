/* A synthetic PVH kernel: an ELF whose Xen note XEN_ELFNOTE_PHYS32_ENTRY (18) points at
 * pvh_start, entered in 32-bit protected mode, paging off, with %ebx = hvm_start_info
 * (xen/include/public/arch-x86/hvm/start_info.h). Prints magic, cmdline, the first module and
 * the memory map. */
        PVH_ENTRY
        mov %ebx, %ebp
        PUTS "magic:"
        mov 0(%ebp), %edi
        PUTHEX32_EDI
        NEWLINE
        PUTS "cmdline:"
        mov 24(%ebp), %esi              /* cmdline_paddr (low half) */
1:      lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp 1b
2:      NEWLINE
        PUTS "modules:"
        mov 12(%ebp), %edi              /* nr_modules */
        PUTHEX32_EDI
        test %edi, %edi
        jz 3f
        mov 16(%ebp), %esi              /* modlist_paddr (%ebx: PUTC clobbers %bl) */
        SPACE
        mov 0(%esi), %edi               /* module paddr */
        PUTHEX32_EDI
        SPACE
        mov 8(%esi), %edi               /* module size */
        PUTHEX32_EDI
        SPACE
        mov 0(%esi), %esi
        mov (%esi), %edi                /* first 4 bytes of the module */
        PUTHEX32_EDI
3:      NEWLINE
        PUTS "memmap:"
        mov 48(%ebp), %edi              /* memmap_entries */
        mov %edi, %ecx
        PUTHEX32_EDI
        NEWLINE
        mov 40(%ebp), %esi              /* memmap_paddr: 24-byte entries addr, size, type */
4:      mov 48(%ebp), %eax
        test %eax, %eax
        jz 5f
        E820_LINE %esi
        add $24, %esi
        decl 48(%ebp)
        jmp 4b
5:      mov $123, %al                  /* boot timer (Firecracker's magic), port 0x3f0 */
        mov $0x3f0, %dx
        out %al, %dx
        EXIT 0x10
