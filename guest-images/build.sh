#!/usr/bin/env bash
# guest-images/build.sh - build ferrovm guest images from stock Debian packages.
#
# Everything comes from `apt-get download` (the host's configured Debian/Ubuntu
# apt sources); nothing is compiled.  Outputs land in guest-images/out/<flavor>/
# (see README.md for the layout contract), downloaded .debs in guest-images/cache/.
# Run as root (needs mknod for /dev/console and chroot for the self-check).
set -Eeuo pipefail
shopt -s nullglob

PROG=build.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$HERE/out
CACHE=$HERE/cache
DEFAULT_KERNEL_PKG=linux-image-cloud-amd64
APT_OPTS=(-q -o APT::Sandbox::User=root)
# Virtio modules wanted in the L2 initramfs; their dependencies are added from
# the module metadata and the load order is computed (never hand-kept).
# vfat and its code pages read the cloud-init seed (--cloud-init, --ssh-key); virtiofs (fuse)
# mounts --fs shares, overlay lays a tmpfs over a read-only one, the vsock transport is --vsock,
# virtio_console is hvc0 (--console virtio); virtio_scsi, sr_mod and isofs read a --cdrom.
VIRTIO_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
                virtio_mmio virtio_blk failover net_failover virtio_net virtio_console
                virtio_scsi sr_mod isofs
                fat vfat nls_cp437 nls_utf8 nls_ascii
                fuse virtiofs overlay vsock vmw_vsock_virtio_transport_common
                vmw_vsock_virtio_transport)
# Userland for the rootfs; their shared-library packages are resolved from apt.
USERLAND_ROOTS=(fio iperf3 libiperf0 libc6)
USERLAND_BINS=(usr/bin/fio usr/bin/iperf3)

STEP="startup"
MAINPID=$$
WORK=""
START=$SECONDS

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }
on_err() {
    local rc=$1 line=$2
    # Subshells (command substitutions) just propagate; the main shell reports once.
    [[ $BASHPID == "$MAINPID" ]] || exit "$rc"
    echo "$PROG: step '$STEP' failed (exit $rc at line $line)" >&2
    exit "$rc"
}
trap 'on_err $? $LINENO' ERR
trap '[[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"' EXIT

usage() {
    cat <<EOF
Usage: guest-images/build.sh [--kernel-package NAME | --kernel 6.1|6.12] [--flavor NAME]

Builds guest-images/out/<flavor>/{bzImage,vmlinux,kernel-version,package-version,
modules/,initramfs.cpio.gz,rootfs.ext4,busybox,manifest.txt} from Debian packages
(apt-get download only, cached in guest-images/cache/).  Re-running with unchanged
inputs does nothing.

  --kernel-package NAME  kernel image package (default: $DEFAULT_KERNEL_PKG);
                         metapackages are resolved to the real linux-image-* package
  --kernel 6.1|6.12      alias: 6.1 = linux-image-cloud-amd64,
                         6.12 = linux-image-6.12-cloud-amd64
  --flavor NAME          output subdirectory (default: <major.minor>-<flavour>,
                         e.g. 6.1-cloud, 6.12-cloud)
  -h, --help             this text

out/default -> <flavor> is (re)pointed only when building $DEFAULT_KERNEL_PKG.
EOF
}

# ---------------------------------------------------------------- arguments
KERNEL_PKG=$DEFAULT_KERNEL_PKG
FLAVOR=""
while (($#)); do
    case $1 in
        --kernel-package) (($# >= 2)) || die "--kernel-package needs a value"; KERNEL_PKG=$2; shift 2 ;;
        --kernel-package=*) KERNEL_PKG=${1#*=}; shift ;;
        --kernel|--kernel=*)
            if [[ $1 == *=* ]]; then v=${1#*=}; shift; else (($# >= 2)) || die "--kernel needs a value"; v=$2; shift 2; fi
            case $v in
                6.1) KERNEL_PKG=linux-image-cloud-amd64 ;;
                6.12) KERNEL_PKG=linux-image-6.12-cloud-amd64 ;;
                *) die "unknown --kernel alias '$v' (known: 6.1, 6.12; or use --kernel-package)" ;;
            esac ;;
        --flavor) (($# >= 2)) || die "--flavor needs a value"; FLAVOR=$2; shift 2 ;;
        --flavor=*) FLAVOR=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -z $FLAVOR || $FLAVOR =~ ^[A-Za-z0-9._+-]+$ && $FLAVOR != default && $FLAVOR != .* ]] \
    || die "invalid --flavor '$FLAVOR'"
