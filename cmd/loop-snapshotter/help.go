package main

import (
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
