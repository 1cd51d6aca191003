#!/usr/bin/env bash
# The import rules of DESIGN.md, enforced: only loader/ imports cilium/ebpf,
# routing/ stays free of sockets, syscalls and BPF, and overlay/ and
# userspace/ stay apart (overlay/ reaches the project only through routing/).
set -euo pipefail
mod=$(go list -m)
fail=0
for pkg in $(go list ./... | grep -v "^$mod/loader\$"); do
	if go list -f '{{join .Imports "\n"}}' "$pkg" | grep -q '^github.com/cilium/ebpf'; then
		echo "boundary: $pkg imports github.com/cilium/ebpf; only $mod/loader may" >&2
		fail=1
	fi
done
for imp in $(go list -f '{{join .Imports "\n"}}' "$mod/routing"); do
	case "$imp" in
	net | syscall | golang.org/x/sys/* | "$mod/loader" | github.com/cilium/ebpf*)
		echo "boundary: $mod/routing imports $imp; routing must stay free of sockets, syscalls and BPF" >&2
		fail=1
		;;
	esac
done
# overlay/ and everything it pulls in from this module: routing/ only.
for dep in $(go list -deps "$mod/overlay" | grep "^$mod/"); do
	case "$dep" in
	"$mod/overlay" | "$mod/routing") ;;
	*)
		echo "boundary: $mod/overlay depends on $dep; overlay may import only $mod/routing from this module" >&2
		fail=1
		;;
	esac
done
if go list -deps "$mod/userspace" | grep -qx "$mod/overlay"; then
	echo "boundary: $mod/userspace depends on $mod/overlay; only cmd/ wires the two together" >&2
	fail=1
fi
exit $fail
