/* cmdline: runs the action named by the first word of the kernel command line:
     poweroff  ACPI S5 (status 0)         reboot   i8042 reset pulse (status 0, "rebooted")
     panic     prints Linux's panic line, then resets through port 0xcf9 (status 4)
     triple    loads an empty IDT and raises int3: triple fault (status 3)
     exit=N    isa-debug-exit with value N, one decimal digit (status 2N+1)
     halt      cli; hlt forever (the vCPU sleeps in KVM_RUN until the host stops it)
     ports     32 writes and 32 reads on an unclaimed port, 32 MMIO writes and 32 MMIO reads
               in the MMIO hole, then powers off (exit-dispatch test)
   Anything else prints "unknown action" and exits with debug-exit value 0x7f. */
    .include "common.inc"
    .globl _start
_start:
    movl 0x228(%rsi), %ebx      /* boot_params.hdr.cmd_line_ptr */
    lea s_echo(%rip), %rsi
    call puts
    mov %rbx, %rsi
    call puts
    lea nl(%rip), %rsi
    call puts

    mov (%rbx), %eax
    cmp $0x65776f70, %eax       /* "powe" */
    je poweroff
    cmp $0x6f626572, %eax       /* "rebo" */
    je do_reboot
    cmp $0x696e6170, %eax       /* "pani" */
    je do_panic
    cmp $0x70697274, %eax       /* "trip" */
    je do_triple
    cmp $0x74726f70, %eax       /* "port" */
    je do_ports
    cmp $0x746c6168, %eax       /* "halt" */
    je do_halt
    cmp $0x74697865, %eax       /* "exit" */
    jne unknown
    movzbl 5(%rbx), %eax        /* exit=N */
    sub $'0', %eax
    jmp debug_exit

unknown:
    lea s_unknown(%rip), %rsi
    call puts
    mov $0x7f, %eax
    jmp debug_exit

do_reboot:
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b

do_panic:
    lea s_panic(%rip), %rsi
    call puts
    mov $0xcf9, %dx
    mov $0x06, %al
    out %al, %dx
1:  hlt
    jmp 1b

do_halt:
    cli
1:  hlt
    jmp 1b

do_triple:
    lidt null_idt(%rip)
    int3
1:  hlt
    jmp 1b

do_ports:
    mov $32, %ecx
    mov $0x530, %dx             /* unclaimed */
1:  out %al, %dx
    in %dx, %al
    dec %ecx
    jnz 1b
    mov $32, %ecx
    mov $0xe2000000, %rdi       /* inside the 32-bit MMIO hole, no device */
2:  movl %eax, (%rdi)
    movl (%rdi), %eax
    dec %ecx
    jnz 2b
    lea s_ports(%rip), %rsi
    call puts
    jmp poweroff

    .section .rodata
s_echo: .asciz "cmdline: "
s_unknown: .asciz "unknown action\n"
s_panic: .asciz "Kernel panic - not syncing: firmware test panic\n"
s_ports: .asciz "ports: done\n"
nl: .asciz "\n"
    .balign 8
null_idt: .word 0
    .quad 0
