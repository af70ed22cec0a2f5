package hook

import (
	"context"
	"log/slog"

	"github.com/sirupsen/logrus"
)

type logKey struct{}

// withLog returns ctx carrying the hook's logger (with the container's
// fields), which every step below uses and pkg/loopdev gets as its slog
// Logger.
func withLog(ctx context.Context, log *logrus.Entry) context.Context {
	return context.WithValue(ctx, logKey{}, log)
}

// slogFrom is the *slog.Logger for pkg/loopdev: its debug records
// (collisions, fallbacks, attach and detach) land in the hook's log with
// the hook's fields. Nil, and so silent, when ctx carries no logger.
func slogFrom(ctx context.Context) *slog.Logger {
	log, ok := ctx.Value(logKey{}).(*logrus.Entry)
	if !ok {
		return nil
	}
	return slog.New(logrusHandler{entry: log})
}

// logrusHandler is an slog.Handler writing into a logrus entry.
type logrusHandler struct {
	entry *logrus.Entry
	group string
}

func logrusLevel(l slog.Level) logrus.Level {
	switch {
	case l >= slog.LevelError:
		return logrus.ErrorLevel
	case l >= slog.LevelWarn:
		return logrus.WarnLevel
	case l >= slog.LevelInfo:
		return logrus.InfoLevel
	}
	return logrus.DebugLevel
}

func (h logrusHandler) Enabled(_ context.Context, l slog.Level) bool {
	return h.entry.Logger.IsLevelEnabled(logrusLevel(l))
}

func (h logrusHandler) Handle(_ context.Context, r slog.Record) error {
	fields := logrus.Fields{}
	r.Attrs(func(a slog.Attr) bool {
		h.add(fields, a)
		return true
	})
	h.entry.WithFields(fields).Log(logrusLevel(r.Level), r.Message)
	return nil
}

func (h logrusHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	fields := logrus.Fields{}
	for _, a := range attrs {
		h.add(fields, a)
	}
	return logrusHandler{entry: h.entry.WithFields(fields), group: h.group}
}

func (h logrusHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	if h.group != "" {
		name = h.group + "." + name
	}
	return logrusHandler{entry: h.entry, group: name}
}

func (h logrusHandler) add(fields logrus.Fields, a slog.Attr) {
	v := a.Value.Resolve()
	key := a.Key
	if h.group != "" {
		key = h.group + "." + key
	}
	if v.Kind() == slog.KindGroup {
		sub := logrusHandler{entry: h.entry, group: key}
		for _, ga := range v.Group() {
			sub.add(fields, ga)
		}
		return
	}
	if key != "" {
		fields[key] = v.Any()
	}
}
