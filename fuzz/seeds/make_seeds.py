#!/usr/bin/env python3
"""Regenerates the hand-built seeds under fuzz/seeds/ (the qcow2 and fixed-VHD seeds come
from qemu-img; see fuzz/README.md). Each seed follows its target's input layout."""
import os, struct, sys

HERE = os.path.dirname(os.path.abspath(__file__))

def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# ---- disk op scripts: flags byte, then 8 ops of (op, sector u16, count) ----
def script(rw, ops):
    b = bytes([1 if rw else 0])
    for op, sector, count in ops[:8]:
        b += struct.pack("<BHB", op, sector, count)
    return b + b"\0" * (33 - len(b))

READS = [(0, 0, 8), (1, 16, 16), (0, 1024, 8), (0, 128, 1)]
WRITES = [(2, 0, 8), (0, 0, 8), (3, 32, 8), (4, 64, 8), (5, 0, 0), (1, 0, 16)]

# ---- a dynamic VHD with 4 KiB blocks (qemu-img only makes 2 MiB ones) ----
def csum(b):
    return (~sum(b)) & 0xffffffff

def vhd_footer(size, dtype, data_offset):
    f = bytearray(512)
    f[0:8] = b"conectix"
    struct.pack_into(">IIQ", f, 8, 2, 0x00010000, data_offset)
    f[28:32] = b"qemu"
    struct.pack_into(">I4sQQ", f, 32, 0x00050003, b"Wi2k", size, size)
    heads, spt = 4, 16
    cyl = size // 512 // (heads * spt)
    struct.pack_into(">HBB", f, 56, cyl, heads, spt)
    struct.pack_into(">I", f, 60, dtype)
    struct.pack_into(">I", f, 64, csum(f))
    return bytes(f)

def dyn_vhd(size=64 * 1024, block=4096, alloc=(0, 5)):
    entries = size // block
    footer = vhd_footer(size, 3, 512)
    hdr = bytearray(1024)
    hdr[0:8] = b"cxsparse"
    bat_off = 512 + 1024
    bat_len = (entries * 4 + 511) // 512 * 512
    struct.pack_into(">QQIII", hdr, 8, 0xffffffffffffffff, bat_off, 0x00010000, entries, block)
    struct.pack_into(">I", hdr, 36, csum(hdr))
    bat = bytearray(b"\xff" * bat_len)
    body = b""
    next_sector = (bat_off + bat_len) // 512
    for i in alloc:
        struct.pack_into(">I", bat, i * 4, next_sector)
        body += b"\xff" * 512 + bytes([0x70 + i]) * block
        next_sector += 1 + block // 512
    return footer + bytes(hdr) + bytes(bat) + body + footer

def diff_vhd(locators, name="parent.vhd", size=64 * 1024, block=4096, alloc=((1, 0x0f),)):
    """A differencing VHD over the harness's parent.vhd (unique id a5 * 16): locators are
    (code, bytes); alloc lists (block, first bitmap byte) of allocated blocks."""
    entries = size // block
    f = bytearray(vhd_footer(size, 4, 512))
    f[28:32] = b"win "
    f[68:84] = b"\x5c" * 16
    struct.pack_into(">I", f, 64, 0)
    struct.pack_into(">I", f, 64, csum(f))
    hdr = bytearray(1024)
    hdr[0:8] = b"cxsparse"
    bat_off = 512 + 1024
    bat_len = (entries * 4 + 511) // 512 * 512
    struct.pack_into(">QQIII", hdr, 8, 0xffffffffffffffff, bat_off, 0x00010000, entries, block)
    hdr[40:56] = b"\xa5" * 16
    enc = name.encode("utf-16-be")
    hdr[64:64 + len(enc)] = enc
    loc_off = bat_off + bat_len
    locs = b""
    for k, (code, data) in enumerate(locators):
        space = (len(data) + 511) // 512 * 512
        struct.pack_into(">4sIII Q".replace(" ", ""), hdr, 576 + 24 * k, code, space // 512,
                         len(data), 0, loc_off + len(locs))
        locs += data.ljust(space, b"\0")
    struct.pack_into(">I", hdr, 36, csum(hdr))
    bat = bytearray(b"\xff" * bat_len)
    body = b""
    next_sector = (loc_off + len(locs)) // 512
    for i, bm in alloc:
        struct.pack_into(">I", bat, i * 4, next_sector)
        body += bytes([bm]) + b"\0" * 511 + bytes([0x90 + i]) * block
        next_sector += 1 + block // 512
    return bytes(f) + bytes(hdr) + bytes(bat) + locs + body + bytes(f)

