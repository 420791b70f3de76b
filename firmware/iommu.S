/* iommu: drives ferrovm's VT-d unit (--iommu) and QEMU's edu device (--test-devices) the
   way kvm-unit-tests' intel-iommu test does, plus the fault and invalidation-wait paths it
   does not check. Prints one line per step and exits through isa-debug-exit with the number
   of the first step that failed (status (N << 1) | 1), or 0 (status 1) when all pass:
     1 edu absent          2 VT-d version / capabilities   3 a GCMD bit not reflected in GSTS
     4 DMA round trip through IOVA 0 -> data page          5 no fault recorded for DMA to an
     unmapped IOVA (or the wrong reason)                   6 invalidation wait status not written
     7 remapped MSI not delivered (vector 0xee)            8 remapped IOAPIC interrupt not
     delivered (vector 0xed)                               9 an interrupt whose IRTE source ID
     does not match edu's was delivered (or no fault recorded)
   Tables live at fixed addresses in the first 4 MiB (RAM, zero at boot). */
    .include "common.inc"
    .set VTD, 0xfed90000
    .set LAPIC, 0xfee00000
    .set IOAPIC, 0xfec00000
    .set ROOT, 0x300000
    .set CTX, 0x301000
    .set SL3, 0x302000
    .set SL2, 0x303000
    .set SL1, 0x304000
    .set DATA, 0x305000
    .set IRT, 0x306000
    .set IQ, 0x307000
    .set STATUS, 0x308000
    .set IDT, 0x309000
    .set GSTS_QIES, 0x04000000
    .set GSTS_RTPS, 0x40000000
    .set GSTS_IRTPS, 0x01000000
    .set GSTS_TES, 0x80000000
    .set GSTS_IRES, 0x02000000
    .globl _start
_start:
    /* edu on bus 0: %r14 = devfn, %r13 = BAR 0. */
    xor %ebx, %ebx
1:  mov %ebx, %edi
    xor %esi, %esi
    call cfg_read
    cmp $0x11e81234, %eax
    je 2f
    inc %ebx
    cmp $32, %ebx
    jb 1b
    mov $1, %eax
    jmp fail
