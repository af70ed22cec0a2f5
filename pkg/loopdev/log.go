package loopdev

import "log/slog"

// discard is the logger of a caller that gave none. It is never written
// to, so sharing it is not shared mutable state.
var discard = slog.New(slog.DiscardHandler)

// loggerOr returns l, or a logger that drops everything when l is nil: the
// package logs only through what its caller hands it.
func loggerOr(l *slog.Logger) *slog.Logger {
	if l == nil {
		return discard
	}
	return l
}

func (d *Device) logger() *slog.Logger { return loggerOr(d.log) }
