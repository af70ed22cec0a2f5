// Command oci-loop-hook is an OCI runtime hook that mounts admin-approved
// image files (squashfs, erofs, ext4) into containers through loop devices.
// See docs/oci-hook-spec.md; the logic lives in internal/hook.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/syslog"
	"os"
	"strings"
	"time"

	toml "github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/hook"
	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

// Set by the linker: -X main.version=... -X main.commit=...
var (
	version = "dev"
	commit  = "unknown"
)

// hookForcePauseFile is empty in every real build. Crash-path tests set it
// with -ldflags "-X main.hookForcePauseFile=PATH": after each attach the hook
// writes the device path there and blocks until it is killed.
var hookForcePauseFile string

const usage = `Usage: oci-loop-hook [--config PATH] [--log LEVEL] [--mount SPEC]... COMMAND

Commands:
  setup          mount the requested images (aliases: prestart, createRuntime);
                 reads the OCI state on stdin
  teardown       release what setup recorded (alias: poststop); reads the state
  auto           setup when status is "creating", teardown when "stopped"
  gc             tear down records of containers that no longer exist
  check-config   validate the configuration and print the effective values
  version        print the version and commit (also --version)

Options:
  --config PATH  configuration file (default /etc/oci-loop-hook/config.toml;
                 without that file no image is allowed)
  --log LEVEL    log level: debug, info, warn, error (default info)
  --mount SPEC   admin-given mount, image=NAME,dest=/path[,rw][,noexec];
                 repeatable

Exit codes: 0 ok or nothing to do, 1 operational failure, 2 bad input or
configuration, 3 refused by policy, 4 unsupported environment or stage.
`

type mountFlags []string

func (m *mountFlags) String() string     { return strings.Join(*m, " ") }
func (m *mountFlags) Set(v string) error { *m = append(*m, v); return nil }

type options struct {
	configPath     string
	configExplicit bool
	level          string
	mounts         mountFlags
	command        string
}

func main() {
	// Files the hook creates (state, logs) are for root only.
	unix.Umask(0o077)
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	opts, err := parseArgs(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, usage)
		printConfigDefaults(stdout)
		return 0
	}
	if err != nil {
		fail(stderr, "usage", "", err)
		return 2
	}
	cmd := canonical(opts.command)
	if cmd == "version" {
		fmt.Fprintf(stdout, "oci-loop-hook %s (commit %s)\n", version, commit)
		return 0
	}
	cfg, fromFile, err := config.LoadHook(opts.configPath, opts.configExplicit)
	if err != nil {
		fail(stderr, cmd, "", configError(err))
		return 2
	}
	log, closeLog, err := newLogger(&cfg, opts.level)
	if err != nil {
		fail(stderr, cmd, "", err)
		return 2
	}
	defer closeLog()
	if !fromFile {
		log.Info("no config file; built-in defaults, no images allowed")
	}
	timeout := time.Duration(cfg.TimeoutSeconds) * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	h := hook.New(&cfg, log, version)
	if hookForcePauseFile != "" {
		h.HookForceAfterAttach(func(d *loopdev.Device) {
			_ = os.WriteFile(hookForcePauseFile, []byte(d.Path()), 0o600)
			select {}
		})
	}

	switch cmd {
	case "check-config":
		out, err := toml.Marshal(cfg)
		if err != nil {
			fail(stderr, cmd, "", err)
			return 1
		}
		if !fromFile {
			fmt.Fprintf(stdout, "# no file at %s: built-in defaults\n", opts.configPath)
		}
		stdout.Write(out)
		return 0
	case "gc":
		res, err := h.GC(ctx)
		for _, n := range res.Removed {
			fmt.Fprintf(stdout, "removed %s\n", n)
		}
		if err != nil {
			fail(stderr, cmd, "", err)
			return hook.ExitCode(err)
		}
		return 0
	case "setup", "teardown", "auto":
	default:
		fail(stderr, "usage", "", fmt.Errorf("unknown command %q (see --help)", opts.command))
		return 2
	}

	mounts := make([]hook.Request, 0, len(opts.mounts))
	for _, m := range opts.mounts {
		r, err := hook.ParseMountArg(m)
		if err != nil {
			fail(stderr, cmd, "", err)
			return hook.ExitCode(err)
		}
		mounts = append(mounts, r)
	}
	st, err := hook.ReadState(stdin)
	if err != nil {
		fail(stderr, cmd, "", err)
		return hook.ExitCode(err)
	}
	if cmd == "auto" {
		switch st.Status {
		case hook.StatusCreating:
			cmd = "setup"
		case hook.StatusStopped:
			cmd = "teardown"
		default:
			fail(stderr, "auto", st.ID, fmt.Errorf("%w: wrong stage: status %q is neither creating nor stopped", hook.ErrUnsupported, st.Status))
			return 4
		}
	}
	// A hook stuck in the kernel must still end before the runtime's timeout
	// kills it; exiting closes our fds, which lets autoclear undo the attach.
	watchdog := time.AfterFunc(timeout+2*time.Second, func() {
		fail(stderr, cmd, st.ID, errors.New("internal deadline expired"))
		os.Exit(1)
	})
	defer watchdog.Stop()
	if cmd == "setup" {
		err = h.Setup(ctx, st, mounts)
	} else {
		err = h.Teardown(ctx, st)
	}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("internal deadline of %s expired: %w", timeout, err)
		}
		log.WithFields(logrus.Fields{"container_id": st.ID, "step": cmd}).WithError(err).Error("failed")
		fail(stderr, cmd, st.ID, err)
		return hook.ExitCode(err)
	}
	return 0
}

