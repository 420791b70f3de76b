#!/usr/bin/env bash
# guest-images/build-iso.sh - a bootable hybrid BIOS+UEFI ISO of a built guest flavor.
#
#   guest-images/build-iso.sh [FLAVOR-DIR]      (default: guest-images/out/default)
#
# Writes FLAVOR-DIR/boot.iso with grub-mkrescue (Debian's grub-common, grub-pc-bin,
# grub-efi-amd64-bin, xorriso, mtools; no loop mounts): El Torito and an MBR for BIOS, an
# EFI system partition image for UEFI, GRUB on the serial console, the flavor's stock kernel
# and initramfs, plus a small second initramfs with /fw-check.sh. Menu:
#   0  "ferrovm guest: shell"                      (default after 5 s)
#   1  "ferrovm guest: check and power off" (key p) prints FW-CHECK mem_kb= cpus= disks= nics=
#                                                   then powers off (ferrovm.test=/fw-check.sh)
#   2  "power off" (key h)                          GRUB's halt
#   3  "reboot" (key r)                             GRUB's reboot
# Cached: rebuilt only when this script, the kernel, the initramfs or GRUB change.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:-$HERE/out/default}
die() { echo "build-iso.sh: $*" >&2; exit 1; }
[[ -f $DIR/bzImage && -f $DIR/initramfs.cpio.gz ]] || die "$DIR has no bzImage/initramfs.cpio.gz (run guest-images/build.sh first)"
for t in grub-mkrescue xorriso mformat cpio; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools cpio)"
done
[[ -d /usr/lib/grub/i386-pc ]] || die "/usr/lib/grub/i386-pc missing: apt-get install grub-pc-bin"
[[ -d /usr/lib/grub/x86_64-efi ]] || die "/usr/lib/grub/x86_64-efi missing: apt-get install grub-efi-amd64-bin"

STAMP=$( { sha256sum <"${BASH_SOURCE[0]}"; sha256sum "$DIR/bzImage" "$DIR/initramfs.cpio.gz";
           dpkg-query -W -f='${Version}\n' grub-pc-bin grub-efi-amd64-bin 2>/dev/null; } | sha256sum | cut -d' ' -f1)
if [[ -f $DIR/boot.iso && -f $DIR/.iso-stamp && $(cat "$DIR/.iso-stamp") == "$STAMP" ]]; then
    echo "guest-images: boot.iso up to date (cached)"
    exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/iso/boot/grub" "$WORK/check"
cp "$DIR/bzImage" "$DIR/initramfs.cpio.gz" "$WORK/iso/boot/"
cat >"$WORK/check/fw-check.sh" <<'CHECK'
# What the guest sees, on one line; the init prints FERROVM-TEST-EXIT and powers off after.
mem=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
cpus=$(grep -c '^processor' /proc/cpuinfo)
disks=$(ls /sys/block | grep -v '^loop\|^ram' | tr '\n' ',')
nics=$(ls /sys/class/net | grep -v '^lo$' | tr '\n' ',')
# A CD-ROM drive (--cdrom): mount it and hash a file the ISO carries.
cd_sha=none
if [ -b /dev/sr0 ]; then
    mkdir -p /cd && mount -t iso9660 -o ro /dev/sr0 /cd && {
        cd_sha=$(sha256sum /cd/boot/bzImage | cut -d' ' -f1); umount /cd; }
fi
echo "FW-CHECK mem_kb=$mem cpus=$cpus disks=$disks nics=$nics cd_sha=$cd_sha cmdline=$(cat /proc/cmdline)"
CHECK
(cd "$WORK/check" && echo fw-check.sh | cpio -o -H newc --quiet --owner=0:0 >"$WORK/iso/boot/fw-check.cpio")
cat >"$WORK/iso/boot/grub/grub.cfg" <<'CFG'
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=5
set default=0
menuentry "ferrovm guest: shell" {
    linux /boot/bzImage console=ttyS0 reboot=k panic=1
    initrd /boot/initramfs.cpio.gz
}
menuentry "ferrovm guest: check and power off" --hotkey=p {
    linux /boot/bzImage console=ttyS0 reboot=k panic=1 ferrovm.test=/fw-check.sh
    initrd /boot/initramfs.cpio.gz /boot/fw-check.cpio
}
menuentry "power off" --hotkey=h {
    halt
}
menuentry "reboot" --hotkey=r {
    reboot
}
CFG
grub-mkrescue -o "$WORK/boot.iso" "$WORK/iso" -- -volid FERROVM_BOOT >"$WORK/mkrescue.log" 2>&1 \
    || { cat "$WORK/mkrescue.log" >&2; die "grub-mkrescue failed"; }
mv "$WORK/boot.iso" "$DIR/boot.iso"
echo "$STAMP" >"$DIR/.iso-stamp"
echo "guest-images: built $(basename "$(readlink -f "$DIR")")/boot.iso ($(stat -c %s "$DIR/boot.iso") bytes)"
