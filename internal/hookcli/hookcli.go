// Package hookcli is the command line of oci-loop-hook: options, command
// dispatch, the logger, the watchdog, the one stderr line and the exit
// code. The setup and teardown logic lives in internal/hook.
package hookcli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
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

// forcePauseFile is empty in every real build. Crash-path tests set it with
// -ldflags "-X github.com/loopkit/loopkit/internal/hookcli.forcePauseFile=PATH":
// after each attach the hook writes the device path there and blocks until
// it is killed.
var forcePauseFile string

// Build names the binary's build in `oci-loop-hook version` and in the
// state records; main sets it from its linker-set variables.
type Build struct {
	Version, Commit string
}

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

Exit codes:
  0  success, or nothing to do
  1  runtime failure (a system call, the kernel, a timeout)
  2  usage or configuration error, or malformed input (OCI state, annotation,
     state record)
  3  refused by policy
  4  runtime contract broken: wrong stage, no mount namespace of its own,
     rootless, no diskseq while require_diskseq is on
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

// Main runs the whole process with args (os.Args[1:]) on the standard
// streams and returns its exit code: 0 success, 1 runtime failure, 2 usage
// or configuration, 3 refused by policy, 4 runtime contract broken.
func Main(b Build, args []string) int {
	// The hook re-executes itself (/proc/self/exe) as the helper that locks
	// a mount's flags in a user namespace; that helper is the whole process.
	if len(args) == 2 && args[0] == hook.LockChildCommand {
		return hook.RunLockChild(args[1])
	}
	// Files the hook creates (state, logs) are for root only.
	unix.Umask(0o077)
	return run(b, args, os.Stdin, os.Stdout, os.Stderr)
}

func run(b Build, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	// Armed before anything that can block (the log file, the config, the
	// state on stdin) with the default timeout, re-armed once the config
	// gives the real one: a hook stuck in the kernel must still end before
	// the runtime's timeout kills it; exiting closes our fds, which lets
	// autoclear undo an attach.
	wd := startWatchdog(stderr, time.Duration(config.DefaultHook().TimeoutSeconds)*time.Second)
	defer wd.stop()
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
	wd.label(cmd, "")
	if cmd == "version" {
		fmt.Fprintf(stdout, "oci-loop-hook %s (commit %s)\n", b.Version, b.Commit)
		return 0
	}
	level, err := parseLevel(opts.level)
	if err != nil {
		fail(stderr, "usage", "", err)
		return 2
	}
	cfg, fromFile, err := config.LoadHook(opts.configPath, opts.configExplicit)
	if err != nil {
		fail(stderr, cmd, "", configError(err))
		return 2
	}
	timeout := time.Duration(cfg.TimeoutSeconds) * time.Second
	wd.reset(timeout + 2*time.Second)
	log, closeLog := newLogger(&cfg, level, stderr)
	defer closeLog()
	if !fromFile {
		log.Info("no config file; built-in defaults, no images allowed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	h := hook.New(&cfg, log, b.Version)
	if forcePauseFile != "" {
		h.HookForceAfterAttach(func(d *loopdev.Device) {
			_ = os.WriteFile(forcePauseFile, []byte(d.Path()), 0o600)
			select {}
		})
	}

	switch cmd {
	case "check-config":
		out, err := toml.Marshal(cfg)
		if err != nil {
			fail(stderr, cmd, "", fmt.Errorf("render configuration: %w", err))
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
	wd.label(cmd, st.ID)
	if cmd == "auto" {
		switch st.Status {
		case hook.StatusCreating:
			cmd = "setup"
		case hook.StatusStopped:
			cmd = "teardown"
		default:
			fail(stderr, "auto", st.ID, hook.Errorf(hook.ErrUnsupported, "wrong stage: status %q is neither creating nor stopped", st.Status))
			return 4
		}
		wd.label(cmd, st.ID)
	}
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

// configError classes a configuration error as exit 2; pkg/config's text
// already names the file and the class ("invalid configuration", "insecure
// configuration file"), so nothing is added but for a missing file.
func configError(err error) error {
	var pe *fs.PathError
	if errors.Is(err, fs.ErrNotExist) && errors.As(err, &pe) {
		return hook.Errorf(hook.ErrInvalid, "config file %s does not exist", pe.Path)
	}
	return hook.Errorf(hook.ErrInvalid, "%w", err)
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
