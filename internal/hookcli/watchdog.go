package hookcli

import (
	"errors"
	"io"
	"os"
	"sync"
	"time"
)

// watchdog ends the process with exit 1 and the one stderr line when the
// hook outlives its deadline, whatever it is blocked in.
type watchdog struct {
	timer   *time.Timer
	mu      sync.Mutex
	cmd, id string
}

func startWatchdog(stderr io.Writer, after time.Duration) *watchdog {
	w := &watchdog{cmd: "start"}
	w.timer = time.AfterFunc(after, func() {
		w.mu.Lock()
		cmd, id := w.cmd, w.id
		w.mu.Unlock()
		fail(stderr, cmd, id, errors.New("internal deadline expired"))
		os.Exit(1)
	})
	return w
}

func (w *watchdog) label(cmd, id string) {
	w.mu.Lock()
	w.cmd, w.id = cmd, id
	w.mu.Unlock()
}

func (w *watchdog) reset(after time.Duration) { w.timer.Reset(after) }

func (w *watchdog) stop() { w.timer.Stop() }
