package loopdev

// Bounded waits and thread safety: R21, R22.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// R21: a lock held forever by another process bounds Attach and Detach by
// the context, and nothing leaks.
func TestR21_NoUnboundedWaits(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r21.img", 4<<20)
	bounded := func(t *testing.T, what string, f func() error) {
		t.Helper()
		start := time.Now()
		errc := make(chan error, 1)
		go func() { errc <- f() }()
		select {
		case err := <-errc:
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("%s: %v, want context.DeadlineExceeded", what, err)
			}
			t.Logf("%s returned after %v: %v", what, time.Since(start), err)
		case <-time.After(30 * time.Second):
			t.Fatalf("%s did not honour its 2 s context", what)
		}
	}

	t.Run("control-lock", func(t *testing.T) {
		h := holdFlock(t, "/dev/loop-control", true)
		defer h.stop()
		bounded(t, "Attach", func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			d, err := Attach(ctx, img, Options{})
			if d != nil {
				cleanupDevice(t, d)
			}
			return err
		})
		if b := bindingsOf(img); len(b) != 0 {
			t.Errorf("leaked %v", b)
		}
	})

	t.Run("device-lock", func(t *testing.T) {
		var h *holder
		o := Options{faultHook: func(step string, nr int) error {
			if step == stepGetFree && h == nil {
				h = holdFlock(t, fmt.Sprintf("/dev/loop%d", nr), true)
			}
			return nil
		}}
		bounded(t, "Attach", func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			d, err := Attach(ctx, img, o)
			if d != nil {
				cleanupDevice(t, d)
			}
			return err
		})
		if h != nil {
			h.stop()
		}
		if b := bindingsOf(img); len(b) != 0 {
			t.Errorf("leaked %v", b)
		}
	})

	// Only a removing Detach needs the control lock (changed: every Detach
	// used to take it); the clear happens anyway and autoclear or the clear
	// unbinds the device, only LOOP_CTL_REMOVE is given up.
	t.Run("detach-control-lock", func(t *testing.T) {
		d := attachT(t, img, Options{RemoveDevice: true})
		h := holdFlock(t, "/dev/loop-control", true)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		switch err := d.Detach(ctx); {
		case errors.Is(err, context.DeadlineExceeded):
		case errors.Is(err, ErrDetachDeferred):
			t.Log("udev held the device at the clear: no removal was tried")
		default:
			t.Errorf("removing Detach against a held control lock: %v, want the deadline", err)
		}
		h.stop()
		waitNoBindings(t, img, 5*time.Second)
	})

	t.Run("detach-device-lock", func(t *testing.T) {
		d := attachT(t, img, Options{})
		h := holdFlock(t, d.Path(), false)
		bounded(t, "Detach", func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			return d.Detach(ctx)
		})
		h.stop()
		waitNoBindings(t, img, 5*time.Second)
	})
}

// R22: no shared fds, the broken flag is atomic; concurrent use of one
// Device and of Attach is race-free (run with -race).
func TestR22_ThreadSafety(t *testing.T) {
	var _ *atomic.Bool = &configureBroken // the process-wide memory is an atomic
	dir := rootDir(t)
	img := newImage(t, dir, "r22.img", 16<<20)
	d := attachT(t, img, Options{Lock: LockShared})
	ctx := testCtx(t, time.Minute)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 20 {
				switch (i + j) % 5 {
				case 0:
					if _, err := d.Partitions(); err != nil {
						t.Error(err)
					}
				case 1:
					if err := d.Sync(); err != nil {
						t.Error(err)
					}
				case 2:
					_ = d.Record()
					_ = d.Owned()
				case 3:
					if err := d.Flock(ctx, LockState(1+j%2), false); err != nil {
						t.Error(err)
					}
				case 4:
					e, err := Attach(ctx, img, Options{Access: AccessReadOnly})
					if err != nil {
						t.Error(err)
						continue
					}
					if err := e.Detach(bg); !acceptableDetach(err, true) {
						t.Error(err)
					}
				}
			}
		})
	}
	wg.Wait()
}
