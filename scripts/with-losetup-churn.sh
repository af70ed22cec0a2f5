#!/bin/bash
# with-losetup-churn.sh CMD [ARGS...]: run CMD while another process loops
# `losetup -f --show` + `losetup -d` on files of its own, as an unrelated
# loop user on the host would; then stop it and detach what it attached.
# CMD runs with LOOPKIT_TEST_LOOP_CHURN=1. The exit status is CMD's.
set -euo pipefail

if [ $# -eq 0 ]; then
	echo "usage: $0 CMD [ARGS...]" >&2
	exit 2
fi
command -v losetup >/dev/null || { echo "with-losetup-churn: losetup not found (apt-get install util-linux)" >&2; exit 1; }

dir=$(mktemp -d /var/tmp/losetup-churn.XXXXXX)
for i in 1 2 3 4; do
	truncate -s 4M "$dir/f$i.img"
done
status=$dir/status

# churn detaches only devices it attached itself (the name losetup printed,
# checked against its own file before the detach).
churn() {
	local n=0 dev
	while [ ! -e "$dir/stop" ]; do
		for i in 1 2 3 4; do
			if ! dev=$(losetup -f --show "$dir/f$i.img" 2>>"$dir/errors"); then
				# losetup races with the test's allocations for free devices;
				# a lost race is normal, anything else is logged.
				continue
			fi
			n=$((n + 1))
			if [ "$(cat "/sys/block/${dev#/dev/}/loop/backing_file" 2>/dev/null)" = "$dir/f$i.img" ]; then
				losetup -d "$dev" 2>>"$dir/errors" || true
			fi
		done
	done
	echo "$n" >"$status"
}
churn &
pid=$!

# shellcheck disable=SC2317 # called from the EXIT trap
stop_churn() {
	touch "$dir/stop"
	wait "$pid" 2>/dev/null || true
	# Leftovers: only devices bound to this script's own files.
	for b in /sys/block/loop*/loop/backing_file; do
		[ -e "$b" ] || continue
		case "$(cat "$b" 2>/dev/null)" in
		"$dir"/*)
			d=${b#/sys/block/}
			losetup -d "/dev/${d%%/*}" 2>/dev/null || true
			;;
		esac
	done
	echo "with-losetup-churn: losetup attached and detached $(cat "$status" 2>/dev/null || echo 0) times meanwhile" >&2
	rm -rf "$dir"
}
trap stop_churn EXIT

# Tests read it: other openers may defer a detach for a moment.
LOOPKIT_TEST_LOOP_CHURN=1 "$@"
