/* fwcfg: reads QEMU's fw_cfg (selector port 0x510, data port 0x511) and ends through
   isa-debug-exit with a value built from what it read:
     0x7e  signature is not "QEMU"      0x7d  file directory count is not 0
     else  (CPU count) | (RAM size in MiB == 64 ? 0x10 : 0) | (ID bit 0 ? 0x20 : 0) */
    .include "common.inc"
    .set FW_CFG_SEL, 0x510
    .set FW_CFG_DATA, 0x511

    .globl _start
_start:
    xor %eax, %eax              /* FW_CFG_SIGNATURE */
    call select
    call read4
    cmp $0x554d4551, %eax       /* "QEMU" */
    mov $0x7e, %ebx
    jne fail
    mov $0x19, %eax             /* FW_CFG_FILE_DIR: u32 big-endian count */
    call select
    call read4
    mov $0x7d, %ebx
    test %eax, %eax
    jnz fail
    mov $0x05, %eax             /* FW_CFG_NB_CPUS */
    call select
    call read4                  /* u16, then zeros past the item */
    movzwl %ax, %ebx
    mov $0x03, %eax             /* FW_CFG_RAM_SIZE */
    call select
    call read4
    cmp $(64 << 20), %eax
    jne 1f
    or $0x10, %ebx
1:  mov $0x01, %eax             /* FW_CFG_ID */
    call select
    call read4
    test $1, %al
    jz 2f
    or $0x20, %ebx
2:  mov %ebx, %eax
    jmp debug_exit
fail:
    mov %ebx, %eax
    jmp debug_exit

/* select: item %ax. */
select:
    mov $FW_CFG_SEL, %dx
    out %ax, %dx
    ret

/* read4: four data bytes, little-endian, into %eax. Clobbers ecx, edx. */
read4:
    mov $FW_CFG_DATA, %dx
    xor %ecx, %ecx
    xor %eax, %eax
1:  shl $8, %eax
    in %dx, %al
    inc %ecx
    cmp $4, %ecx
    jne 1b
    bswap %eax
    ret
