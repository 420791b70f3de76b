/* s3: ACPI suspend to RAM and wake, the way kvm-unit-tests' s3 test does it. It finds the
   FACS (RSDP -> XSDT -> FADT -> FIRMWARE_CTRL), sets the waking vector to a 16-bit stub it
   copies to 0x1000, enables the RTC alarm as wake event (PM1_EN.RTC_EN, RTC alarm "don't care"
   = every second, AIE), stores 0x2a at address 0 and writes SLP_TYP=1|SLP_EN to PM1a_CNT. If
   the vCPU ran on, the loop after it would store 1 there. The stub (real mode, CS:IP =
   0100:0000, DS = 0) checks PM1_STS.WAK_STS, prints "s3: resumed" and exits through
   isa-debug-exit with the word at address 0: status (0x2a << 1) | 1 = 85 on success; 3 if
   the vCPU kept running before the suspend; 0x7e << 1 | 1 if WAK_STS is clear; 0x7d if no
   FACS was found. */
    .include "common.inc"
    .set PM1_STS, 0x600
    .set PM1_EN, 0x602
    .set RTC_EN, 0x400
    .globl _start
_start:
    lea msg_start(%rip), %rsi
    call puts
    /* RSDP: the first "RSD PTR " on a 16-byte boundary in 0xe0000-0xfffff. */
    mov $0xe0000, %rbx
    movabs $0x2052545020445352, %rax
1:  cmp %rax, (%rbx)
    je 2f
    add $16, %rbx
    cmp $0x100000, %rbx
    jb 1b
    jmp no_facs
2:  mov 24(%rbx), %rbx                  /* XSDT */
    mov 4(%rbx), %ecx                   /* length */
    lea 36(%rbx), %rdx                  /* entries */
    add %rbx, %rcx
3:  cmp %rcx, %rdx
    jae no_facs
    mov (%rdx), %rdi
    cmpl $0x50434146, (%rdi)            /* "FACP" */
    je 4f
    add $8, %rdx
    jmp 3b
4:  mov 36(%rdi), %edi                  /* FIRMWARE_CTRL: the FACS */
    cmpl $0x53434146, (%rdi)            /* "FACS" */
    jne no_facs
    movl $0x1000, 12(%rdi)              /* Firmware_Waking_Vector */
    lea stub(%rip), %rsi
    mov $0x1000, %rdi
    mov $(stub_end - stub), %rcx
    rep movsb

    mov $PM1_EN, %dx
    mov $RTC_EN, %ax
    out %ax, %dx
    mov $0xb, %al                       /* RTC register B: alarm interrupt enable */
    out %al, $0x70
    in $0x71, %al
    or $0x20, %al
    mov %al, %ah
    mov $0xb, %al
    out %al, $0x70
    mov %ah, %al
    out %al, $0x71
    mov $0xc0, %ah                      /* alarm seconds, minutes, hours: don't care */
    mov $1, %al
    out %al, $0x70
    mov %ah, %al
    out %al, $0x71
    mov $3, %al
    out %al, $0x70
    mov %ah, %al
    out %al, $0x71
    mov $5, %al
    out %al, $0x70
    mov %ah, %al
    out %al, $0x71

    movl $0x2a, 0
    mov $PM1A_CNT, %dx
    mov $0x2400, %ax                    /* SLP_TYP = 1 (\_S3), SLP_EN */
    out %ax, %dx
5:  movl $1, 0                          /* only if the suspend did not stop the vCPU */
    jmp 5b

no_facs:
    mov $0x7d, %eax
    jmp debug_exit

    .section .rodata
msg_start: .asciz "s3: suspending\n"

/* The real-mode stub, copied to 0x1000 and entered at 0100:0000 with DS = 0. */
    .code16
stub:
    mov $PM1_STS, %dx
    in %dx, %ax
    test $0x8000, %ax                   /* WAK_STS */
    jz 7f
    mov $(0x1000 + stub_msg - stub), %si
    mov $COM1, %dx
6:  lodsb                               /* DS:SI, DS = 0 */
    test %al, %al
    jz 8f
    out %al, %dx
    jmp 6b
7:  movl $0x7e, 0
8:  mov 0, %eax
    mov $DEBUG_EXIT, %dx
    out %eax, %dx
9:  hlt
    jmp 9b
stub_msg: .asciz "s3: resumed\n"
stub_end:
    .code64
