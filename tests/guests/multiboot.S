/* A synthetic Multiboot v1 kernel (a.out kludge: flag 16, addresses in the header), entered in
 * 32-bit protected mode with EAX = 0x2BADB002 and EBX = the multiboot information
 * (Multiboot 0.6.96, 3.1.1 header, 3.2 machine state, 3.3 boot information format). */
        .text
        .code32
start:  jmp entry
        .balign 4
mbhdr:  .long 0x1BADB002                /* magic */
        .long 0x00010003                /* flags: page-align modules, memory info, kludge */
        .long -(0x1BADB002 + 0x00010003)
        .long mbhdr                     /* header_addr */
        .long start                     /* load_addr */
        .long 0                         /* load_end_addr: the whole file */
        .long 0                         /* bss_end_addr: no bss */
        .long entry                     /* entry_addr */
entry:  mov %ebx, %ebp
        mov %eax, %edi
        PUTS "eax:"
        PUTHEX32_EDI
        NEWLINE
        PUTS "flags:"
        mov 0(%ebp), %edi
        PUTHEX32_EDI
        PUTS " lower:"
        mov 4(%ebp), %edi
        PUTHEX32_EDI
        PUTS " upper:"
        mov 8(%ebp), %edi
        PUTHEX32_EDI
        NEWLINE
        PUTS "cmdline:"
        mov 16(%ebp), %esi
1:      lodsb
        test %al, %al
        jz 2f
        PUTC_AL
        jmp 1b
2:      NEWLINE
        PUTS "mods:"
        mov 20(%ebp), %edi              /* mods_count */
        PUTHEX32_EDI
        test %edi, %edi
        jz 3f
        mov 24(%ebp), %esi              /* mods_addr: mod_start, mod_end, string */
        SPACE
        mov 0(%esi), %edi
        PUTHEX32_EDI
        SPACE
        mov 4(%esi), %edi
        PUTHEX32_EDI
3:      NEWLINE
        PUTS "mmap:"
        mov 44(%ebp), %edi              /* mmap_length */
        PUTHEX32_EDI
        NEWLINE
        EXIT 0x10
