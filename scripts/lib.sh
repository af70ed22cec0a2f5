# shellcheck shell=bash
# lib.sh: helpers for loopkit's shell scripts (sourced, not run).
# Narration: step/note/run. Cleanup: cleanup_push/cleanup_pop, run in
# reverse order at exit. Checks: fail.

_t0=$(date +%s)
if [ -t 1 ]; then
	_bold=$'\e[1m' _green=$'\e[32m' _red=$'\e[31m' _dim=$'\e[2m' _off=$'\e[0m'
else
	_bold='' _green='' _red='' _dim='' _off=''
fi

_elapsed() {
	local s=$(($(date +%s) - _t0))
	printf '%02d:%02d' $((s / 60)) $((s % 60))
}

# step TEXT: start a numbered, timed step. DEMO_FAIL_AT=N (a step number)
# or DEMO_FAIL_AT=WORDS (part of a step's title) makes that step fail at its
# start, to prove that cleanup works from any point.
_step_nr=0
step() {
	_step_nr=$((_step_nr + 1))
	printf '\n%s[%s] %d. %s%s\n' "$_bold" "$(_elapsed)" "$_step_nr" "$*" "$_off"
	case "${DEMO_FAIL_AT:-}" in
	'') ;;
	"$_step_nr") fail "injected failure at step $_step_nr (DEMO_FAIL_AT=$DEMO_FAIL_AT)" ;;
	*[!0-9]*) case "$*" in *"$DEMO_FAIL_AT"*) fail "injected failure at step $_step_nr (DEMO_FAIL_AT=$DEMO_FAIL_AT)" ;; esac ;;
	esac
}

# note TEXT: explain what the output shows.
note() { printf '   %s%s%s\n' "$_dim" "$*" "$_off"; }

# indent: indent a command's output under its step.
indent() { sed 's/^/   /'; }

# ok TEXT: a check that passed.
ok() { printf '   %sok%s %s\n' "$_green" "$_off" "$*"; }

# fail TEXT: stop with an error (the EXIT trap cleans up).
fail() {
	_err_reported=1
	printf '%sFAIL%s %s\n' "$_red" "$_off" "$*" >&2
	exit 1
}

# run CMD...: show a command (on stderr, so $(run ...) captures only the
# command's output), then run it.
run() {
	printf '   %s$ %s%s\n' "$_dim" "$*" "$_off" >&2
	"$@"
}

# stop_pid PID NAME [SECONDS]: SIGTERM a child process and wait for it
# (default 30 s), then SIGKILL. Fails when it did not exit 0 on SIGTERM.
stop_pid() {
	local pid=$1 name=$2 secs=${3:-30} i rc=0
	kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < secs * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		echo "   $name (pid $pid) ignored SIGTERM for ${secs}s: killed" >&2
		return 1
	fi
	wait "$pid" 2>/dev/null || rc=$?
	# 143 = 128+SIGTERM: a daemon that let the signal kill it, also fine.
	case $rc in 0 | 143) return 0 ;; esac
	echo "   $name (pid $pid) exited with status $rc on SIGTERM" >&2
	return 1
}

# wait_socket PATH PID NAME [SECONDS]: wait until a unix socket exists
# while its server process PID still runs (default 60 s).
wait_socket() {
	local sock=$1 pid=$2 name=$3 secs=${4:-60} i
	for ((i = 0; i < secs * 20; i++)); do
		[ -S "$sock" ] && return 0
		kill -0 "$pid" 2>/dev/null || fail "$name exited before serving $sock"
		sleep 0.05
	done
	fail "$name not serving $sock after ${secs}s"
}

# pids_under DIR: processes whose command line or working directory names
# something in DIR (daemons, shims, runc), except this shell's own.
pids_under() {
	local dir=$1 p cmd
	for p in /proc/[0-9]*; do
		[ "${p#/proc/}" != "$$" ] || continue
		[ "${p#/proc/}" != "$BASHPID" ] || continue
		cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
		if [[ "$cmd" == *"$dir/"* || "$(readlink "$p/cwd" 2>/dev/null)" == "$dir"* ]]; then
			echo "${p#/proc/} $cmd"
		fi
	done
}

# start_bg LOG CMD...: show a command and start it in the background with
# its output in LOG; $! is the command's own pid (not a subshell's).
start_bg() {
	local log=$1
	shift
	printf '   %s$ %s > %s &%s\n' "$_dim" "$*" "$log" "$_off" >&2
	"$@" >"$log" 2>&1 &
}

# show_log_on_failure NAME FILE: cleanup step that prints the end of a
# daemon's log when the script is exiting with an error.
show_log_on_failure() {
	[ "${_exit_rc:-0}" != 0 ] || return 0
	printf '   --- last lines of %s (%s) ---\n' "$1" "$2" >&2
	tail -n 25 "$2" 2>/dev/null | sed 's/^/   | /' >&2 || true
}

# Cleanup stack. cleanup_push CMD prints an id; cleanup_pop ID drops the
# entry once the script has undone the thing itself.
_cleanups=()
cleanup_push() {
	_cleanups+=("$1")
	_last_cleanup=$((${#_cleanups[@]} - 1))
}
cleanup_pop() { _cleanups[$1]=''; }

_run_cleanups() {
	local rc=$? i
	set +e
	trap - ERR
	_exit_rc=$rc
	for ((i = ${#_cleanups[@]} - 1; i >= 0; i--)); do
		if [ -n "${_cleanups[$i]}" ]; then
			printf '   %scleanup: %s%s\n' "$_dim" "${_cleanups[$i]}" "$_off" >&2
			eval "${_cleanups[$i]}" || echo "   cleanup failed: ${_cleanups[$i]}" >&2
		fi
	done
	return $rc
}

_on_err() {
	# Report the innermost failure once, not again for every enclosing
	# command substitution or sourced file.
	[ "$BASH_SUBSHELL" = 0 ] && [ -z "${_err_reported:-}" ] || return 0
	_err_reported=1
	printf '%sFAIL%s line %s: %s (exit %s)\n' "$_red" "$_off" "$1" "$2" "$3" >&2
}

# lib_init: strict mode, error report, cleanup at exit.
lib_init() {
	set -Eeuo pipefail
	trap '_on_err "$LINENO" "$BASH_COMMAND" "$?"' ERR
	trap '_run_cleanups' EXIT
}
