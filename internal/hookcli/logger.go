package hookcli

import (
	"fmt"
	"io"
	"io/fs"
	"log/syslog"
	"os"
	"strings"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/config"
)

// parseLevel accepts the four levels --help lists.
func parseLevel(s string) (logrus.Level, error) {
	switch s {
	case "debug":
		return logrus.DebugLevel, nil
	case "info":
		return logrus.InfoLevel, nil
	case "warn", "warning":
		return logrus.WarnLevel, nil
	case "error":
		return logrus.ErrorLevel, nil
	}
	return 0, fmt.Errorf("--log %q: must be debug, info, warn or error", truncate(s, 32))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// newLogger builds the structured log: syslog (silently discarded when no
// syslog daemon listens: stderr is reserved for the one error line),
// stderr, or an append-only file. A log file that cannot be used (a FIFO, a
// device, a symlink, a missing directory) never fails or hangs the hook:
// the log goes to stderr after one warning.
func newLogger(cfg *config.Hook, lvl logrus.Level, stderr io.Writer) (*logrus.Entry, func()) {
	l := logrus.New()
	l.SetLevel(lvl)
	l.SetFormatter(&logrus.TextFormatter{DisableColors: true, FullTimestamp: true})
	closer := func() {}
	switch {
	case cfg.Log == "stderr":
		l.SetOutput(stderr)
	case strings.HasPrefix(cfg.Log, "file:"):
		path := strings.TrimPrefix(cfg.Log, "file:")
		f, err := openLogFile(path)
		if err != nil {
			l.SetOutput(stderr)
			l.WithError(err).Warn("log file unusable; logging to stderr")
			break
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
	return logrus.NewEntry(l), closer
}

// openLogFile opens (creating it 0600) the log file for appending. O_NONBLOCK
// makes a FIFO without a reader fail at once (ENXIO) instead of blocking the
// open forever; a FIFO with a reader, or anything else that is not a
// regular file, is refused after the open by fstat.
func openLogFile(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_APPEND|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, &fs.PathError{Op: "open log file", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &fs.PathError{Op: "fstat log file", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, fmt.Errorf("log file %s is not a regular file", path)
	}
	return os.NewFile(uintptr(fd), path), nil
}