func parseArgs(args []string) (options, error) {
	o := options{configPath: config.DefaultHookPath, level: "info"}
	fs := flag.NewFlagSet("oci-loop-hook", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.Func("config", "", func(v string) error { o.configPath, o.configExplicit = v, true; return nil })
	fs.StringVar(&o.level, "log", o.level, "")
	fs.Var(&o.mounts, "mount", "")
	fs.BoolFunc("version", "", func(string) error { o.command = "version"; return nil })
	// Flags may come before and after the command (hooks.d has one args list).
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	rest := fs.Args()
	if len(rest) == 0 && o.command == "version" {
		return o, nil
	}
	if len(rest) == 0 {
		return o, errors.New("no command given (see --help)")
	}
	o.command = rest[0]
	if err := fs.Parse(rest[1:]); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.command == "help" {
		return o, flag.ErrHelp
	}
	return o, nil
}

func canonical(cmd string) string {
	switch cmd {
	case "prestart", "createRuntime":
		return "setup"
	case "poststop":
		return "teardown"
	}
	return cmd
}

func configError(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			return fmt.Errorf("%w: config file %s does not exist", hook.ErrInvalid, pe.Path)
		}
	}
	return fmt.Errorf("%w: config: %w", hook.ErrInvalid, err)
}

// fail writes the one stderr line: "oci-loop-hook: <command>: <id>: <reason>".
func fail(w io.Writer, cmd, id string, err error) {
	msg := err.Error()
	var b strings.Builder
	for _, r := range msg {
		if r < 0x20 || r == 0x7f {
			r = ' '
		}
		b.WriteRune(r)
	}
	msg = b.String()
	if len(msg) > 1024 {
		msg = msg[:1024] + "..."
	}
	if id != "" {
		fmt.Fprintf(w, "oci-loop-hook: %s: %s: %s\n", cmd, hook.DisplayID(id), msg)
		return
	}
	fmt.Fprintf(w, "oci-loop-hook: %s: %s\n", cmd, msg)
}

// newLogger builds the structured log: syslog (silently discarded when no
// syslog daemon listens: stderr is reserved for the one error line),
// stderr, or an append-only file.
func newLogger(cfg *config.Hook, level string) (*logrus.Entry, func(), error) {
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: --log: %w", hook.ErrInvalid, err)
	}
	l := logrus.New()
	l.SetLevel(lvl)
	l.SetFormatter(&logrus.TextFormatter{DisableColors: true, FullTimestamp: true})
	closer := func() {}
	switch {
	case cfg.Log == "stderr":
		l.SetOutput(os.Stderr)
	case strings.HasPrefix(cfg.Log, "file:"):
		path := strings.TrimPrefix(cfg.Log, "file:")
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: log file: %w", hook.ErrInvalid, err)
		}
		l.SetOutput(f)
		closer = func() { f.Close() }
	default:
		w, err := syslog.New(syslog.LOG_DAEMON|syslog.LOG_INFO, "oci-loop-hook")
		if err != nil {
			l.SetOutput(io.Discard)
			break
		}
		l.SetFormatter(&logrus.TextFormatter{DisableColors: true, DisableTimestamp: true})
		l.SetOutput(w)
		closer = func() { w.Close() }
	}
	return logrus.NewEntry(l), closer, nil
}
