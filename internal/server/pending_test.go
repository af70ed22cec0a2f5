package server

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// A request that arrives while the snapshotter is being built waits; it
// ends with its own context, or with Unavailable when the build failed.
func TestPendingWaits(t *testing.T) {
	p := newPending()
	if p.now() != nil {
		t.Fatal("now() before set")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := p.get(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("get before set: %v, want the request's deadline", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := p.get(context.Background())
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("get returned before set: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	p.set(nil)
	if err := <-done; !errdefs.IsUnavailable(err) {
		t.Fatalf("get after a failed build: %v, want Unavailable", err)
	}
}

// Without LISTEN_FDS (or with another process's LISTEN_PID) nothing is
// inherited, and the environment is left alone for the unix socket path.
func TestInheritedNone(t *testing.T) {
	t.Setenv("LISTEN_FDS", "1")
	t.Setenv("LISTEN_PID", "1") // not us
	l, err := inherited()
	if err != nil || l != nil {
		t.Fatalf("inherited() with another LISTEN_PID = %v, %v; want nil, nil", l, err)
	}
	os.Unsetenv("LISTEN_FDS")
	if l, err := inherited(); err != nil || l != nil {
		t.Fatalf("inherited() without LISTEN_FDS = %v, %v", l, err)
	}
}