2:  mov %ebx, %r14d
    shl $3, %r14d
    mov %ebx, %edi
    mov $0x10, %esi
    call cfg_read
    and $~0xf, %eax
    mov %rax, %r13
    mov $VTD, %r12

    /* Step 2: version 1.x, 39-bit SAGAW, QI and IR. */
    mov $2, %eax
    mov (%r12), %ecx
    shr $4, %ecx
    cmp $1, %ecx
    jne fail
    mov 8(%r12), %rcx                   /* CAP */
    bt $9, %rcx
    jnc fail
    mov 16(%r12), %rcx                  /* ECAP */
    and $0xa, %ecx
    cmp $0xa, %ecx
    jne fail

    /* Step 3: QI, root table, IR table, DMA remapping, interrupt remapping. */
    movq $IQ, 0x90(%r12)
    mov $GSTS_QIES, %edi
    call gcmd
    movq $ROOT, 0x20(%r12)
    mov $GSTS_RTPS, %edi
    call gcmd
    movq $(IRT | 7), 0xb8(%r12)          /* 256 entries */
    mov $GSTS_IRTPS, %edi
    call gcmd
    movq $(CTX | 1), ROOT               /* bus 0 */
    mov %r14, %rax
    shl $4, %rax
    movq $(SL3 | 1), CTX(%rax)          /* present, second-level translation */
    movq $(1 | 1 << 8), CTX+8(%rax)     /* AW 39-bit, domain 1 */
    movq $(SL2 | 3), SL3
    movq $(SL1 | 3), SL2
    movq $(DATA | 3), SL1               /* IOVA 0 -> DATA, read and write */
    mov $GSTS_TES, %edi
    call gcmd
    mov $GSTS_IRES, %edi
    call gcmd
    lea msg_init(%rip), %rsi
    call puts

    /* Step 4: RAM -> device at IOVA 0, device -> RAM at IOVA 4. */
    movl $0x12345678, DATA
    xor %edi, %edi
    mov $0x40000, %esi
    mov $1, %edx
    call edu_dma
    mov $0x40000, %edi
    mov $4, %esi
    mov $3, %edx
    call edu_dma
    mov $4, %eax
    cmpl $0x12345678, DATA+4
    jne fail
    lea msg_dma(%rip), %rsi
    call puts

    /* Step 5: device -> IOVA 0x1000 (unmapped): a write fault (reason 6: not present... or
       5) recorded with edu's source ID, and nothing written. */
    mov $0x40000, %edi
    mov $0x1000, %esi
    mov $3, %edx
    call edu_dma
    mov $5, %eax
    mov 0x34(%r12), %ecx                /* FSTS */
    bt $1, %ecx                         /* PPF */
    jnc fail
    mov 8(%r12), %rcx
    shr $24, %rcx
    and $0x3ff, %ecx
    shl $4, %ecx                        /* FRCD offset */
    lea (%r12,%rcx), %rbx
    mov 8(%rbx), %rcx                   /* high half: SID 15:0, reason 39:32, F 63 */
    bt $63, %rcx
    jnc fail
    cmp %r14w, %cx
    jne fail
    mov %rcx, %rax
    lea msg_fault(%rip), %rsi
    push %rax
    call puts
    pop %rax
    shr $32, %rax
    and $0xff, %eax
    call puthex
    lea nl(%rip), %rsi
    call puts
    btsq $63, 8(%rbx)                   /* clear F (write 1) */
    mov $5, %eax
    testl $2, 0x34(%r12)
    jnz fail

    /* Step 6: invalidation wait with status write. */
    movabs $(5 | 1 << 5 | 0xabcd << 32), %rax
    mov %rax, IQ
    movq $STATUS, IQ+8
    movq $16, 0x88(%r12)                /* IQT: one descriptor */
    mov $6, %eax
    cmpl $0xabcd, STATUS
    jne fail
    cmpq $16, 0x80(%r12)                /* IQH caught up */
    jne fail
    lea msg_qi(%rip), %rsi
    call puts

    call setup_irq

    /* Step 7: MSI in remappable format, handle 1 -> vector 0xee, APIC 0. */
    mov $1, %edi
    mov $0xee, %esi
    mov %r14d, %edx
    call set_irte
    call msi_cap                        /* %ebp = capability offset */
    mov $7, %eax
    test %ebp, %ebp
    jz fail
    lea 4(%rbp), %esi
    mov $(0xfee00000 | 1 << 4 | 1 << 5), %edx
    call cfg_write
    lea 8(%rbp), %esi
    xor %edx, %edx
    call cfg_write
    lea 12(%rbp), %esi
    xor %edx, %edx
    call cfg_write
    mov %ebp, %esi
    mov %r14d, %edi
    shr $3, %edi
    call cfg_read
    or $0x10000, %eax                   /* MSI enable */
    mov %eax, %edx
    mov %ebp, %esi
    call cfg_write
    mov $0xee, %edi
    mov $7, %r15d
    call raise_and_wait
    lea msg_msi(%rip), %rsi
    call puts

    /* Step 8: MSI off (INTx again); IOAPIC entry in remappable format, handle 2 -> 0xed. */
    mov %ebp, %esi
    mov %r14d, %edi
    shr $3, %edi
    call cfg_read
    and $~0x10000, %eax
    mov %eax, %edx
    mov %ebp, %esi
    call cfg_write
    mov $2, %edi
    mov $0xed, %esi
    mov %r14d, %edx
    call set_irte
    mov $2, %edi
    call ioapic_route
    mov $0xed, %edi
    mov $8, %r15d
    call raise_and_wait
    lea msg_ioapic(%rip), %rsi
    call puts

    /* Step 9: the same MSI, but its IRTE names another source (edu's devfn + 1): blocked,
       with a fault record (reason 0x26, SID mismatch) for edu. */
    mov $1, %edi
    mov $0xee, %esi
    lea 1(%r14), %edx
    call set_irte
    movq $4, IQ+16                      /* interrupt entry cache invalidation (global) */
    movq $0, IQ+24
    movq $32, 0x88(%r12)
    mov %ebp, %esi
    mov %r14d, %edi
    shr $3, %edi
    call cfg_read
    or $0x10000, %eax
    mov %eax, %edx
    mov %ebp, %esi
    call cfg_write
    movl $0, hits(%rip)
    movl $1, 0x60(%r13)
    mov $0x100000, %ecx
1:  pause
    dec %ecx
    jnz 1b
    mov $9, %eax
    cmpl $0, hits(%rip)
    jne fail
    testl $2, 0x34(%r12)
    jz fail
    lea msg_blocked(%rip), %rsi
    call puts

    xor %eax, %eax
    jmp debug_exit

fail:
    push %rax
    lea msg_fail(%rip), %rsi
    call puts
    pop %rax
    push %rax
    call puthex
    lea nl(%rip), %rsi
    call puts
    pop %rax
    jmp debug_exit

/* gcmd: sets GCMD bit %edi (on top of what GSTS has), waits for it in GSTS. Fails step 3. */
gcmd:
    mov 0x1c(%r12), %eax
    and $0x86800000, %eax               /* persistent: TE, QIE, IRE, CFI */
    or %edi, %eax
    mov %eax, 0x18(%r12)
    mov $0x10000, %ecx
1:  test %edi, 0x1c(%r12)
    jnz 2f
    dec %ecx
    jnz 1b
    mov $3, %eax
    jmp fail
2:  ret

/* edu_dma: source %rdi, destination %rsi, command %edx (1: to device, 3: from device);
   waits for the start bit to clear. */
edu_dma:
    mov %rdi, 0x80(%r13)
    mov %rsi, 0x88(%r13)
    movq $4, 0x90(%r13)
    mov %edx, 0x98(%r13)
1:  testl $1, 0x98(%r13)
    jnz 1b
    ret