[[ $(id -u) == 0 ]] || die "must run as root (mknod, chroot, apt-get)"

# ---------------------------------------------------------------- apt helpers
# Candidate version of a package, empty if unknown/virtual.
candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/^  Candidate:/ { if ($2 != "(none)") print $2; exit }'
}

# ---------------------------------------------------------------- resolve kernel package
STEP="resolve kernel package"
[[ -n $(candidate "$KERNEL_PKG") ]] \
    || die "no such package in the configured apt sources: $KERNEL_PKG (try apt-cache search linux-image)"
# Follow metapackages (linux-image-cloud-amd64 -> linux-image-6.1.0-NN-cloud-amd64).
REAL_PKG=$KERNEL_PKG
for _ in 1 2 3 4; do
    mapfile -t next < <(apt-cache depends --no-recommends --no-suggests "$REAL_PKG" 2>/dev/null |
        awk '$1 ~ /^(Pre)?Depends:$/ && $2 ~ /^linux-image-/ { print $2 }' | sort -u)
    ((${#next[@]} == 1)) || break
    REAL_PKG=${next[0]}
done
# Kernel release as named by Debian's linux-image-<release>[-unsigned] convention.
KVER_GUESS=${REAL_PKG#linux-image-}; KVER_GUESS=${KVER_GUESS%-unsigned}
if [[ -z $FLAVOR ]]; then
    mm=$(grep -oE '^[0-9]+\.[0-9]+' <<<"$KVER_GUESS") || die "cannot derive a flavor from $REAL_PKG; pass --flavor"
    fl=$(sed -E 's/^[^-]*-([0-9]+-)?//; s/-amd64$//' <<<"$KVER_GUESS")
    FLAVOR="$mm-${fl:-amd64}"
fi

# ---------------------------------------------------------------- host tools
STEP="host tools"
declare -A TOOL_PKG=([mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [cpio]=cpio [lz4]=lz4 [zstd]=zstd
    [xz]=xz-utils [gzip]=gzip [depmod]=kmod [modinfo]=kmod [readelf]=binutils [tsort]=coreutils
    [ldconfig]=libc-bin [dpkg-deb]=dpkg [flock]=util-linux [sha256sum]=coreutils)
missing=()
for t in "${!TOOL_PKG[@]}"; do
    command -v "$t" >/dev/null 2>&1 || PATH=$PATH:/sbin:/usr/sbin command -v "$t" >/dev/null 2>&1 || missing+=("${TOOL_PKG[$t]}")
done
export PATH=$PATH:/usr/sbin:/sbin
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "$PROG: installing missing host tools: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

mkdir -p "$OUT" "$CACHE"
exec 9>"$OUT/.lock"
flock 9    # serialise concurrent builds (shared cache)

# ---------------------------------------------------------------- package set + download
STEP="resolve userland packages"
# Library closure of fio/iperf3: recursive Depends, keeping only shared-library
# packages (the ELF resolver below copies what is really needed and fails if a
# library is missing, so over-inclusion only costs download size).
mapfile -t USER_PKGS < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "${USERLAND_ROOTS[@]}" |
    grep -v '^[ <]' | sort -u |
    grep -E '^(fio|iperf3|lib.*|zlib1g)$' |
    grep -vE -- '-(perl|common|dev|bin|data|modules|modules-bin)$|^lib(perl|python|pam)')
ALL_PKGS=("$REAL_PKG" busybox-static "${USER_PKGS[@]}")

STEP="download packages"
# "pkg version arch" for each candidate, in one apt-cache call.
mapfile -t PKG_INFO < <(apt-cache show --no-all-versions "${ALL_PKGS[@]}" |
    awk '/^Package:/{p=$2} /^Version:/{v=$2} /^Architecture:/{a=$2} /^$/{ if (p) print p, v, a; p="" } END { if (p) print p, v, a }')
((${#PKG_INFO[@]} == ${#ALL_PKGS[@]})) || die "apt-cache show returned ${#PKG_INFO[@]} entries for ${#ALL_PKGS[@]} packages"
declare -A DEB=()      # pkg -> cached .deb path
declare -A VER=()      # pkg -> version
to_fetch=()
for line in "${PKG_INFO[@]}"; do
    read -r p v a <<<"$line"
    f="$CACHE/${p}_${v//:/%3a}_${a}.deb"
    DEB[$p]=$f; VER[$p]=$v
    [[ -s $f ]] || to_fetch+=("$p=$v")
done
if ((${#to_fetch[@]})); then
    log "downloading ${#to_fetch[@]} package(s) into cache/"
    (cd "$CACHE" && apt-get "${APT_OPTS[@]}" download "${to_fetch[@]}") >&2
fi
for p in "${ALL_PKGS[@]}"; do [[ -s ${DEB[$p]} ]] || die "download of $p ${VER[$p]} did not produce ${DEB[$p]}"; done

# ---------------------------------------------------------------- cache check
STEP="cache check"
DEST=$OUT/$FLAVOR
OUTPUTS=(bzImage vmlinux kernel-version package-version modules/modules.dep initramfs.cpio.gz rootfs.ext4 busybox manifest.txt)
STAMP=$( { sha256sum <"${BASH_SOURCE[0]}"; echo "$FLAVOR $KERNEL_PKG"; for p in "${ALL_PKGS[@]}"; do basename "${DEB[$p]}"; done | sort; } | sha256sum | cut -d' ' -f1)
up_to_date=1
[[ -f $DEST/.stamp && $(cat "$DEST/.stamp") == "$STAMP" ]] || up_to_date=0
for f in "${OUTPUTS[@]}"; do [[ -e $DEST/$f ]] || up_to_date=0; done

finish() {
    [[ $KERNEL_PKG == "$DEFAULT_KERNEL_PKG" ]] && ln -sfn "$FLAVOR" "$OUT/default"
    echo "guest-images/out/$FLAVOR ($REAL_PKG ${VER[$REAL_PKG]}):"
    awk '$1 == "file" { printf "  %-20s %12s  %s\n", $2, $3, $4 }' "$DEST/manifest.txt"
    echo "$1"
}
if ((up_to_date)); then
    finish "guest-images: up to date (cached) $FLAVOR in $((SECONDS - START))s"
    exit 0
fi

# ---------------------------------------------------------------- build
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
NEW=$WORK/out
mkdir -p "$NEW"
log "building $FLAVOR from $REAL_PKG ${VER[$REAL_PKG]}"

STEP="extract packages"
KX=$WORK/kernel; UX=$WORK/userland; BX=$WORK/busybox-pkg
dpkg-deb -x "${DEB[$REAL_PKG]}" "$KX"
dpkg-deb -x "${DEB[busybox-static]}" "$BX"
for p in "${USER_PKGS[@]}"; do dpkg-deb -x "${DEB[$p]}" "$UX"; done
kdirs=("$KX"/lib/modules/*/)
((${#kdirs[@]} == 1)) || die "expected exactly one lib/modules/<release> in $REAL_PKG, found ${#kdirs[@]}"
KVER=$(basename "${kdirs[0]}")
[[ -f $KX/boot/vmlinuz-$KVER ]] || die "$REAL_PKG has no /boot/vmlinuz-$KVER"
echo "$KVER" >"$NEW/kernel-version"
echo "$REAL_PKG ${VER[$REAL_PKG]}" >"$NEW/package-version"
cp "$KX/boot/vmlinuz-$KVER" "$NEW/bzImage"
BUSYBOX=$BX/bin/busybox
install -m 0755 "$BUSYBOX" "$NEW/busybox"

# --- vmlinux: decompress the bzImage payload located via the x86 boot header
# (setup_sects @0x1f1, payload_offset/payload_length @0x248/0x24c).  The last
# 4 bytes of the payload are the little-endian uncompressed size, which we check.
STEP="extract vmlinux"
u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
BZ=$NEW/bzImage
[[ $(od -An -c -j 0x202 -N4 "$BZ" | tr -d ' ') == HdrS ]] || die "bzImage has no HdrS boot header"
setup_sects=$(u8 "$BZ" $((0x1f1))); ((setup_sects)) || setup_sects=4
poff=$(( (setup_sects + 1) * 512 + $(u32 "$BZ" $((0x248))) ))
plen=$(u32 "$BZ" $((0x24c)))
dd if="$BZ" of="$WORK/payload" bs=1M iflag=skip_bytes,count_bytes skip="$poff" count="$plen" status=none
magic=$(od -An -tx1 -N4 "$WORK/payload" | tr -d ' \n')
case $magic in
    1f8b*)      dec=(gzip -dc) ;;
    fd377a58)   dec=(xz -dcq --single-stream) ;;
    28b52ffd)   dec=(zstd -dcq) ;;
    02214c18)   dec=(lz4 -dc) ;;            # LZ4 legacy frame (6.1 cloud kernel)
    425a68*)    dec=(bzip2 -dc) ;;
    5d0000*)    dec=(xz -dcq --format=lzma) ;;
    *) die "unknown bzImage payload compression (magic $magic)" ;;
esac
# Decompressors complain about the 4-byte size trailer; the size check is authoritative.
"${dec[@]}" <"$WORK/payload" >"$NEW/vmlinux" 2>/dev/null || true
want=$(u32 "$WORK/payload" $((plen - 4)))
got=$(stat -c %s "$NEW/vmlinux")
[[ $got == "$want" ]] || die "vmlinux: decompressed ${got} bytes with ${dec[0]}, header says ${want}"
[[ $(od -An -tx1 -N4 "$NEW/vmlinux" | tr -d ' \n') == 7f454c46 ]] || die "vmlinux is not an ELF file"
readelf -nW "$NEW/vmlinux" | grep -qE '^[[:space:]]*Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*(\(0x00000012\)|PHYS32)' \
    || die "vmlinux carries no PVH entry note (Xen ELF note type 18, XEN_ELFNOTE_PHYS32_ENTRY)"

# --- modules: the package's tree with plain .ko files, plus modules.dep from depmod.
STEP="modules"
MODROOT=$WORK/modroot
mkdir -p "$MODROOT/lib/modules"
cp -a "$KX/lib/modules/$KVER" "$MODROOT/lib/modules/"
MODDIR=$MODROOT/lib/modules/$KVER
find "$MODDIR" -name '*.ko.xz'  -exec xz -d {} +
find "$MODDIR" -name '*.ko.zst' -exec zstd -dq --rm {} +
find "$MODDIR" -name '*.ko.gz'  -exec gzip -d {} +
depmod -b "$MODROOT" "$KVER"
[[ -s $MODDIR/modules.dep ]] || die "depmod produced no modules.dep"
cp -a "$MODDIR" "$NEW/modules"

# --- virtio module closure + load order from `modinfo -F depends` (topological sort).
STEP="module order"
declare -A KO=()
while IFS= read -r -d '' f; do n=$(basename "$f" .ko); KO[${n//-/_}]=${f#"$MODDIR"/}; done \
    < <(find "$MODDIR" -name '*.ko' -print0)
builtin_mod() { grep -qE "/${1//_/[_-]}\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; }
declare -A SEEN=()
edges=()
queue=("${VIRTIO_MODULES[@]}")
while ((${#queue[@]})); do
    m=${queue[0]//-/_}; queue=("${queue[@]:1}")
    [[ -z ${SEEN[$m]:-} ]] || continue
    SEEN[$m]=1
    if [[ -z ${KO[$m]:-} ]]; then
        builtin_mod "$m" || echo "$PROG: warning: module $m is neither a module nor built into $KVER" >&2
        continue
    fi
    edges+=("$m $m")
    deps=$(modinfo -F depends "$MODDIR/${KO[$m]}")
    for d in ${deps//,/ }; do d=${d//-/_}; edges+=("$d $m"); queue+=("$d"); done
done
ORDER=()
for m in $(printf '%s\n' "${edges[@]}" | tsort); do
    if [[ -n ${KO[$m]:-} ]]; then ORDER+=("$m"); fi
done
log "initramfs module order: ${ORDER[*]:-(all built in)}"

# --- shared init script; STAGE=initramfs|rootfs is prepended.
write_init() { # $1=path $2=stage
    { echo '#!/bin/sh'; echo "STAGE=$2"; cat <<'INIT'; } >"$1"
# ferrovm guest init (generated by guest-images/build.sh; see guest-images/README.md).
# Markers on the console:
#   FERROVM-BOOT-OK uptime=<s> kernel=<release>[ root=<dev>]
#   FERROVM-TEST-EXIT status=<n>      after running ferrovm.test=PATH
#   FERROVM-ERROR <message>
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM="${TERM:-linux}"
mounted() { grep -qs " $1 " /proc/mounts; }
mkdir -p /proc /sys /dev /tmp /run /root /mnt
[ -e /proc/self ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
# With console=hvc0 and a modular virtio_console there is no /dev/console yet, and a failed
# redirection would end this shell: try it in a subshell first (again after the modules).
reopen_console() {
    if (: </dev/console >/dev/console) 2>/dev/null; then exec </dev/console >/dev/console 2>&1; fi
}
reopen_console
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=620 devpts /dev/pts
[ "$STAGE" = rootfs ] && { mounted /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp; mounted /run || mount -t tmpfs tmpfs /run; }
chmod 1777 /tmp
hostname ferrovm-guest 2>/dev/null
ip link set lo up 2>/dev/null

if [ "$STAGE" = initramfs ]; then
    while read -r ko; do
        case $ko in ''|'#'*) continue ;; esac
        if [ ! -f "$ko" ]; then echo "ferrovm-init: warning: module $ko missing, skipped"; continue; fi
        insmod "$ko" || echo "ferrovm-init: warning: insmod $ko failed"
    done </etc/modules.order
    reopen_console # console=hvc0: /dev/console exists now that virtio_console is loaded
    # The kernel does not replay its log on a console whose driver came as a module: show
    # what hvc0 missed.
    [ "$(cat /sys/class/tty/console/active 2>/dev/null)" = hvc0 ] && dmesg
fi

TEST='' ROOT='' FSTYPE=ext4 RWMODE=rw
set -f  # no globbing of kernel command-line words
# shellcheck disable=SC2013
for arg in $(cat /proc/cmdline); do
    case $arg in
        ferrovm.test=*) TEST=${arg#*=} ;;
        root=*) ROOT=${arg#root=} ;;
        rootfstype=*) FSTYPE=${arg#*=} ;;
        ro) RWMODE=ro ;;
        rw) RWMODE=rw ;;
    esac
done
set +f

halt_vm() { sync; poweroff -f; reboot -f; while :; do sleep 3600; done; }
marker() { echo "FERROVM-BOOT-OK uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)$1"; }
shell() {
    echo "ferrovm guest shell; 'poweroff -f' to stop"
    setsid cttyhack sh -l
    halt_vm
}
run_test() {
    if [ -f "$TEST" ]; then
        sh "$TEST"; status=$?
    else
        echo "FERROVM-ERROR test script $TEST not found"; status=127
    fi
    echo "FERROVM-TEST-EXIT status=$status"
    halt_vm
}

if [ "$STAGE" = initramfs ] && [ -n "$ROOT" ]; then
    # Hand over to the root filesystem; its /sbin/init prints the boot marker.
    case $ROOT in
        LABEL=*|UUID=*) spec=$ROOT; ROOT= ;;
        *) spec= ;;
    esac
    i=0
    while [ $i -lt 50 ]; do
        [ -n "$spec" ] && ROOT=$(findfs "$spec" 2>/dev/null)
        [ -n "$ROOT" ] && [ -b "$ROOT" ] && break
        usleep 100000; i=$((i + 1))
    done
    if [ -z "$ROOT" ] || [ ! -b "$ROOT" ]; then
        echo "FERROVM-ERROR root device ${ROOT:-$spec} not found"
        shell
    fi
    mkdir -p /newroot
    if ! mount -t "$FSTYPE" -o "$RWMODE" "$ROOT" /newroot; then
        echo "FERROVM-ERROR mounting root device $ROOT ($FSTYPE) failed"
        shell
    fi
    if [ ! -x /newroot/sbin/init ]; then
        echo "FERROVM-ERROR $ROOT has no executable /sbin/init"
        shell
    fi
    echo "ferrovm-init: switching to root $ROOT"
    for m in dev proc sys; do mkdir -p /newroot/$m; mount --move /$m /newroot/$m; done
    exec switch_root /newroot /sbin/init
fi

if [ "$STAGE" = rootfs ]; then
    marker " root=$(awk '$2 == "/" && $1 != "rootfs" { d = $1 } END { print d }' /proc/mounts)"
else
    marker ""
fi
[ -n "$TEST" ] && run_test
shell
INIT
    chmod 0755 "$1"
}

# Populate a tree with busybox and its applet links (never overriding existing files).
install_busybox() { # $1=root
    install -D -m 0755 "$BUSYBOX" "$1/bin/busybox"
    local a
    for a in $("$BUSYBOX" --list-full); do
        case $a in linuxrc|sbin/init|bin/busybox) continue ;; esac
        mkdir -p "$1/$(dirname "$a")"
        [[ -e $1/$a || -L $1/$a ]] || ln -s /bin/busybox "$1/$a"
    done
}

# Minimal /etc shared by both images.
write_etc() { # $1=root
    mkdir -p "$1/etc"
    echo 'root:x:0:0:root:/root:/bin/sh' >"$1/etc/passwd"
    printf 'root:x:0:\ntty:x:5:\n' >"$1/etc/group"
    printf '127.0.0.1\tlocalhost ferrovm-guest\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$1/etc/hosts"
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$1/etc/nsswitch.conf"
    echo ferrovm-guest >"$1/etc/hostname"
    cat >"$1/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
PS1='ferrovm# '
EOF
    mkdir -p "$1"/{proc,sys,dev,run,root,mnt,tmp}
    chmod 1777 "$1/tmp"; chmod 0700 "$1/root"
}

# --- L2 initramfs
STEP="initramfs"
IR=$WORK/initramfs
install_busybox "$IR"
write_etc "$IR"
mknod -m 600 "$IR/dev/console" c 5 1
mknod -m 666 "$IR/dev/null" c 1 3
: >"$IR/etc/modules.order"
for m in "${ORDER[@]}"; do
    install -D -m 0644 "$MODDIR/${KO[$m]}" "$IR/lib/modules/$KVER/${KO[$m]}"
    echo "/lib/modules/$KVER/${KO[$m]}" >>"$IR/etc/modules.order"
done
write_init "$IR/init" initramfs
(cd "$IR" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$NEW/initramfs.cpio.gz"
# Zero-pad to a 4-byte boundary: the kernel only accepts a further (appended,
# uncompressed newc) archive at a 4-aligned offset; gzip ignores trailing zeros.
sz=$(stat -c %s "$NEW/initramfs.cpio.gz")
truncate -s $(( (sz + 3) / 4 * 4 )) "$NEW/initramfs.cpio.gz"

# --- rootfs staging: busybox, init, modules, fio/iperf3 with their libraries.
STEP="rootfs staging"
RS=$WORK/rootfs
install_busybox "$RS"
write_etc "$RS"
write_init "$RS/sbin/init" rootfs
mkdir -p "$RS/lib/modules"
cp -a "$MODDIR" "$RS/lib/modules/$KVER"
install -d "$RS/usr/share/ferrovm"
cat >"$RS/usr/share/ferrovm/selftest.sh" <<'EOF'
#!/bin/sh
# ferrovm rootfs self-test: userland tools run and the CPUs are visible.
set -e
fio --version
iperf3 --version
echo "processors=$(grep -c ^processor /proc/cpuinfo)"
EOF
chmod 0755 "$RS/usr/share/ferrovm/selftest.sh"

# ELF dependency resolver over the extracted packages (no host libraries used).
declare -A SONAME=()
while IFS= read -r f; do
    b=${f##*/}; [[ -n ${SONAME[$b]:-} ]] || SONAME[$b]=$f
done < <(cd "$UX" && find lib lib64 usr/lib -name '*.so*' \( -type f -o -type l \) 2>/dev/null | LC_ALL=C sort)
# Resolve symlinks of a relative path inside a tree, never escaping it.
resolve_in() { # $1=root $2=relative path -> relative path of the real file
    local root=$1 rel=$2 t _
    for _ in 1 2 3 4 5 6 7 8; do
        [[ -L $root/$rel ]] || break
        t=$(readlink "$root/$rel")
        if [[ $t == /* ]]; then rel=$t; else rel=$(dirname "$rel")/$t; fi
        rel=$(realpath -ms "/$rel"); rel=${rel#/}
    done
    echo "$rel"
}
declare -A COPIED=()
copy_elf_closure() { # relative paths inside $UX
    local q=("$@") f n
    while ((${#q[@]})); do
        f=${q[0]}; q=("${q[@]:1}")
        [[ -z ${COPIED[$f]:-} ]] || continue
        COPIED[$f]=1
        [[ -e $UX/$f ]] || die "rootfs: $f not found in the extracted packages"
        install -D -m 0755 "$UX/$(resolve_in "$UX" "$f")" "$RS/$f"
        for n in $(readelf -dW "$UX/$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            [[ -n ${SONAME[$n]:-} ]] || die "rootfs: library $n (needed by $f) not found in downloaded packages"
            q+=("${SONAME[$n]}")
        done
    done
}
copy_elf_closure "${USERLAND_BINS[@]}"
# The dynamic loader at its ABI path (libc6's /lib64 symlink into the multiarch dir).
ldso=$(resolve_in "$UX" lib64/ld-linux-x86-64.so.2)
copy_elf_closure "$ldso"
mkdir -p "$RS/lib64"
ln -sfn "/$ldso" "$RS/lib64/ld-linux-x86-64.so.2"
printf '/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n' >"$RS/etc/ld.so.conf"
find "$RS/usr/lib" -mindepth 2 -maxdepth 2 -type d -path '*x86_64-linux-gnu/*' -printf '/usr/lib/x86_64-linux-gnu/%f\n' >>"$RS/etc/ld.so.conf"
ldconfig -r "$RS"
STEP="rootfs self-check (chroot fio/iperf3 --version)"
chroot "$RS" /usr/bin/fio --version >/dev/null || die "chroot $RS /usr/bin/fio --version failed"
chroot "$RS" /usr/bin/iperf3 --version >/dev/null || die "chroot $RS /usr/bin/iperf3 --version failed"

# --- rootfs.ext4 without mounting: mkfs.ext4 -d on a sparse file (content + 64 MiB).
STEP="rootfs.ext4"
kib=$(du -sk --apparent-size "$RS" | cut -f1)
inodes=$(find "$RS" | wc -l)
size_mib=$(( (kib + inodes * 4) / 1024 + 64 ))
truncate -s "${size_mib}M" "$NEW/rootfs.ext4"
mkfs.ext4 -q -F -L ferroroot -d "$RS" "$NEW/rootfs.ext4"
STEP="rootfs.ext4 fsck"
e2fsck -fn "$NEW/rootfs.ext4" >"$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log" >&2; die "e2fsck -fn rootfs.ext4 is not clean"; }

# --- manifest
STEP="manifest"
{
    echo "# ferrovm guest image manifest (guest-images/build.sh)"
    echo "flavor $FLAVOR"
    echo "kernel-request $KERNEL_PKG"
    echo "kernel-package $REAL_PKG ${VER[$REAL_PKG]}"
    echo "kernel-release $KVER"
    echo "initramfs-modules ${ORDER[*]}"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# file <name> <size-bytes> <sha256>   (modules/: total size; sha256 of its sha256sum listing)"
    for f in bzImage vmlinux kernel-version package-version initramfs.cpio.gz rootfs.ext4 busybox; do
        echo "file $f $(stat -c %s "$NEW/$f") $(sha256sum "$NEW/$f" | cut -d' ' -f1)"
    done
    msize=$(find "$NEW/modules" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
    mhash=$(cd "$NEW/modules" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
    echo "file modules/ $msize $mhash"
    echo "# package <name> <version>"
    for p in "${ALL_PKGS[@]}"; do echo "package $p ${VER[$p]}"; done
} >"$NEW/manifest.txt"
echo "$STAMP" >"$NEW/.stamp"

# --- publish atomically-ish: replace out/<flavor> with the new tree.
STEP="publish"
rm -rf "$DEST.old"
[[ -e $DEST ]] && mv "$DEST" "$DEST.old"
mv "$NEW" "$DEST"
rm -rf "$DEST.old"
finish "guest-images: built $FLAVOR in $((SECONDS - START))s"
