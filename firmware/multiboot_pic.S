/* multiboot_pic: a multiboot kernel finds the 8259 PICs as a PC BIOS leaves them (ISA line 11
   at vector 0x73, unmasked, edge mode), as kvm-unit-tests' realmode.flat expects. It installs
   an IDT whose vector 0x73 handler counts, pulses line 11 through pc-testdev (port 0x200b,
   --test-devices), and halts with interrupts on: the interrupt must wake it. Exit through
   isa-debug-exit: 0x31 once the handler ran (ferrovm's status 99), 0x7c on a bad magic. */
    .include "multiboot.inc"

mb_entry:
    mov $stack_top, %esp
    mov $0x7c, %ecx
    cmp $0x2badb002, %eax
    jne done
    /* IDT gate 0x73: 32-bit interrupt gate to irq11 in the loader's code segment. */
    mov $irq11, %eax
    mov $(idt + 0x73 * 8), %edi
    mov %ax, (%edi)
    mov %cs, %bx
    mov %bx, 2(%edi)
    movw $0x8e00, 4(%edi)
    shr $16, %eax
    mov %ax, 6(%edi)
    lidt idt_desc
    mov $0x200b, %dx                    /* pc-testdev: line 11 high, then low (an edge) */
    mov $1, %al
    out %al, %dx
    xor %al, %al
    out %al, %dx
    sti
    hlt
woke:
    cli
    mov $0x7b, %ecx
    cmpl $1, count
    jne done
    mov $0x31, %ecx
done:
    mov %ecx, %eax
    mov $0xf4, %dx
    out %eax, %dx
1:  hlt
    jmp 1b

/* The handler does not return with iret (this project's software KVM backend cannot
   emulate a protected-mode iret): it drops the frame and goes on after the hlt. */
irq11:
    incl count
    mov $0x20, %al                      /* EOI: slave, then master */
    out %al, $0xa0
    out %al, $0x20
    add $12, %esp                       /* EIP, CS, EFLAGS */
    jmp woke

    .data
    .balign 8
idt_desc:
    .word 256 * 8 - 1
    .long idt
count: .long 0

    .bss
    .balign 8
idt: .skip 256 * 8
    .skip 0x400
stack_top:
