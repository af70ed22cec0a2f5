#!/bin/bash
# test-setup.sh PACKAGE...: what `make test` needs before its first test,
# as root: the Debian packages (installed only when missing, their services
# not started), the Go modules of both modules, and no daemon left running by
# the install. Prints the versions the tests will use. Safe to run again;
# needs no network when everything is present.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/sbin:/sbin

command -v go >/dev/null || { echo "test-setup: Go 1.26 not found (install it from go.dev into /usr/local/go)" >&2; exit 1; }

# Daemons running before we start are not ours to stop.
udevd_before=$(pgrep -x systemd-udevd || true)
containerd_before=$(pgrep -x containerd || true)

echo "--- packages"
# apt-install.sh keeps maintainer scripts from starting containerd or udevd.
scripts/apt-install.sh "$@"

echo "--- go modules"
go mod download
go -C pkg/loopdev mod download

# The first test pass must run without udevd (the udev pass starts its own),
# and tests run private containerds: none may be left over from the install.
stop_new() { # NAME PIDS_BEFORE [SYSTEMD_UNITS...]
	local name=$1 before=$2 pid
	shift 2
	for pid in $(pgrep -x "$name" || true); do
		if ! grep -qx "$pid" <<<"$before"; then
			echo "stopping $name (pid $pid) started by the package install"
			if [ -d /run/systemd/system ] && [ $# -gt 0 ]; then
				systemctl stop "$@" || true
			fi
			kill -TERM "$pid" 2>/dev/null || true
		fi
	done
}
stop_new containerd "$containerd_before" containerd.service
stop_new systemd-udevd "$udevd_before" systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket
for _ in $(seq 1 50); do
	[ -z "$(pgrep -x containerd || true)$(pgrep -x systemd-udevd || true)" ] && break
	sleep 0.1
done
if [ -n "$(pgrep -x systemd-udevd || true)" ]; then
	echo "warning: systemd-udevd is running (pid $(pgrep -x systemd-udevd | tr '\n' ' ')): the 'without udevd' pass will run with it" >&2
fi
if [ -n "$(pgrep -x containerd || true)" ]; then
	echo "note: a containerd is running (pid $(pgrep -x containerd | tr '\n' ' ')); tests use private instances and leave it alone" >&2
fi
