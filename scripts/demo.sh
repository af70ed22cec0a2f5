#!/bin/bash
# demo.sh: loopkit end to end on this machine, narrated (make demo, as root).
#
# It installs missing Debian packages, builds the binaries, then sources
# every scripts/demo.d/NN-*.sh in order (each one section of the demo), and
# finally proves that nothing of the demo is left: no loop device backed by a
# file in the demo directory, no mount below it, no process it started.
#
# A section may use: $ROOT (the source tree), $BIN (built binaries), $WORK
# (a fresh directory on a real filesystem, removed at exit), the helpers in
# scripts/lib.sh, cleanup_push for undo steps, and DEMO_PIDS+=(pid) for every
# process it starts (it must stop them itself; they are checked at the end).
#
# Sections: 10 pkg/loopdev via loopctl; 20 loop-snapshotter under a private
# containerd (import, size limit, ENOSPC); 30 oci-loop-hook under runc.
# Environment: DEMO_TMPDIR (parent of the demo directory, default /var/tmp);
# DEMO_FAIL_AT=N or =TITLE-WORDS fails that step on purpose, to show that
# the cleanup leaves nothing behind from any point (integration/demo_test.go).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
lib_init

BIN=$ROOT/bin
DEMO_PIDS=()
DEMO_PACKAGES=(util-linux fdisk e2fsprogs jq kmod busybox-static containerd runc erofs-utils squashfs-tools)
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin

[ "$(id -u)" = 0 ] || fail "the demo needs root (loop devices, mounts)"
[ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
[ -e /dev/loop-control ] || fail "no /dev/loop-control: the kernel has no loop driver"

step "Checking packages: ${DEMO_PACKAGES[*]}"
"$ROOT/scripts/apt-install.sh" "${DEMO_PACKAGES[@]}"
ok "all installed"

step "Building loopkit (static binaries in bin/)"
command -v go >/dev/null || fail "Go 1.26 not found: install it to /usr/local/go (https://go.dev/dl/)"
run make -C "$ROOT" --no-print-directory build
ok "built: $(find "$BIN" -maxdepth 1 -type f -printf '%f ')"

# The demo directory lives on a real filesystem (not tmpfs), as image files do.
# DEMO_TMPDIR picks its parent (a test points it at its own temp dir).
WORK=$(mktemp -d "${DEMO_TMPDIR:-/var/tmp}/loopkit-demo.XXXXXX")
cleanup_push "rm -rf '$WORK'"
# Safety net when a step fails between an attach and its own cleanup_push:
# $WORK is fresh, so every mount below it and every loop device backed by a
# file in it belongs to this demo.
cleanup_push "sweep_work"
sweep_work() {
	local mp dev seq
	awk -v w="$WORK" '$5 == w || index($5, w "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r |
		while read -r mp; do umount "$mp"; done
	"$BIN/loopctl" list --json --under "$WORK" | jq -r '.[] | "\(.path) \(.diskseq)"' |
		while read -r dev seq; do "$BIN/loopctl" detach --wait --diskseq "$seq" "$dev"; done
}
note "working in $WORK"

for section in "$ROOT"/scripts/demo.d/[0-9]*.sh; do
	# shellcheck source=/dev/null
	. "$section"
done

step "Proving nothing is left"
# Read sysfs directly rather than trust the tool under test.
for f in /sys/block/loop*/loop/backing_file; do
	[ -r "$f" ] || continue
	case "$(cat "$f" 2>/dev/null)" in
	"$WORK"/*) fail "$(basename "$(dirname "$(dirname "$f")")") still bound to $(cat "$f")" ;;
	esac
done
[ "$(jq length <<<"$("$BIN/loopctl" list --json --under "$WORK")")" = 0 ] || fail "loopctl list --under $WORK is not empty"
ok "no loop device backed by a file in $WORK (sysfs and loopctl list agree)"
if awk -v w="$WORK" '$5 == w || index($5, w "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
	fail "mounts left below $WORK: $(grep -F "$WORK" /proc/self/mountinfo)"
fi
ok "no mount below $WORK"
for pid in "${DEMO_PIDS[@]}"; do
	if kill -0 "$pid" 2>/dev/null; then
		fail "process $pid ($(cat /proc/"$pid"/comm 2>/dev/null)) still running"
	fi
done
# Shims, runc and daemons all name the demo directory on their command line.
left=$(pids_under "$WORK")
[ -z "$left" ] || fail "processes of the demo still running: $left"
ok "no process of the demo running (${#DEMO_PIDS[@]} started; none with $WORK on its command line or as cwd)"

printf '\n%sDemo finished in %s.%s\n' "$_bold" "$(_elapsed)" "$_off"
