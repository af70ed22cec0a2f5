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
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/log"
	toml "github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/loopkit/loopkit/internal/snapservice"
	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/snapshot"
)

// Set by the linker: -X main.version=... -X main.commit=...
var (
	version = "dev"
	commit  = "unknown"
)

// crashEnv names a step at which the process kills itself with SIGKILL
// (crash-safety tests only; see snapshot.WithFaultHook).
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

func serve(o *options) error {
	if err := setupLogging(o.cfg.LogLevel); err != nil {
		return err
	}
	ctx := context.Background()
	if o.configSet {
		log.G(ctx).WithField("config", o.configPath).Info("configuration loaded")
	} else if _, err := os.Stat(o.configPath); errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithField("config", o.configPath).Info("no configuration file: using built-in defaults")
	}
	var opts []snapshot.Opt
	if step := os.Getenv(crashEnv); step != "" {
		opts = append(opts, snapshot.WithFaultHook(func(s string) {
			if s == step {
				log.G(ctx).WithField("step", s).Warn("test fault hook: killing myself")
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {}
			}
		}))
	}
	sn, err := snapshot.New(ctx, o.cfg, opts...)
	if err != nil {
		return err
	}
	defer sn.Close()

	l, err := listen(o.cfg.Address)
	if err != nil {
		return err
	}
	svc := snapservice.New(sn)
	srv := grpc.NewServer(svc.ServerOptions()...)
	svc.Register(srv)
	registerStatus(srv, sn)

	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(l) }()
	if o.cfg.MetricsAddress != "" {
		ml, err := net.Listen("tcp", o.cfg.MetricsAddress)
		if err != nil {
			srv.Stop()
			return fmt.Errorf("metrics listener: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", svc.MetricsHandler())
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { errc <- hs.Serve(ml) }()
		defer hs.Close()
		log.G(ctx).WithField("address", ml.Addr().String()).Info("serving metrics")
	}
	log.G(ctx).WithFields(log.Fields{"address": o.cfg.Address, "root": o.cfg.Root, "version": version}).Info("serving")
	// READY only now: reconciliation ran inside snapshot.New.
	if err := sdNotify("READY=1"); err != nil {
		log.G(ctx).WithError(err).Warn("sd_notify READY")
	}

	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, unix.SIGTERM, unix.SIGINT)
	select {
	case err := <-errc:
		return err
	case sig := <-sigc:
		log.G(ctx).WithField("signal", sig.String()).Info("stopping; loop devices stay attached")
	}
	sdNotify("STOPPING=1")
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		srv.Stop()
	}
	return sn.Close()
}

// listen creates the socket directory (0700), replaces a stale socket (our
// root lock is held, so it is not a live instance's) and serves mode 0660.
func listen(address string) (net.Listener, error) {
	dir := filepath.Dir(address)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket: %w", err)
	}
	old := unix.Umask(0o177)
	l, err := net.Listen("unix", address)
	unix.Umask(old)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(address, 0o660); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// sdNotify sends state to systemd's notification socket, if any.
func sdNotify(state string) error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:] // abstract namespace
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer conn.Close()
	_, err = conn.Write([]byte(state))
	return err
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
