#!/bin/bash
# with-udevd.sh CMD [ARGS...]: run CMD while a systemd-udevd started here
# probes every new block device, then stop that udevd by its pid.
# If a udevd is already running, CMD runs under it and it is left alone.
# The exit status is CMD's (or 1 if udevd could not be started).
set -euo pipefail

UDEVD=${UDEVD:-/lib/systemd/systemd-udevd}

if [ $# -eq 0 ]; then
	echo "usage: $0 CMD [ARGS...]" >&2
	exit 2
fi

# Only one udevd can run on a host, and a second caller that found ours
# running would lose it when we stop it: callers take turns.
exec 9>/run/lock/loopkit-with-udevd.lock
flock 9

if pgrep -x systemd-udevd >/dev/null; then
	echo "with-udevd: systemd-udevd already running; using it" >&2
	exec "$@"
fi

if [ ! -x "$UDEVD" ]; then
	echo "with-udevd: $UDEVD not found (apt-get install udev)" >&2
	exit 1
fi

log=$(mktemp /tmp/with-udevd.XXXXXX.log)
# Run it in the foreground of a background job (not --daemon) so $! is the
# daemon itself and we stop exactly the process we started.
"$UDEVD" >"$log" 2>&1 &
pid=$!

# shellcheck disable=SC2317 # called from the EXIT trap
stop_udevd() {
	if kill -0 "$pid" 2>/dev/null; then
		# SIGTERM makes udevd kill its workers and exit.
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -f "$log"
}
trap stop_udevd EXIT

# Wait until udevd answers on its control socket (bounded: 10 s).
for _ in $(seq 1 100); do
	if ! kill -0 "$pid" 2>/dev/null; then
		echo "with-udevd: systemd-udevd exited at start:" >&2
		cat "$log" >&2
		exit 1
	fi
	if udevadm control --ping --timeout=1 2>/dev/null; then
		break
	fi
	sleep 0.1
done
if ! udevadm control --ping --timeout=1 2>/dev/null; then
	echo "with-udevd: systemd-udevd (pid $pid) did not answer within 10s" >&2
	exit 1
fi
echo "with-udevd: systemd-udevd running (pid $pid)" >&2

set +e
"$@"
rc=$?
set -e
exit "$rc"
