package main

import (
	"errors"
	"flag"
	"fmt"
	"io"

	toml "github.com/pelletier/go-toml/v2"

	"github.com/loopkit/loopkit/pkg/config"
)

const usageHead = `Usage:
  loop-snapshotter [--root DIR] [--address SOCK] [--config FILE] [--log-level LEVEL]
  loop-snapshotter status [--json] [--address SOCK] [--config FILE]
  loop-snapshotter config [--config FILE] [flags]
  loop-snapshotter --version | --help

Serves the containerd snapshots API (proxy plugin "loop") on a unix socket.
Every snapshot is an ext4 image file under --root on its own loop device.
SIGTERM stops serving and keeps attached devices (running containers keep
working); the next start adopts them.

Commands:
  (none)   serve; sends READY=1 to systemd once reconciliation is done
  status   list snapshots (kind, size limit, usage, device, diskseq) and
           orphan devices of a running snapshotter; --json for scripts
  config   print the effective configuration (file, then flags, over defaults)

Exit status: 0 success, 1 runtime failure, 2 usage or configuration error.

Flags:
`

const usageTail = `
Examples:
  loop-snapshotter --log-level debug
  loop-snapshotter status --json
  ctr run --snapshotter loop docker.io/library/busybox:latest t1 sh
  containerd config (1.6, version 2):
    [proxy_plugins.loop]
      type = "snapshot"
      address = "/run/loop-snapshotter/loop-snapshotter.sock"

Configuration file %s (optional: without it the
built-in defaults below apply; unknown keys are errors). Every key with
its default:

%s`

// printUsage writes the --help text: flags, every configuration key with
// its built-in default, examples.
func printUsage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, usageHead)
	fs.SetOutput(w)
	fs.PrintDefaults()
	defaults, err := toml.Marshal(config.DefaultSnapshotter())
	if err != nil {
		defaults = []byte("(cannot render defaults: " + err.Error() + ")\n")
	}
	fmt.Fprintf(w, usageTail, config.DefaultSnapshotterConfig, defaults)
}

const statusUsage = `Usage:
  loop-snapshotter status [--json] [--address SOCK] [--config FILE]

Asks the running snapshotter on --address (or the configured address) for
every snapshot (kind, size limit, usage, device, diskseq), the orphan
devices under its root, and its trash and staging entries.

Exit status: 0 success, 1 the snapshotter could not be asked, 2 usage or
configuration error.

Flags:
`

const configUsage = `Usage:
  loop-snapshotter config [--config FILE] [--root DIR] [--address SOCK] [--log-level LEVEL]

Prints the effective configuration as TOML: the file, then the flags, over
the built-in defaults.

Exit status: 0 success, 2 usage or configuration error.

Flags:
`

// printCommandUsage writes a subcommand's --help text to w.
func printCommandUsage(w io.Writer, fs *flag.FlagSet, head string) {
	fmt.Fprint(w, head)
	fs.SetOutput(w)
	fs.PrintDefaults()
}

// usageError is a command-line or configuration error: exit status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// usageErr marks err (but not a help request) as a usage error.
func usageErr(err error) error {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return err
	}
	return usageError{err}
}

// exitCode is the exit status for err: 0 success, 1 runtime failure, 2
// usage or configuration error (as loopctl).
func exitCode(err error) int {
	var u usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &u):
		return 2
	}
	return 1
}
