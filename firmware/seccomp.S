/* seccomp: asks the bench device (`--bench-device`) to make a system call no vCPU filter
   allows (mark 0x5ec: getppid on the vCPU thread), then prints and powers off. Under
   `--seccomp on` ferrovm stops at the call with one line naming it; with `off` or `log` the
   guest goes on. */
    .include "common.inc"
    .set BENCH_MARK, 0x708
    .globl _start
_start:
    mov $BENCH_MARK, %dx
    mov $0x5ec, %eax
    out %eax, %dx
    lea msg(%rip), %rsi
    call puts
    jmp poweroff

    .section .rodata
msg: .asciz "seccomp: the probe came back\n"
