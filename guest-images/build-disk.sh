#!/usr/bin/env bash
# guest-images/build-disk.sh - an installed Debian system on a GPT disk image, for firmware boots.
#
#   guest-images/build-disk.sh [FLAVOR-DIR]      (default: guest-images/out/default)
#
# Writes FLAVOR-DIR/debian-disk.img (raw, sparse) without loop mounts:
#   partition 1  BIOS boot (1 MiB): GRUB's core.img, embedded by grub-bios-setup
#   partition 2  EFI system (32 MiB, FAT): EFI/BOOT/BOOTX64.EFI (GRUB for x86_64-efi)
#   partition 3  ext4 "ferrodebian": Debian bookworm from debootstrap (minbase + systemd-sysv,
#                udev, procps), root password empty, the flavor's stock kernel as
#                /boot/vmlinuz with ferrovm's initramfs as /boot/initrd.img (it mounts
#                root=LABEL=ferrodebian and starts systemd), /boot/grub/grub.cfg on the
#                serial console (GRUB finds the root by its label, both firmwares the same way).
# The MBR carries GRUB's boot.img (BIOS); the GPT is what OVMF reads. Debian packages only:
# debootstrap, fdisk (sfdisk), dosfstools, mtools, e2fsprogs, grub-pc-bin, grub-efi-amd64-bin.
# Cached: rebuilt only when this script, the kernel, the initramfs or GRUB change.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-$HERE/out/default}
SUITE=${FERROVM_DEBIAN_SUITE:-bookworm}
MIRROR=${FERROVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LABEL=ferrodebian
die() { echo "build-disk.sh: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot)"
[[ -f $DIR/bzImage && -f $DIR/initramfs.cpio.gz ]] || die "$DIR has no bzImage/initramfs.cpio.gz (run guest-images/build.sh first)"
for t in debootstrap sfdisk mkfs.vfat mcopy mkfs.ext4 e2fsck grub-mkimage; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install debootstrap fdisk dosfstools mtools e2fsprogs grub-pc-bin grub-efi-amd64-bin)"
done
[[ -f /usr/lib/grub/i386-pc/boot.img ]] || die "/usr/lib/grub/i386-pc missing: apt-get install grub-pc-bin"
[[ -d /usr/lib/grub/x86_64-efi ]] || die "/usr/lib/grub/x86_64-efi missing: apt-get install grub-efi-amd64-bin"

STAMP=$( { sha256sum <"${BASH_SOURCE[0]}"; sha256sum "$DIR/bzImage" "$DIR/initramfs.cpio.gz"; echo "$SUITE";
           dpkg-query -W -f='${Version}\n' grub-pc-bin grub-efi-amd64-bin 2>/dev/null; } | sha256sum | cut -d' ' -f1)
if [[ -f $DIR/debian-disk.img && -f $DIR/.disk-stamp && $(cat "$DIR/.disk-stamp") == "$STAMP" ]]; then
    echo "guest-images: debian-disk.img up to date (cached)"
    exit 0
fi
WORK=$(mktemp -d "$HERE/out/.disk.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

echo "== debootstrap $SUITE (minbase + systemd)" >&2
ROOT=$WORK/root
debootstrap --variant=minbase --include=systemd-sysv,udev,procps "$SUITE" "$ROOT" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
chroot "$ROOT" passwd -d root >/dev/null
# /sbin/init -> /lib/systemd/systemd is absolute: ferrovm's initramfs checks it before
# switch_root, where an absolute link points into the initramfs. Make it relative.
ln -sfn ../lib/systemd/systemd "$ROOT/usr/sbin/init"
echo ferrovm-debian >"$ROOT/etc/hostname"
echo "LABEL=$LABEL / ext4 defaults 0 1" >"$ROOT/etc/fstab"
rm -f "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages
mkdir -p "$ROOT/boot/grub"
cp "$DIR/bzImage" "$ROOT/boot/vmlinuz"
cp "$DIR/initramfs.cpio.gz" "$ROOT/boot/initrd.img"
cat >"$ROOT/boot/grub/grub.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=3
menuentry "Debian GNU/Linux ($SUITE, ferrovm disk image)" {
    search --no-floppy --label $LABEL --set=root
    linux /boot/vmlinuz root=LABEL=$LABEL rw console=ttyS0 panic=1
    initrd /boot/initrd.img
}
CFG

echo "== GRUB images" >&2
cat >"$WORK/early.cfg" <<CFG
search --no-floppy --label $LABEL --set=root
set prefix=(\$root)/boot/grub
configfile (\$root)/boot/grub/grub.cfg
CFG
MODS="part_gpt part_msdos ext2 fat search search_label normal linux configfile echo test serial terminal"
mkdir -p "$WORK/bios"
cp /usr/lib/grub/i386-pc/boot.img "$WORK/bios/"
grub-mkimage -O i386-pc -d /usr/lib/grub/i386-pc -o "$WORK/bios/core.img" -c "$WORK/early.cfg" \
    -p /boot/grub biosdisk $MODS
grub-mkimage -O x86_64-efi -d /usr/lib/grub/x86_64-efi -o "$WORK/BOOTX64.EFI" -c "$WORK/early.cfg" \
    -p /boot/grub $MODS

echo "== partitions" >&2
ESP_MIB=32
mkfs.vfat -C -n ESP "$WORK/esp.img" $((ESP_MIB * 1024)) >/dev/null
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$WORK/esp.img" "$WORK/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
kib=$(du -sk --apparent-size "$ROOT" | cut -f1)
root_mib=$((kib / 1024 + 384))
truncate -s "${root_mib}M" "$WORK/root.img"
mkfs.ext4 -q -F -L "$LABEL" -d "$ROOT" "$WORK/root.img"
e2fsck -fn "$WORK/root.img" >/dev/null 2>&1 || die "e2fsck of the root filesystem failed"

echo "== disk" >&2
# Sectors: GPT at 0..2047, BIOS boot 2048..4095, ESP, root, 1 MiB for the backup GPT.
esp_start=4096
root_start=$((esp_start + ESP_MIB * 2048))
total=$((root_start + root_mib * 2048 + 2048))
DISK=$WORK/debian-disk.img
truncate -s $((total * 512)) "$DISK"
sfdisk -q "$DISK" <<EOF
label: gpt
start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=bios
start=$esp_start, size=$((ESP_MIB * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp
start=$root_start, size=$((root_mib * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root
EOF
dd if="$WORK/esp.img" of="$DISK" bs=512 seek=$esp_start conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$DISK" bs=512 seek=$root_start conv=notrunc,sparse status=none
# GRUB for BIOS, as grub-bios-setup would embed it (it insists on probing the host device its
# directory lives on, so it is done by hand): boot.img's code in the MBR (the partition table
# stays), pointing at the BIOS boot partition; core.img there, its first sector's blocklist
# naming the rest (sector 2049, core_sectors - 1 sectors, loaded at 0x8200).
le() { # le VALUE BYTES: little-endian bytes as printf escapes
    local v=$1 n=$2 out=""
    for ((i = 0; i < n; i++)); do out+=$(printf '\\x%02x' $(((v >> (8 * i)) & 0xff))); done
    printf "$out"
}
patch() { dd of="$DISK" bs=1 seek="$1" conv=notrunc status=none; } # patch OFFSET < bytes
core_size=$(stat -c %s "$WORK/bios/core.img")
core_sectors=$(((core_size + 511) / 512))
((core_sectors <= 2048)) || die "core.img ($core_size bytes) does not fit the BIOS boot partition"
dd if="$WORK/bios/boot.img" of="$DISK" bs=440 count=1 conv=notrunc status=none
le 2048 8 | patch $((0x5c))          # GRUB_BOOT_MACHINE_KERNEL_SECTOR
printf '\x90\x90' | patch $((0x66))  # drive check: trust the BIOS's boot drive (hard disk)
dd if="$WORK/bios/core.img" of="$DISK" bs=512 seek=2048 conv=notrunc status=none
{ le 2049 8; le $((core_sectors - 1)) 2; le $((0x820)) 2; } | patch $((2048 * 512 + 500))
mv "$DISK" "$DIR/debian-disk.img"
echo "$STAMP" >"$DIR/.disk-stamp"
echo "guest-images: built debian-disk.img ($(du -h --apparent-size "$DIR/debian-disk.img" | cut -f1), $((SECONDS - START))s)"
