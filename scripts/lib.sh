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

# step TEXT: start a numbered, timed step.
_step_nr=0
step() {
	_step_nr=$((_step_nr + 1))
	printf '\n%s[%s] %d. %s%s\n' "$_bold" "$(_elapsed)" "$_step_nr" "$*" "$_off"
}

# note TEXT: explain what the output shows.
note() { printf '   %s%s%s\n' "$_dim" "$*" "$_off"; }

# ok TEXT: a check that passed.
ok() { printf '   %sok%s %s\n' "$_green" "$_off" "$*"; }

# fail TEXT: stop with an error (the EXIT trap cleans up).
fail() {
	printf '%sFAIL%s %s\n' "$_red" "$_off" "$*" >&2
	exit 1
}

# run CMD...: show a command (on stderr, so $(run ...) captures only the
# command's output), then run it.
run() {
	printf '   %s$ %s%s\n' "$_dim" "$*" "$_off" >&2
	"$@"
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
