/* bench: VM-exit micro-benchmarks for `ferrovm bench-exits` (see src/bench/).
   The first 4 bytes of the command line pick the exit kind:
     piow  out to the bench data port          pior  in from the bench data port
     mmrd  read of the bench MMIO page         mmwr  write to the bench MMIO page
     ioev  out to the ioeventfd port           mmev  write to the ioeventfd MMIO address
     cpui  cpuid (in-kernel)                   rdms  rdmsr IA32_APIC_BASE (in-kernel)
     halt  sti; hlt, woken by an IOAPIC interrupt the host raises through an irqfd
   Parameters come from the bench parameter port: N (round trips per repetition, a multiple
   of 10) and R (repetitions). Each repetition: mark 1 (host clock starts), rdtsc, N round
   trips, rdtsc, mark 2 (host clock stops), then the TSC delta (low, high) to the TSC port.
   Then ACPI power-off. */
    .include "common.inc"
    .set BENCH_DATA, 0x700
    .set BENCH_PARAM, 0x704
    .set BENCH_MARK, 0x708
    .set BENCH_TSC, 0x70c
    .set BENCH_IOEVENTFD, 0x710
    .set BENCH_MMIO, 0xe1000000
    .set BENCH_MMIO_EVENTFD, 0xe1001000
    .set SHARED, 0x80000          /* +0 interrupt count, +8 limit (read by the host) */
    .set IDT, 0x81000
    .set VECTOR, 0x40
    .set GSI, 23
    .set LAPIC, 0xfee00000
    .set IOAPIC, 0xfec00000

    .globl _start
_start:
    movl 0x228(%rsi), %ebx      /* boot_params.hdr.cmd_line_ptr */
    mov (%rbx), %r12d           /* kind */
    mov $BENCH_PARAM, %dx
    in %dx, %eax
    mov %eax, %r13d             /* N */
    in %dx, %eax
    mov %eax, %r14d             /* R */
    shr $1, %r13d               /* loops of 10 */
    xor %edx, %edx
    mov %r13d, %eax
    mov $5, %ecx
    div %ecx
    mov %eax, %r13d
    test %r13d, %r13d
    jnz 1f
    mov $1, %r13d
1:  test %r14d, %r14d
    jz poweroff

    lea body_piow(%rip), %rbp
    cmp $0x776f6970, %r12d      /* "piow" */
    je rep_loop
    lea body_pior(%rip), %rbp
    cmp $0x726f6970, %r12d      /* "pior" */
    je rep_loop
    lea body_mmrd(%rip), %rbp
    cmp $0x64726d6d, %r12d      /* "mmrd" */
    je rep_loop
    lea body_mmwr(%rip), %rbp
    cmp $0x72776d6d, %r12d      /* "mmwr" */
    je rep_loop
    lea body_ioev(%rip), %rbp
    cmp $0x76656f69, %r12d      /* "ioev" */
    je rep_loop
    lea body_mmev(%rip), %rbp
    cmp $0x76656d6d, %r12d      /* "mmev" */
    je rep_loop
    lea body_cpui(%rip), %rbp
    cmp $0x69757063, %r12d      /* "cpui" */
    je rep_loop
    lea body_rdms(%rip), %rbp
    cmp $0x736d6472, %r12d      /* "rdms" */
    je rep_loop
    lea body_halt(%rip), %rbp
    cmp $0x746c6168, %r12d      /* "halt" */
    jne unknown
    call setup_irq
    jmp rep_loop

unknown:
    mov $0x7f, %eax
    jmp debug_exit

