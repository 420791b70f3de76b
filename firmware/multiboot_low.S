/* multiboot_low: a multiboot v1 ELF kernel loaded below 1 MiB, as kvm-unit-tests'
   realmode.flat is (its linker script multiboot_low.ld puts it at 0x8000-0xd000, over the
   pages where ferrovm builds the page tables of a 64-bit entry). It checks that its data and
   bss arrived intact - nothing of ferrovm's was written over them - and exits through
   isa-debug-exit with 0x21 (ferrovm's status 67). Failures: 0x7c (bad magic), 0x7a (data
   overwritten), 0x7b (bss not zero). */
    .set COM1, 0x3f8
    .set MB_MAGIC, 0x1badb002
    .set MB_FLAGS, 0x00000002           /* memory info; an ELF file (no a.out kludge) */

    .code32
    .text
    .globl _start
_start:
    jmp mb_entry

    .balign 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

mb_entry:
    mov $stack_top, %esp
    mov $0x7c, %ecx
    cmp $0x2badb002, %eax
    jne done
    mov $0x7a, %ecx                     /* data pages: where PML4 and PDPT would go */
    cmpl $0x5eed0001, data_9000
    jne done
    cmpl $0x5eed0002, data_a000
    jne done
    mov $0x7b, %ecx                     /* bss: where the page directories would go */
    mov $bss_start, %esi
1:  cmpl $0, (%esi)
    jne done
    add $4, %esi
    cmp $bss_end, %esi
    jb 1b
    mov $msg_ok, %esi
    mov $COM1, %dx
2:  lodsb
    test %al, %al
    jz 3f
    out %al, %dx
    jmp 2b
3:  mov $0x21, %ecx
done:
    mov %ecx, %eax
    mov $0xf4, %dx
    out %eax, %dx
4:  hlt
    jmp 4b

msg_ok: .asciz "multiboot_low: ok\n"

    .data
    .balign 4096
data_9000: .long 0x5eed0001
    .balign 4096
data_a000: .long 0x5eed0002

    .bss
    .balign 4096
bss_start:
    .skip 0x2000
bss_end:
    .skip 0x100
stack_top:
