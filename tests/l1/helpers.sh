# Shell helpers sourced before every case script of the nested harness (in L1 and,
# in direct mode, on the host).  Env: FERROVM IMAGES FILES WORK FERROVM_TEST_MODE BUSYBOX.

# mkinitrd_with_test SCRIPT OUT [FILE...]
#   Writes OUT = $IMAGES/initramfs.cpio.gz + zero padding to 4 bytes + an uncompressed newc cpio holding
#   SCRIPT as /test.sh (mode 755) and each FILE at /<basename>.  Boot the L2 kernel with
#   "ferrovm.test=/test.sh" on its command line to run it.
mkinitrd_with_test() {
	_mk_src=$1 _mk_out=$2
	shift 2 || { echo "usage: mkinitrd_with_test SCRIPT OUT [FILE...]" >&2; return 2; }
	_mk_dir=$(mktemp -d "${WORK:-/tmp}/mkinitrd.XXXXXX") || return 1
	cp "$_mk_src" "$_mk_dir/test.sh" && chmod 755 "$_mk_dir/test.sh" || return 1
	for _mk_f; do cp "$_mk_f" "$_mk_dir/" || return 1; done
	cat "$IMAGES/initramfs.cpio.gz" > "$_mk_out" || return 1
	# the kernel only finds a cpio header at a 4-byte aligned offset; zeros are skipped
	_mk_pad=$(( (4 - $(wc -c < "$_mk_out") % 4) % 4 ))
	[ "$_mk_pad" -eq 0 ] || head -c "$_mk_pad" /dev/zero >> "$_mk_out" || return 1
	(cd "$_mk_dir" && ls -A | "${BUSYBOX:-busybox}" cpio -o -H newc 2>/dev/null) >> "$_mk_out" || return 1
	rm -rf "$_mk_dir"
}

# kvm_debugfs: print the global KVM counters (/sys/kernel/debug/kvm/*), "name value" per line.
kvm_debugfs() {
	for _f in /sys/kernel/debug/kvm/*; do
		[ -f "$_f" ] && echo "$(basename "$_f") $(cat "$_f" 2>/dev/null)"
	done
}

# wait_for_line FILE NEEDLE [PID]
#   Waits (polling every 0.2 s, at most 180 s) until FILE contains NEEDLE. Fails, printing FILE,
#   if that never happens or if process PID (when given) exits first.
wait_for_line() {
	_wl_n=0
	until grep -q "$2" "$1" 2>/dev/null; do
		sleep 0.2
		_wl_n=$((_wl_n + 1))
		if [ $_wl_n -ge 900 ] || { [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; }; then
			echo "never saw $2 in $1"
			cat "$1" 2>/dev/null
			return 1
		fi
	done
}

# skip_case REASON...
#   Ends a case that cannot run here (a missing tool or device): prints "SKIPPED: REASON" and
#   exits with status 77, which the harness reports as skipped (never as passed).
skip_case() {
	echo "SKIPPED: $*"
	exit 77
}

# pids_matching STRING
#   Prints the PIDs (one per line) of processes whose command line contains STRING (busybox
#   has no pgrep). Fails when there is none.
pids_matching() {
	_pm_found=1
	for _pm_d in /proc/[0-9]*; do
		_pm_cmd=$(tr '\0' ' ' 2>/dev/null < "$_pm_d/cmdline") 2>/dev/null || continue
		case "$_pm_cmd" in
		*"$1"*) [ "${_pm_d#/proc/}" = "$$" ] || { echo "${_pm_d#/proc/}"; _pm_found=0; } ;;
		esac
	done
	return $_pm_found
}
