/* bootregs: prints the CPU state the 64-bit boot protocol leaves, one "name=hex" per line,
   then exits through isa-debug-exit with value 0x21 (status 0x43). The test asserts each value. */
    .include "common.inc"
    .globl _start
_start:
    mov %rsi, %r12              /* zero page */
    mov %rsp, %r13
    pushfq
    pop %r14                    /* rflags */
    mov %cs, %r15

#define FIELD(label, src) \
    lea label(%rip), %rsi; call puts; mov src, %rax; call puthex; lea nl(%rip), %rsi; call puts

    FIELD(s_rsi, %r12)
    FIELD(s_rsp, %r13)
    FIELD(s_rflags, %r14)
    FIELD(s_cs, %r15)
    mov %cr0, %rbx
    FIELD(s_cr0, %rbx)
    mov %cr3, %rbx
    FIELD(s_cr3, %rbx)
    mov %cr4, %rbx
    FIELD(s_cr4, %rbx)
    mov $0xc0000080, %ecx       /* EFER */
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rbx
    FIELD(s_efer, %rbx)
    movzwq 0x1fe(%r12), %rbx    /* boot_params.hdr.boot_flag */
    FIELD(s_bootflag, %rbx)
    movzbq 0x1e8(%r12), %rbx    /* boot_params.e820_entries */
    FIELD(s_e820, %rbx)
    movl 0x228(%r12), %ebx      /* boot_params.hdr.cmd_line_ptr */
    FIELD(s_cmdline, %rbx)
    mov 0x70(%r12), %rbx        /* boot_params.acpi_rsdp_addr */
    FIELD(s_rsdp, %rbx)
    mov (%rbx), %rbx            /* first 8 bytes at the RSDP: "RSD PTR " */
    FIELD(s_rsdpsig, %rbx)
    mov $0x21, %eax
    jmp debug_exit

    .section .rodata
s_rsi: .asciz "rsi="
s_rsp: .asciz "rsp="
s_rflags: .asciz "rflags="
s_cs: .asciz "cs="
s_cr0: .asciz "cr0="
s_cr3: .asciz "cr3="
s_cr4: .asciz "cr4="
s_efer: .asciz "efer="
s_bootflag: .asciz "boot_flag="
s_e820: .asciz "e820_entries="
s_cmdline: .asciz "cmd_line_ptr="
s_rsdp: .asciz "acpi_rsdp_addr="
s_rsdpsig: .asciz "rsdp_signature="
nl: .asciz "\n"
