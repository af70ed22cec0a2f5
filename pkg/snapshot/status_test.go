package snapshot

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// TestStatusOpensNoForeignDevice: status and a metrics scrape find devices
// through sysfs only. A device of another owner is watched with inotify:
// an open by us would show as IN_OPEN (and would turn its owner's detach
// lazy).
func TestStatusOpensNoForeignDevice(t *testing.T) {
	s, base := newTestSnapshotter(t, nil)
	ctx := context.Background()
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(base, "foreign.img")
	if err := os.WriteFile(foreign, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev, err := loopdev.Attach(ctx, foreign, loopdev.Options{Access: loopdev.AccessReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Detach(ctx) })
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.InotifyAddWatch(fd, dev.Path(), unix.IN_OPEN); err != nil {
		t.Fatal(err)
	}
	st, err := s.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Snapshots) != 1 || st.Snapshots[0].Device == "" || st.Devices != 1 {
		t.Errorf("status %+v, want one snapshot with its device and one device under root", st)
	}
	ch := make(chan prometheus.Metric, 100)
	s.Collect(ch)
	close(ch)
	n := 0
	for range ch {
		n++
	}
	if n == 0 {
		t.Error("Collect sent nothing")
	}
	buf := make([]byte, 4096)
	if k, err := unix.Read(fd, buf); k > 0 {
		t.Errorf("status or metrics opened %s, a device of another owner", dev.Path())
	} else if err != unix.EAGAIN {
		t.Fatalf("read inotify: %v", err)
	}
}
