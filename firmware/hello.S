/* hello: prints a greeting on COM1 and powers off through ACPI (ferrovm exits 0). */
    .include "common.inc"
    .globl _start
_start:
    lea msg(%rip), %rsi
    call puts
    jmp poweroff

    .section .rodata
msg: .asciz "Hello from ferrovm firmware\n"