rep_loop:
    mov $BENCH_MARK, %dx
    mov $1, %eax
    out %eax, %dx
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r15
    mov %r13d, %esi
    call *%rbp
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %r15, %rax
    mov %rax, %rdi
    mov $BENCH_MARK, %dx
    mov $2, %eax
    out %eax, %dx
    mov $BENCH_TSC, %dx
    mov %edi, %eax
    out %eax, %dx
    shr $32, %rdi
    mov %edi, %eax
    out %eax, %dx
    dec %r14d
    jnz rep_loop
    cmp $0x746c6168, %r12d
    jne poweroff
    mov $BENCH_MARK, %dx        /* halt: stop the host's interrupt thread */
    mov $4, %eax
    out %eax, %dx
    jmp poweroff

/* Bodies: %esi loops of 10 round trips. */
body_piow:
    mov $BENCH_DATA, %dx
1:  .rept 10
    out %eax, %dx
    .endr
    dec %esi
    jnz 1b
    ret

body_pior:
    mov $BENCH_DATA, %dx
1:  .rept 10
    in %dx, %eax
    .endr
    dec %esi
    jnz 1b
    ret

body_mmrd:
    mov $BENCH_MMIO, %rdi
1:  .rept 10
    movl (%rdi), %eax
    .endr
    dec %esi
    jnz 1b
    ret

body_mmwr:
    mov $BENCH_MMIO, %rdi
1:  .rept 10
    movl %eax, (%rdi)
    .endr
    dec %esi
    jnz 1b
    ret

body_ioev:
    mov $BENCH_IOEVENTFD, %dx
1:  .rept 10
    out %eax, %dx
    .endr
    dec %esi
    jnz 1b
    ret

body_mmev:
    mov $BENCH_MMIO_EVENTFD, %rdi
1:  .rept 10
    movl %eax, (%rdi)
    .endr
    dec %esi
    jnz 1b
    ret

body_cpui:
1:  .rept 10
    xor %eax, %eax
    cpuid
    .endr
    dec %esi
    jnz 1b
    ret

body_rdms:
1:  .rept 10
    mov $0x1b, %ecx
    rdmsr
    .endr
    dec %esi
    jnz 1b
    ret

/* halt: let the host raise N interrupts, one after each handled one. */
body_halt:
    imul $10, %esi
    mov $SHARED, %rdi
    mov (%rdi), %rax
    add %rsi, %rax
    mov %rax, 8(%rdi)           /* limit = count + N: the host starts raising */
1:  sti
    hlt
    cli
    mov (%rdi), %rcx
    cmp 8(%rdi), %rcx
    jb 1b
    ret

irq_handler:
    push %rax
    mov $SHARED, %rax
    incq (%rax)
    mov $LAPIC, %rax
    movl $0, 0xb0(%rax)         /* EOI */
    pop %rax
    iretq

/* IDT gate for VECTOR, LAPIC on, PIC masked, IOAPIC pin GSI -> VECTOR (edge, CPU 0). */
setup_irq:
    cli
    lea irq_handler(%rip), %rax
    mov $IDT + VECTOR * 16, %rdi
    mov %ax, (%rdi)
    movw $0x10, 2(%rdi)         /* __BOOT_CS */
    movw $0x8e00, 4(%rdi)       /* present, DPL 0, 64-bit interrupt gate */
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    lidt idt_desc(%rip)
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov $LAPIC, %rdi
    movl $0x1ff, 0xf0(%rdi)     /* spurious vector register: APIC enabled */
    movl $0, 0x80(%rdi)         /* TPR */
    mov $IOAPIC, %rdi
    movl $(0x10 + 2 * GSI + 1), (%rdi)
    movl $0, 0x10(%rdi)         /* destination APIC ID 0 */
    movl $(0x10 + 2 * GSI), (%rdi)
    movl $VECTOR, 0x10(%rdi)    /* fixed, physical, edge, active high, unmasked */
    movq $0, SHARED
    movq $0, SHARED + 8
    mov $BENCH_MARK, %dx
    mov $3, %eax                /* host: start the interrupt thread */
    out %eax, %dx
    ret

    .section .rodata
    .balign 8
idt_desc:
    .word 256 * 16 - 1
    .quad IDT