/* set_irte: entry %edi: present, vector %esi, destination APIC 0, physical, edge, fixed;
   source ID %edx verified in full (SVT 1). */
set_irte:
    shl $4, %edi
    lea IRT(%rdi), %rdi
    mov %esi, %eax
    shl $16, %eax
    or $1, %eax
    mov %rax, (%rdi)
    movzwl %dx, %eax
    or $(1 << 18), %eax
    mov %rax, 8(%rdi)
    ret

/* ioapic_route: the edu INTx line's IOAPIC entry -> remappable format, handle %edi. */
ioapic_route:
    mov %edi, %ebx
    mov %r14d, %edi
    shr $3, %edi
    mov $0x3c, %esi
    call cfg_read
    movzbl %al, %eax                    /* interrupt line = IOAPIC pin */
    lea 0x10(,%rax,2), %ecx
    mov $IOAPIC, %rdx
    lea 1(%rcx), %eax
    mov %eax, (%rdx)
    mov %ebx, %eax
    shl $17, %eax                       /* index 14:0 -> bits 63:49; format bit 48 */
    or $0x10000, %eax
    mov %eax, 0x10(%rdx)
    mov %ecx, (%rdx)
    movl $0xed, 0x10(%rdx)              /* vector, edge, unmasked */
    ret

/* raise_and_wait: raise edu's interrupt, wait for vector %edi's handler; fail step %r15. */
raise_and_wait:
    movl $0, hits(%rip)
    movl $1, 0x60(%r13)
    mov $0x1000000, %ecx
1:  cmpl $0, hits(%rip)
    jne 2f
    pause
    dec %ecx
    jnz 1b
    mov %r15d, %eax
    jmp fail
2:  cmp %edi, last_vector(%rip)
    mov %r15d, %eax
    jne fail
    ret

/* msi_cap: %ebp = offset of edu's MSI capability, 0 if none. */
msi_cap:
    mov %r14d, %edi
    shr $3, %edi
    mov $0x34, %esi
    call cfg_read
    movzbl %al, %ebp
1:  test %ebp, %ebp
    jz 2f
    mov %ebp, %esi
    call cfg_read
    cmp $5, %al
    je 2f
    movzbl %ah, %ebp
    jmp 1b
2:  ret

/* setup_irq: IDT gates for 0xed and 0xee, LAPIC software-enabled, interrupts on. */
setup_irq:
    mov %cs, %ax
    lea irq_ed(%rip), %rdi
    mov $0xed, %esi
    call gate
    lea irq_ee(%rip), %rdi
    mov $0xee, %esi
    call gate
    lidt idtr(%rip)
    mov $LAPIC, %rdx
    orl $0x1ff, 0xf0(%rdx)              /* SVR: enabled, spurious vector 0xff */
    movl $0, 0x80(%rdx)                 /* TPR 0 */
    sti
    ret

/* gate: interrupt gate %esi -> handler %rdi, code selector %ax. */
gate:
    shl $4, %esi
    lea IDT(%rsi), %rsi
    mov %di, (%rsi)
    mov %ax, 2(%rsi)
    movw $0x8e00, 4(%rsi)
    mov %rdi, %rcx
    shr $16, %rcx
    mov %cx, 6(%rsi)
    shr $16, %rcx
    mov %ecx, 8(%rsi)
    movl $0, 12(%rsi)
    ret

irq_ed:
    push %rax
    mov $0xed, %eax
    jmp irq_common
irq_ee:
    push %rax
    mov $0xee, %eax
irq_common:
    mov %eax, last_vector(%rip)
    incl hits(%rip)
    mov 0x24(%r13), %eax                /* acknowledge edu: lowers INTx */
    mov %eax, 0x64(%r13)
    push %rdx
    mov $LAPIC, %rdx
    movl $0, 0xb0(%rdx)                 /* EOI */
    pop %rdx
    pop %rax
    iretq

/* cfg_write: writes %edx to register %esi of the function %r14 (devfn) on bus 0. */
cfg_write:
    mov %r14d, %eax
    shl $8, %eax
    or %esi, %eax
    or $0x80000000, %eax
    push %rdx
    mov $0xcf8, %dx
    out %eax, %dx
    pop %rax
    mov $0xcfc, %dx
    out %eax, %dx
    ret

    .data
    .balign 4
hits: .long 0
last_vector: .long 0
    .balign 8
idtr: .word 0xfff
    .quad IDT

    .section .rodata
msg_init: .asciz "vtd: tables set, DMA and interrupt remapping on\n"
msg_dma: .asciz "vtd: DMA through IOVA 0 ok\n"
msg_fault: .asciz "vtd: unmapped IOVA faulted, reason "
msg_qi: .asciz "vtd: invalidation wait ok\n"
msg_msi: .asciz "vtd: remapped MSI ok\n"
msg_ioapic: .asciz "vtd: remapped IOAPIC interrupt ok\n"
msg_blocked: .asciz "vtd: MSI from the wrong source blocked\n"
msg_fail: .asciz "vtd: FAILED at step "
nl: .asciz "\n"
