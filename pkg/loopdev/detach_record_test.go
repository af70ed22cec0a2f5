package loopdev

import (
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestDetachRecordExclusive: an exclusive guarded detach refuses a device a
// filesystem is mounted from (ErrInUse, binding intact), detaches it once
// unmounted, and with Wait returns only when the kernel has unbound it.
func TestDetachRecordExclusive(t *testing.T) {
	dir := rootDir(t)
	privateMountNS(t)
	img := ext4Image(t, dir, "x.img", 32<<20)
	ctx := testCtx(t, 30*time.Second)
	d := attachT(t, img, Options{Keep: true})
	rec := d.Record()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	mnt := dir + "/m"
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	mountT(t, rec.Path, mnt, "ext4", 0, "")
	if err := DetachRecord(ctx, rec, DetachOptions{Exclusive: true}); !errors.Is(err, ErrInUse) || !errors.Is(err, unix.EBUSY) {
		t.Fatalf("exclusive detach of a mounted device: %v, want ErrInUse", err)
	}
	if !stillOurs(rec) {
		t.Fatal("a refused exclusive detach touched the binding")
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if err := DetachRecord(ctx, rec, DetachOptions{Exclusive: true, Wait: true}); err != nil {
		t.Fatalf("exclusive detach after unmount: %v", err)
	}
	if stillOurs(rec) {
		t.Fatal("DetachRecord(Wait) returned while the device was still bound")
	}
	if err := DetachRecord(ctx, rec, DetachOptions{Exclusive: true}); !errors.Is(err, ErrGone) {
		t.Errorf("second detach: %v, want ErrGone", err)
	}
}

// TestDetachRecordWaitsForHolder: a holder (another open fd) defers the
// unbind; Wait returns once the holder closes, not before.
func TestDetachRecordWaitsForHolder(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "h.img", 16<<20)
	ctx := testCtx(t, 30*time.Second)
	d := attachT(t, img, Options{Keep: true})
	rec := d.Record()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	holder, err := os.Open(rec.Path)
	if err != nil {
		t.Fatal(err)
	}
	released := make(chan time.Time, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		released <- time.Now()
		holder.Close()
	}()
	if err := DetachRecord(ctx, rec, DetachOptions{Wait: true}); err != nil {
		t.Fatalf("detach with a holder, waiting: %v", err)
	}
	if time.Now().Before(<-released) {
		t.Error("Wait returned before the holder closed the device")
	}
	if stillOurs(rec) {
		t.Fatal("still bound after the wait")
	}
}
