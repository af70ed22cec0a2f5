// Command loop-snapshotter serves the containerd snapshots API (proxy
// plugin "loop") on a unix socket; every snapshot is an ext4 image on its
// own loop device.
//
//	loop-snapshotter [--root DIR] [--address SOCK] [--config FILE] [--log-level L]
//	loop-snapshotter status [--json] [--address SOCK] [--config FILE]
//	loop-snapshotter config [--config FILE] [flags]   print the effective configuration
//	loop-snapshotter --version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"time"

	"github.com/containerd/log"
	toml "github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/server"
	"github.com/loopkit/loopkit/internal/snapadmin"
	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/snapshot"
)

// Set by the linker: -X main.version=... -X main.commit=...
var (
	version = "dev"
	commit  = "unknown"
)

// crashEnv names a step at which the process kills itself with SIGKILL
// (crash-safety tests only; see snapadmin.WithFaultHook).
const crashEnv = "LOOP_SNAPSHOTTER_TEST_CRASH_AT"

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "loop-snapshotter: %v\n", err)
		os.Exit(exitCode(err))
	}
}

type options struct {
	root, address, configPath, logLevel string
	configSet                           bool
	cfg                                 config.Snapshotter
}

func parseFlags(name string, args []string, extra func(*flag.FlagSet)) (*options, *flag.FlagSet, error) {
	o := &options{}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned, help is printed by the caller
	fs.StringVar(&o.root, "root", "", "state directory (default "+config.DefaultSnapshotterRoot+")")
	fs.StringVar(&o.address, "address", "", "unix socket to serve on (default "+config.DefaultSnapshotterAddress+")")
	fs.StringVar(&o.configPath, "config", config.DefaultSnapshotterConfig, "configuration file (optional at the default path)")
	fs.StringVar(&o.logLevel, "log-level", "", "debug, info, warn or error (default info)")
	if extra != nil {
		extra(fs)
	}
	if err := fs.Parse(args); err != nil {
		return nil, fs, usageErr(err)
	}
	if fs.NArg() > 0 {
		return nil, fs, usageErr(fmt.Errorf("unexpected argument %q", fs.Arg(0)))
	}
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "config" {
			o.configSet = true
		}
	})
	cfg, _, err := config.LoadSnapshotter(o.configPath, o.configSet)
	if err != nil {
		return nil, fs, usageErr(err)
	}
	// Precedence: flag > config file > built-in default.
	if o.root != "" {
		cfg.Root = o.root
	}
	if o.address != "" {
		cfg.Address = o.address
	}
	if o.logLevel != "" {
		cfg.LogLevel = o.logLevel
	}
	if err := cfg.Validate(); err != nil {
		return nil, fs, usageErr(err)
	}
	o.cfg = cfg
	return o, fs, nil
}

func run(args []string, stdout io.Writer) error {
	if len(args) > 0 && args[0] == "status" {
		return runStatus(args[1:], stdout)
	}
	if len(args) > 0 && args[0] == "config" {
		return runConfigDump(args[1:], stdout)
	}
	var showVersion bool
	var flags *flag.FlagSet
	o, _, err := parseFlags("loop-snapshotter", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&showVersion, "version", false, "print version and commit")
		flags = fs
	})
	if errors.Is(err, flag.ErrHelp) {
		printUsage(stdout, flags)
		return nil
	}
	if showVersion {
		fmt.Fprintf(stdout, "loop-snapshotter %s (commit %s)\n", version, commit)
		return nil
	}
	if err != nil {
		return err
	}
	return serve(o)
}

func setupLogging(level string) error {
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return err
	}
	l := logrus.StandardLogger()
	l.SetLevel(lvl)
	l.SetFormatter(&logrus.JSONFormatter{TimestampFormat: time.RFC3339Nano})
	l.SetOutput(os.Stdout)
	return nil
}

// serve builds the snapshotter (reconciling its root) and serves it. The
// signal handler is installed first: a SIGTERM during reconciliation or
// right after READY=1 must stop the daemon gracefully, not kill it with the
// default action.
func serve(o *options) error {
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer stop()
	if err := setupLogging(o.cfg.LogLevel); err != nil {
		return err
	}
	if o.configSet {
		log.G(ctx).WithField("config", o.configPath).Info("configuration loaded")
	} else if _, err := os.Stat(o.configPath); errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithField("config", o.configPath).Info("no configuration file: using built-in defaults")
	}
	if step := os.Getenv(crashEnv); step != "" {
		ctx = snapadmin.WithFaultHook(ctx, snapadmin.KillAt(ctx, step))
	}
	build := func(ctx context.Context) (snapadmin.Snapshotter, error) {
		return snapadmin.From(snapshot.NewSnapshotter(ctx, o.cfg))
	}
	return server.Run(ctx, server.Options{Address: o.cfg.Address, MetricsAddress: o.cfg.MetricsAddress, Root: o.cfg.Root, Version: version}, build)
}

// runConfigDump prints the effective configuration (file + flags over the
// built-in defaults) as TOML.
func runConfigDump(args []string, stdout io.Writer) error {
	o, fs, err := parseFlags("config", args, nil)
	if errors.Is(err, flag.ErrHelp) {
		printCommandUsage(stdout, fs, configUsage)
		return nil
	}
	if err != nil {
		return err
	}
	b, err := toml.Marshal(o.cfg)
	if err != nil {
		return err
	}
	_, err = stdout.Write(b)
	return err
}
