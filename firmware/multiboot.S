/* multiboot: a multiboot v1 kernel (a.out kludge header, 32-bit protected mode entry), the way
   hypervisor test kernels written for QEMU boot. It checks the loader's EAX magic and the
   multiboot info, reads QEMU's fw_cfg (signature, CPU count, RAM size), prints what it found on
   COM1 and exits through isa-debug-exit with the digit N of "exit=N" on its command line
   (ferrovm's status: 2N+1). Failures exit with 0x7c (bad magic), 0x7d (no memory info),
   0x7e (fw_cfg signature), 0x7f (no exit=N). */
    .set COM1, 0x3f8
    .set FW_CFG_SEL, 0x510
    .set FW_CFG_DATA, 0x511
    .include "multiboot.inc"

mb_entry:
    mov $0x8ff0, %esp
    mov $0x7c, %ecx
    cmp $0x2badb002, %eax
    jne fail
    mov %ebx, %ebp                      /* multiboot info */
    mov $0x7d, %ecx
    testl $1, (%ebp)                    /* flags: mem_lower/mem_upper valid */
    jz fail
    cmpl $0, 8(%ebp)
    je fail

    xor %eax, %eax                      /* FW_CFG_SIGNATURE */
    call fw_read4
    mov $0x7e, %ecx
    cmp $0x554d4551, %eax               /* "QEMU" */
    jne fail

    mov $msg_ok, %esi
    call puts
    mov $5, %eax                        /* FW_CFG_NB_CPUS */
    call fw_read4
    and $0xff, %eax
    add $'0', %al
    mov $COM1, %dx
    out %al, %dx
    mov $msg_mem, %esi
    call puts
    mov 8(%ebp), %eax                   /* mem_upper (KiB) -> MiB, 4 decimal digits */
    shr $10, %eax
    call putdec4
    mov $msg_cmd, %esi
    call puts
    mov 16(%ebp), %esi                  /* cmdline */
    push %esi
    call puts
    mov $nl, %esi
    call puts
    pop %esi

    mov $0x7f, %ecx                     /* find "exit=" */
1:  cmpb $0, (%esi)
    je fail
    cmpl $0x74697865, (%esi)            /* "exit" */
    je 2f
    inc %esi
    jmp 1b
2:  movzbl 5(%esi), %ecx
    sub $'0', %ecx
fail:
    mov %ecx, %eax
    mov $0xf4, %dx
    out %eax, %dx
3:  hlt
    jmp 3b

/* fw_read4: select item %ax, read 4 bytes little-endian into %eax. */
fw_read4:
    mov $FW_CFG_SEL, %dx
    out %ax, %dx
    mov $FW_CFG_DATA, %dx
    mov $4, %ecx
    xor %ebx, %ebx
4:  in %dx, %al
    shrd $8, %eax, %ebx                 /* shift the byte in from the top */
    dec %ecx
    jnz 4b
    mov %ebx, %eax
    ret

/* puts: NUL-terminated string at %esi. */
puts:
    mov $COM1, %dx
5:  lodsb
    test %al, %al
    jz 6f
    out %al, %dx
    jmp 5b
6:  ret

/* putdec4: %eax (< 10000) as 4 decimal digits. */
putdec4:
    mov $1000, %ecx
7:  xor %edx, %edx
    div %ecx
    push %edx
    add $'0', %al
    mov $COM1, %dx
    out %al, %dx
    pop %eax
    push %eax
    mov %ecx, %eax
    xor %edx, %edx
    mov $10, %ecx
    div %ecx
    mov %eax, %ecx
    pop %eax
    test %ecx, %ecx
    jnz 7b
    ret

    .section .rodata
msg_ok: .asciz "multiboot: ok cpus="
msg_mem: .asciz " mem_upper_mib="
msg_cmd: .asciz " cmdline="
nl: .asciz "\n"
