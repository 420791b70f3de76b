/* testdev: probes QEMU's pc-testdev the way kvm-unit-tests does. `rep outsb` of "wxyz" to
   port 0xe0 (string I/O: four separate byte writes, the last one wins), then `inb 0xe0`; a
   dword store and load at 0xff000000 (its MMIO window). Prints
   "testdev port=<inb value> mem=<dword read back>" and powers off. Without the device both
   read all-ones. */
    .include "common.inc"
    .globl _start
_start:
    lea bytes(%rip), %rsi
    mov $4, %rcx
    mov $0xe0, %dx
    cld
    rep outsb
    xor %eax, %eax
    in $0xe0, %al
    mov %rax, %r12
    movl $0x5eed1234, %eax
    mov $0xff000000, %rbx
    mov %eax, (%rbx)
    mov (%rbx), %r13d
    lea msg_port(%rip), %rsi
    call puts
    mov %r12, %rax
    call puthex
    lea msg_mem(%rip), %rsi
    call puts
    mov %r13, %rax
    call puthex
    lea nl(%rip), %rsi
    call puts
    jmp poweroff

    .section .rodata
bytes: .ascii "wxyz"
msg_port: .asciz "testdev port="
msg_mem: .asciz " mem="
nl: .asciz "\n"
