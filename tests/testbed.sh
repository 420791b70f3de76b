#!/usr/bin/env bash
# Bad-input checks of the test bed itself (guest-images/build.sh and the nested harness):
# each must fail fast with one clear line and a non-zero status, never hang.
# Run by scripts/test as the "testbed" tier; prints "testbed: N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
pass=0 fail=0

# expect NAME NEEDLE COMMAND...: COMMAND must exit non-zero within 120 s and print NEEDLE.
expect() {
	local name=$1 needle=$2
	shift 2
	local out st
	out=$(timeout 120 "$@" 2>&1 </dev/null)
	st=$?
	if [ $st -ne 0 ] && [ $st -ne 124 ] && grep -qF -- "$needle" <<<"$out"; then
		echo "test testbed::$name ... ok"
		pass=$((pass + 1))
	else
		echo "test testbed::$name ... FAILED (status $st; expected '$needle' in:)"
		sed 's/^/    /' <<<"$out" | tail -20
		fail=$((fail + 1))
	fi
}

cargo build --quiet --tests 2>/dev/null
expect build_sh_unknown_package "no such package" \
	guest-images/build.sh --kernel-package does-not-exist-xyz --flavor testbed-bogus
expect harness_missing_images "guest images not found" \
	env FERROVM_IMAGES=/nonexistent/images cargo test --quiet --test nested
expect harness_missing_qemu "apt-get install qemu-system-x86" \
	env FERROVM_TEST_MODE=nested FERROVM_QEMU=/nonexistent/qemu-system-x86_64 cargo test --quiet --test nested
expect harness_missing_ferrovm "/nonexistent/ferrovm" \
	env FERROVM_BIN=/nonexistent/ferrovm cargo test --quiet --test nested
expect ferrovm_verbose_register_dump "rip=" \
	sh -c 'f=$(mktemp); cargo run --quiet -- run -v --kernel "$(ls -d target/debug/build/ferrovm-*/out | head -1)/cmdline.elf" --cmdline triple; s=$?; exit $s'

echo "testbed: $pass passed, $fail failed"
[ $fail -eq 0 ]
