/* pci_testdev: drives QEMU's pci-testdev (PCI 1b36:0005) the way kvm-unit-tests'
   pci_testdev() does. Finds it on bus 0 through CF8/CFC, takes BAR 0 (MMIO) and BAR 1 (ports),
   and for each test of each BAR: selects it, checks its write count starts at 0, writes its
   value 16 times at its offset, and prints "<name> count=<count>". A write an ioeventfd takes
   never reaches the device, so the eventfd tests must read 0 and the no-eventfd tests 16.
   Prints "pci-testdev absent" without the device. Powers off. */
    .include "common.inc"
    .globl _start
_start:
    xor %ebx, %ebx                      /* device number on bus 0 */
1:  mov %ebx, %edi
    xor %esi, %esi
    call cfg_read
    cmp $0x00051b36, %eax
    je found
    inc %ebx
    cmp $32, %ebx
    jb 1b
    lea absent(%rip), %rsi
    call puts
    jmp poweroff

found:
    mov %ebx, %edi
    mov $0x10, %esi
    call cfg_read
    and $~0xf, %eax
    mov %rax, %r13                      /* MMIO base */
    xor %r12d, %r12d
    call run_kind
    mov %ebx, %edi
    mov $0x14, %esi
    call cfg_read
    and $~0x3, %eax
    mov %rax, %r13                      /* port base */
    mov $1, %r12d
    call run_kind
    jmp poweroff

/* run_kind: every test of the BAR at %r13 (%r12 = 0: MMIO, 1: ports). */
run_kind:
    xor %ebp, %ebp                      /* test number */
next:
    xor %edi, %edi
    mov %ebp, %esi
    call wr8                            /* select test %ebp */
    mov $1, %edi
    call rd8
    cmp $1, %eax                        /* width 1, or no such test: done */
    jne 9f
    mov $12, %edi
    call rd32
    test %eax, %eax
    jnz bad
    mov $8, %edi
    call rd32
    mov %eax, %r8d                      /* value */
    mov $4, %edi
    call rd32
    mov %eax, %r9d                      /* offset */
    mov $16, %ecx
2:  mov %r9, %rdi
    mov %r8d, %esi
    call wr8
    dec %ecx
    jnz 2b
    mov $16, %r10d                      /* the name, up to its NUL */
3:  mov %r10, %rdi
    call rd8
    test %al, %al
    jz 4f
    mov $COM1, %dx
    out %al, %dx
    inc %r10
    cmp $64, %r10
    jb 3b
4:  lea msg_count(%rip), %rsi
    call puts
    mov $12, %edi
    call rd32
    call puthex
    lea nl(%rip), %rsi
    call puts
    inc %ebp
    jmp next
9:  ret

bad:
    lea msg_bad(%rip), %rsi
    call puts
    jmp poweroff

/* rd8 / rd32: %eax = byte / dword at BAR offset %rdi. wr8: byte %sil at offset %rdi.
   Clobber rax, rdx. */
rd8:
    test %r12, %r12
    jnz 1f
    movzbl (%r13,%rdi), %eax
    ret
1:  lea (%r13,%rdi), %rdx
    xor %eax, %eax
    in %dx, %al
    ret
rd32:
    test %r12, %r12
    jnz 1f
    movl (%r13,%rdi), %eax
    ret
1:  lea (%r13,%rdi), %rdx
    in %dx, %eax
    ret
wr8:
    test %r12, %r12
    jnz 1f
    mov %sil, (%r13,%rdi)
    ret
1:  lea (%r13,%rdi), %rdx
    mov %esi, %eax
    out %al, %dx
    ret

    .section .rodata
absent: .asciz "pci-testdev absent\n"
msg_count: .asciz " count="
msg_bad: .asciz "a new test's count is not 0\n"
nl: .asciz "\n"
