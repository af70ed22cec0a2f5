// Command loopctl is a small administration tool for loop devices built on
// pkg/loopdev: attach a file and keep it attached, detach a device guarded by
// its diskseq, list bound devices and show one device with its partitions.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"

	"golang.org/x/sys/unix"
)

// Set at build time with -ldflags "-X main.version=... -X main.commit=...".
var (
	version = "dev"
	commit  = "unknown"
)

var logLevels = map[string]slog.Level{"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError}

// loggerKey carries the --log-level logger in the context, to pkg/loopdev.
type loggerKey struct{}

// logger is the invocation's logger (pkg/loopdev's debug records go there).
func logger(ctx context.Context) *slog.Logger {
	l, _ := ctx.Value(loggerKey{}).(*slog.Logger)
	return l
}

// usageError is a command-line mistake (exit status 2); an empty message
// means the flag package already printed the reason.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

const usageText = `usage: loopctl [--log-level LEVEL] COMMAND [FLAGS] [ARGS]

Commands:
  attach [FLAGS] FILE   attach FILE to a free loop device and keep it attached
                        after loopctl exits; prints the device (or --json)
  detach [FLAGS] DEVICE detach DEVICE (full locked teardown); --diskseq N
                        refuses to touch the device unless it is still that
                        attachment
  list [FLAGS]          list bound loop devices
  info [FLAGS] DEVICE   show one loop device and its partitions
  version               print version and commit

Run "loopctl COMMAND --help" for the flags of a command.

Exit status: 0 success, 1 the operation failed, 2 usage error.
`

type command func(ctx context.Context, args []string, stdout, stderr io.Writer) error

var commands = map[string]command{
	"attach":  runAttach,
	"detach":  runDetach,
	"list":    runList,
	"info":    runInfo,
	"version": runVersion,
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, unix.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes one loopctl invocation and returns its exit status:
// 0 success, 1 operation failed, 2 usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("loopctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usageText) }
	level := fs.String("log-level", "warn", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	lvl, ok := logLevels[strings.ToLower(*level)]
	if !ok {
		fmt.Fprintf(stderr, "loopctl: --log-level: not a valid level: %q (debug, info, warn, error)\n", *level)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	ctx = context.WithValue(ctx, loggerKey{}, log)

	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	name := fs.Arg(0)
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "loopctl: unknown command %q\n", name)
		fs.Usage()
		return 2
	}
	err := cmd(ctx, fs.Args()[1:], stdout, stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(usageError)):
		if msg := err.Error(); msg != "" {
			fmt.Fprintf(stderr, "loopctl %s: %s\n", name, msg)
		}
		return 2
	default:
		// The error names the operation and its object already (pkg/loopdev
		// says "attach F: ..."): only the program's name is added.
		fmt.Fprintf(stderr, "loopctl: %v\n", err)
		return 1
	}
}

// newFlags returns a flag set for one subcommand whose parse errors are
// usage errors.
func newFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("loopctl "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: loopctl %s %s\n\nFlags:\n", name, synopsis)
		fs.PrintDefaults()
		fmt.Fprintln(stderr, "\nExit status: 0 success, 1 the operation failed, 2 usage error.")
	}
	return fs
}

// parseFlags parses args and checks the number of positional arguments.
func parseFlags(fs *flag.FlagSet, args []string, nargs int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{}
	}
	if fs.NArg() != nargs {
		fs.Usage()
		return usageError{fmt.Sprintf("want %d argument(s), got %d", nargs, fs.NArg())}
	}
	return nil
}

func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("version", "", stderr)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "loopctl %s (commit %s)\n", version, commit)
	return nil
}
