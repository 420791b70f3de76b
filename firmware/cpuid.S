/* cpuid: prints CPUID leaf 1 ECX and EDX ("cpuid1 ecx=... edx=...") and powers off; the
   --cpu tests read the feature bits from it. */
    .include "common.inc"
    .globl _start
_start:
    lea msg_ecx(%rip), %rsi
    call puts
    mov $1, %eax
    cpuid
    mov %rdx, %r12
    mov %ecx, %eax
    call puthex
    lea msg_edx(%rip), %rsi
    call puts
    mov %r12d, %eax
    call puthex
    lea nl(%rip), %rsi
    call puts
    jmp poweroff

    .section .rodata
msg_ecx: .asciz "cpuid1 ecx="
msg_edx: .asciz " edx="
nl: .asciz "\n"