# ---- virtqueue layouts (ferrovm_fuzz::build_queue) ----
def desc(addr_word, length, flags, nxt):
    # mode 0: DATA_BASE + addr_word * 4
    return struct.pack("<BHHBB", 0, addr_word, length, flags, nxt)

NEXT, WRITE, INDIRECT = 1, 2, 4

def queue(descs, heads, blob):
    b = bytes([len(descs)]) + b"".join(descs)
    b += bytes([len(heads)]) + bytes(heads) + b"\0"
    return b + blob

def blk_req(rtype, sector, data_len, write_data):
    # header at 0x1000, data at 0x1000 + 0x40*4 = 0x1100, status at 0x1000 + 0x400*4
    descs = [desc(0, 16, NEXT, 1)]
    if data_len:
        descs.append(desc(0x40, data_len, NEXT | (WRITE if write_data else 0), 2))
        descs.append(desc(0x400, 1, WRITE, 0))
    else:
        descs.append(desc(0x400, 1, WRITE, 0))
    blob = struct.pack("<IIQ", rtype, 0, sector)
    return descs, blob

def main():
    import subprocess  # noqa: F401  (qemu-img seeds are made by scripts/fuzz --make-seeds)
    put("vhd", "dynamic-4k-blocks", script(True, WRITES) + dyn_vhd())
    put("vhd", "dynamic-ro", script(False, READS) + dyn_vhd(alloc=(1, 2, 3)))
    w2ru = ("W2ru".encode(), ".\\parent.vhd".encode("utf-16-le"))
    macx = ("MacX".encode(), b"file://./parent.vhd")
    put("vhd", "differencing-w2ru", script(True, WRITES) + diff_vhd([w2ru, macx]))
    put("vhd", "differencing-name-ro", script(False, READS) + diff_vhd([], alloc=((0, 0xf0), (2, 0x81))))
    fixed = 16 * 1024
    put("vhd", "fixed-16k", script(True, WRITES) + bytes(range(256)) * (fixed // 256)
        + vhd_footer(fixed, 2, 0xffffffffffffffff))

    # virtio_blk: opts byte (bit0 event_idx, bit1 serial, bits2-3 disk kind) + queue
    for name, (rtype, sec, dlen, w) in {
        "read": (0, 2, 1024, True),
        "write": (1, 4, 512, False),
        "flush": (4, 0, 0, False),
        "get-id": (8, 0, 20, True),
        "discard": (11, 0, 16, False),
        "write-zeroes": (13, 0, 16, False),
    }.items():
        descs, blob = blk_req(rtype, sec, dlen, w)
        if rtype in (11, 13):
            blob = blob.ljust(0x100, b"\0") + struct.pack("<QII", 8, 8, 0)
        put("virtio_blk", name, bytes([0x08 | 2]) + queue(descs, [0], blob))
    # an indirect chain: head points at a table of 3 descriptors in the blob (at 0x1200)
    table = struct.pack("<QIHH", 0x1000, 16, NEXT, 1) + struct.pack("<QIHH", 0x1100, 512, NEXT | WRITE, 2) \
        + struct.pack("<QIHH", 0x2000, 1, WRITE, 0)
    blob = struct.pack("<IIQ", 0, 0, 0).ljust(0x200, b"\0") + table
    put("virtio_blk", "indirect", bytes([0x09]) + queue([desc(0x80, 48, INDIRECT, 0)], [0], blob))

    # virtio_scsi: opts byte, then a request queue: command header (51 bytes: LUN target 0,
    # CDB) at 0x1000, response (108 bytes) at 0x1100, data-in at 0x1200.
    def scsi_cmd(cdb, data_len, target=0):
        hdr = bytes([1, target, 0x40, 0]) + bytes(15) + bytes(cdb).ljust(32, b"\0")
        descs = [desc(0, 51, NEXT, 1), desc(0x40, 108, WRITE | (NEXT if data_len else 0), 2)]
        if data_len:
            descs.append(desc(0x80, data_len, WRITE, 0))
        return descs, hdr
    for name, (cdb, dlen, target) in {
        "inquiry": ([0x12, 0, 0, 0, 36], 36, 0),
        "read10": ([0x28, 0, 0, 0, 0, 3, 0, 0, 1], 2048, 0),
        "report-luns": ([0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16], 16, 0),
        "read-toc-msf": ([0x43, 2, 0, 0, 0, 0, 0, 0, 100], 100, 0),
        "mode-sense10": ([0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 128], 128, 0),
        "bad-target": ([0x00], 0, 7),
    }.items():
        descs, blob = scsi_cmd(cdb, dlen, target)
        put("virtio_scsi", name, b"\0" + queue(descs, [0], blob))
    # a task management request on the control queue: type 0, subtype 5 (LUN reset)
    tmf = struct.pack("<II", 0, 5) + bytes([1, 0, 0x40, 0, 0, 0, 0, 0]) + bytes(8)
    put("virtio_scsi", "tmf-lun-reset", b"\2" + queue([desc(0, 24, NEXT, 1), desc(0x40, 1, WRITE, 0)], [0], tmf))
    # driver-set sense_size 18 and cdb_size 16
    descs, blob = scsi_cmd([0x25], 8)
    put("virtio_scsi", "small-sizes", bytes([0x0c]) + struct.pack("<II", 18, 16) + queue(
        [desc(0, 35, NEXT, 1), desc(0x40, 30, WRITE | NEXT, 2), desc(0x80, 8, WRITE, 0)], [0],
        bytes([1, 0, 0x40, 0]) + bytes(15) + bytes([0x25]).ljust(16, b"\0")))

    # virtio_rng: event_idx byte + queue of two writable buffers
    put("virtio_rng", "two-buffers", b"\1" + queue([desc(0, 64, WRITE | NEXT, 1), desc(0x100, 32, WRITE, 0)], [0], b""))

    # virtio_net: features, backend, RX layout, TX layout, frames
    rx = queue([desc(0, 1526, WRITE, 0), desc(0x200, 1526, WRITE, 0)], [0, 1], b"")
    txhdr = bytes(12)
    tx = queue([desc(0x1000, 12, NEXT, 1), desc(0x1010, 60, 0, 0)], [0], b"")
    frame = b"\0" * 12 + b"\xff" * 6 + b"\x52\x54\0\1\2\3" + b"\x08\x00" + b"E" * 46
    put("virtio_net", "rx-tx", bytes([0x03, 0x03]) + rx + tx + struct.pack("<H", len(frame)) + frame)
    csum_hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 16, 1)
    put("virtio_net", "tx-csum", bytes([0x05, 0x02]) + queue([], [], b"") +
        queue([desc(0x1000, 72, 0, 0)], [0], b"") )

    # virtio_pci: device, op count, ops (kind, target, offset u16, value u64), memory
    def op(kind, size_log, write, offset, value, target=0):
        k = kind | size_log << 4 | (0x40 if write else 0)
        return struct.pack("<BBHQ", k, target, offset, value)
    CFG, BAR = 0, 2
    common = lambda off: 0 << 8 | off
    ops = [
        op(CFG, 1, True, 0x04, 0x0006),          # command: memory + bus master
        op(CFG, 2, False, 0x10, 0),               # BAR0 low
        op(CFG, 2, True, 0x10, 0xffffffff),       # BAR sizing
        op(CFG, 2, False, 0x10, 0),
        op(CFG, 2, True, 0x10, 0xc0000000),       # BAR back
        op(CFG, 0, False, 0x34, 0),               # capability pointer
        op(BAR, 0, True, common(0x14), 1),        # ACKNOWLEDGE
        op(BAR, 0, True, common(0x14), 3),        # DRIVER
        op(BAR, 2, True, common(0x00), 1),        # device_feature_select = 1
        op(BAR, 2, False, common(0x04), 0),
        op(BAR, 2, True, common(0x08), 1),        # driver_feature_select = 1
        op(BAR, 2, True, common(0x0c), 1),        # VERSION_1
        op(BAR, 0, True, common(0x14), 0xb),      # FEATURES_OK
        op(BAR, 1, True, common(0x16), 0),        # queue_select 0
        op(BAR, 1, True, common(0x18), 16),       # queue_size
        op(BAR, 3, True, common(0x20), 0x0),      # desc
        op(BAR, 3, True, common(0x28), 0x100),    # driver (avail)
        op(BAR, 3, True, common(0x30), 0x200),    # device (used)
        op(BAR, 1, True, common(0x1c), 1),        # queue_enable
        op(BAR, 1, True, common(0x16), 1),        # queue_select 1 (net TX / absent)
        op(BAR, 1, True, common(0x18), 16),
        op(BAR, 3, True, common(0x20), 0x800),
        op(BAR, 3, True, common(0x28), 0x900),
        op(BAR, 3, True, common(0x30), 0xa00),
        op(BAR, 1, True, common(0x1c), 1),
        op(BAR, 2, True, 4 << 8 | 0x00, 0xfee00000),  # MSI-X entry 0 address
        op(BAR, 2, True, 4 << 8 | 0x08, 0x30),        # data
        op(BAR, 2, True, 4 << 8 | 0x0c, 0),           # unmask
        op(BAR, 0, True, common(0x14), 0xf),      # DRIVER_OK
        op(BAR, 1, True, 3 << 8 | 0, 0),          # notify queue 0
        op(BAR, 0, False, 1 << 8 | 0, 0),         # ISR
        op(BAR, 2, False, 2 << 8 | 0, 0),         # device config
        op(4, 2, False, 0x00, 0),                 # CF8/CFC vendor/device
        op(5, 2, False, 0x08, 0),                 # ECAM class
        op(6, 0, False, common(0x14), 0),         # status through the MMIO window
        op(BAR, 0, True, common(0x14), 0),        # reset
    ]
    # memory: queue 0 at 0 with one writable descriptor available
    mem = bytearray(0x1000)
    struct.pack_into("<QIHH", mem, 0, 0x1000, 64, WRITE, 0)
    struct.pack_into("<HHH", mem, 0x100, 0, 1, 0)
    for dev in range(3):
        put("virtio_pci", f"init-dev{dev}", bytes([dev, len(ops)]) + b"".join(ops) + bytes(mem))

    # fw_cfg: op count, ops (kind, offset, value u64), memory
    def fop(write, size_log, offset, value):
        return struct.pack("<BBQ", (1 if write else 0) | size_log << 1, offset, value)
    ops = [fop(True, 1, 0, 0x0000)] + [fop(False, 0, 1, 0)] * 4 + [
        fop(True, 1, 0, 0x19), fop(False, 2, 1, 0), fop(False, 2, 4, 0),
        # DMA: control=select(0x19)|SELECT|READ at 0x100, len 64, address 0x200
        fop(True, 2, 4, 0), fop(True, 2, 8, 0x100 .to_bytes(4, "big")[::-1] and int.from_bytes((0x100).to_bytes(4, "big"), "little")),
    ]
    mem = bytearray(0x400)
    struct.pack_into(">IIQ", mem, 0x100, 0x19 << 16 | 0x08 | 0x02, 64, 0x200)
    put("fw_cfg", "signature-dir-dma", bytes([len(ops)]) + b"".join(ops) + bytes(mem))

    # legacy_pio: keyboard byte, cmos sizes, ops (kind, dev, off, value u64)
    def lop(write, size_log, dev, off, value):
        return struct.pack("<BBBQ", (1 if write else 0) | size_log << 1, dev, off, value)
    ops = [
        lop(True, 0, 0, 3, 0x80), lop(True, 0, 0, 0, 1), lop(True, 0, 0, 1, 0), lop(True, 0, 0, 3, 3),
        lop(True, 0, 0, 0, ord("h")), lop(False, 0, 0, 5, 0), lop(True, 0, 0, 1, 0x0f),
        lop(False, 0, 5, 0, 0x41), lop(False, 0, 0, 0, 0),
        lop(True, 0, 1, 4, 0x20), lop(False, 0, 1, 0, 0), lop(True, 0, 1, 4, 0x60), lop(True, 0, 1, 0, 0x47),
        lop(True, 0, 1, 4, 0xae), lop(False, 0, 1, 4, 0),
        lop(True, 0, 2, 0, 0x0b), lop(False, 0, 2, 1, 0), lop(True, 0, 2, 0, 0x01), lop(True, 0, 2, 1, 0x30),
        lop(True, 0, 2, 0, 0x0b), lop(True, 0, 2, 1, 0x26), lop(True, 0, 2, 0, 0x0c), lop(False, 0, 2, 1, 0),
        lop(False, 1, 3, 0, 0), lop(True, 1, 3, 2, 0x0400), lop(False, 2, 3, 8, 0), lop(True, 1, 3, 4, 1),
        lop(True, 1, 3, 4, 0x2000 | 1 << 10), lop(True, 0, 4, 0, 0x02),
    ]
    put("legacy_pio", "serial-kbd-rtc-pm", b"\1" + struct.pack("<II", 1 << 20, 0) + b"".join(ops))

    # kernel_loader / multiboot: a multiboot a.out-kludge kernel at 1 MiB
    hdr = struct.pack("<III", 0x1BADB002, 0x00010003, (-(0x1BADB002 + 0x00010003)) & 0xffffffff)
    hdr += struct.pack("<IIIII", 0x100000, 0x100000, 0x100000 + 0x200, 0x100000 + 0x1000, 0x100020)
    mb = hdr.ljust(0x200, b"\x90")
    put("kernel_loader", "multiboot-kludge", mb)
    put("multiboot", "kludge", b"\x02" + mb)
    # a minimal bzImage: setup_sects 1, HdrS, protocol 2.15, XLF_KERNEL_64, init_size 64 KiB
    bz = bytearray(0x400 + 0x200)
    bz[0x1f1] = 1
    struct.pack_into("<I", bz, 0x1f4, 0x200 // 16)
    struct.pack_into("<H", bz, 0x1fe, 0xaa55)
    bz[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", bz, 0x206, 0x020f)
    bz[0x211] = 1  # LOADED_HIGH
    struct.pack_into("<I", bz, 0x214, 0x100000)
    struct.pack_into("<I", bz, 0x230, 0x200000)
    struct.pack_into("<H", bz, 0x236, 1)
    struct.pack_into("<I", bz, 0x260, 0x10000)
    put("kernel_loader", "bzimage-min", bytes(bz))
    # a minimal ELF64 with one PT_LOAD at 1 MiB and a PVH note
    def elf(pvh):
        eh = 64; ph = 56
        nphdr = 2 if pvh else 1
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100010) if pvh else b""
        body_off = eh + ph * nphdr
        code = b"\xf4" * 32
        img = bytearray()
        img += b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
        img += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, eh, 0, 0, eh, ph, nphdr, 64, 0, 0)
        img += struct.pack("<IIQQQQQQ", 1, 5, body_off, 0x100000, 0x100000, len(code), len(code) + 0x100, 0x1000)
        if pvh:
            img += struct.pack("<IIQQQQQQ", 4, 4, body_off + len(code), 0, 0, len(note), len(note), 4)
        img += code + note
        return bytes(img)
    put("kernel_loader", "elf-64", elf(False))
    put("kernel_loader", "elf-pvh", elf(True))

    # initramfs: low RAM 8 MiB, no extra regions, kernel end 2 MiB, no limit, 64 KiB file
    put("initramfs", "8m-64k", struct.pack("<HB", 2047, 0) + bytes([0]) + struct.pack("<I", 0x200000)
        + bytes([2]) + struct.pack("<I", 0x10000) + b"070701")

    # iommu: the kvm-unit-tests init sequence (QI, root table, IR table, TE, IRE), a context
    # entry for 00:02.0 (sid 0x10) with IOVA 0 -> 0x6000, IRTE 1 (vector 0xee), edu DMA both
    # ways, a remap of handle 1, an IOAPIC entry in remappable format and its line raised.
    REGS = [0x00, 0x08, 0x10, 0x18, 0x1c, 0x20, 0x28, 0x34, 0x38, 0x3c, 0x40, 0x44, 0x80, 0x88,
            0x90, 0x9c, 0xa0, 0xa4, 0xa8, 0xb8, 0x200, 0x208, 0x220, 0x228]
    def vw(reg, val, size=3):      # VT-d register write (size index: 2 = 4 bytes, 3 = 8)
        return struct.pack("<BHQ", 1 | size << 4, REGS.index(reg), val)
    def edu(off, val):
        return struct.pack("<BHQ", 4 | 2 << 4, off << 1 | 1, val)
    def io(off, val):
        return struct.pack("<BHQ", 2 | 2 << 4, off << 1 | 1, val)
    ops = vw(0x90, 0x7000) + vw(0x18, 1 << 26, 2) + vw(0x20, 0x1000) + vw(0x18, 1 << 30, 2)
    ops += vw(0xb8, 0x8000 | 7) + vw(0x18, 1 << 24, 2) + vw(0x18, 1 << 31 | 1 << 26, 2)
    ops += vw(0x18, 1 << 31 | 1 << 26 | 1 << 25, 2)
    ops += edu(0x80, 0) + edu(0x88, 0x40000) + edu(0x90, 4) + edu(0x98, 1)
    ops += edu(0x80, 0x40000) + edu(0x88, 4) + edu(0x90, 4) + edu(0x98, 3)
    ops += struct.pack("<BHQ", 7, 0x10, 0xee_0000_0000 | 1 << 4 | 1 << 5)
    ops += io(0, 0x11 + 2 * 18) + io(0x10, 0x00050000) + io(0, 0x10 + 2 * 18) + io(0x10, 0xed)
    ops += struct.pack("<BHQ", 3, 18, 1)
    ram = bytearray(0x9000)
    struct.pack_into("<QQ", ram, 0x1000, 0x2000 | 1, 0)              # root entry, bus 0
    struct.pack_into("<QQ", ram, 0x2000 + 16 * 0x10, 0x3000 | 1, 1 | 1 << 8)  # ctx 00:02.0
    struct.pack_into("<Q", ram, 0x3000, 0x4000 | 3)
    struct.pack_into("<Q", ram, 0x4000, 0x5000 | 3)
    struct.pack_into("<Q", ram, 0x5000, 0x6000 | 3)                  # IOVA 0 -> 0x6000
    struct.pack_into("<QQ", ram, 0x8000 + 16, 1 | 0xee << 16, 0x10 | 1 << 18)  # IRTE 1
    struct.pack_into("<QQ", ram, 0x8000 + 32, 1 | 0xed << 16, 0)               # IRTE 2
    put("iommu", "kut-init", struct.pack("<H", len(ops)) + ops + bytes(ram))

if __name__ == "__main__":
    main()
