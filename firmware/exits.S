/* exits: known numbers of exits on the bench device (tests/exits.rs counts them exactly).
   Command line (first 4 bytes):
     coun  100 out and 70 in on port 0x700 (bench data), 50 MMIO writes and 30 MMIO reads
           of the bench page, 20 MMIO reads at 0xe2000000 (unclaimed), 10 out to port 0x720
           (unclaimed), 5 cpuid (in-kernel: never counted), then ACPI power-off
     wait  prints "wait: ready", then loops { out to port 0x700; poll COM1 LSR } until a
           byte arrives on COM1, prints "wait: done" and powers off (live-statistics test) */
    .include "common.inc"
    .set BENCH_DATA, 0x700
    .globl _start
_start:
    movl 0x228(%rsi), %ebx
    mov (%rbx), %eax
    cmp $0x6e756f63, %eax       /* "coun" */
    je do_count
    cmp $0x74696177, %eax       /* "wait" */
    je do_wait
    mov $0x7f, %eax
    jmp debug_exit

do_count:
    mov $BENCH_DATA, %dx
    mov $100, %ecx
1:  out %eax, %dx
    dec %ecx
    jnz 1b
    mov $70, %ecx
2:  in %dx, %eax
    dec %ecx
    jnz 2b
    mov $0xe1000000, %rdi
    mov $50, %ecx
3:  movl %eax, (%rdi)
    dec %ecx
    jnz 3b
    mov $30, %ecx
4:  movl (%rdi), %eax
    dec %ecx
    jnz 4b
    mov $0xe2000000, %rdi
    mov $20, %ecx
5:  movl (%rdi), %eax
    dec %ecx
    jnz 5b
    mov $0x720, %dx
    mov $10, %ecx
6:  out %al, %dx
    dec %ecx
    jnz 6b
    mov $5, %esi
7:  xor %eax, %eax
    cpuid
    dec %esi
    jnz 7b
    jmp poweroff

do_wait:
    lea s_ready(%rip), %rsi
    call puts
1:  mov $BENCH_DATA, %dx
    out %eax, %dx
    mov $200, %ecx              /* a pause between exits */
2:  dec %ecx
    jnz 2b
    mov $COM1 + 5, %dx          /* LSR: bit 0 = data ready */
    in %dx, %al
    test $1, %al
    jz 1b
    lea s_done(%rip), %rsi
    call puts
    jmp poweroff

    .section .rodata
s_ready: .asciz "wait: ready\n"
s_done: .asciz "wait: done\n"
