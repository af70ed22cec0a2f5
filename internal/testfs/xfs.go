// Package testfs builds real filesystems for tests: a reflink-capable XFS on
// a loop device, for the snapshotter's FICLONE path.
package testfs

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// MountReflinkXFS makes a sparse XFS (reflink=1) image of size bytes under
// base, attaches it through pkg/loopdev, mounts it on base/mnt and undoes
// all of it at cleanup. It returns the mountpoint.
func MountReflinkXFS(t testing.TB, base string, size int64) string {
	t.Helper()
	img := filepath.Join(base, "xfs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.xfs", "-q", "-m", "reflink=1", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.xfs: %v: %s", err, out)
	}
	dev, err := loopdev.Attach(context.Background(), img, loopdev.Options{Access: loopdev.AccessReadWrite})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A lazy unmount or udev's probe may still hold the device at the
		// clear: wait (bounded) for the kernel's unbind instead of calling
		// the deferred detach a leak, so the caller's leak check sees the
		// device gone.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := dev.DetachWith(ctx, loopdev.DetachOptions{Wait: true}); err != nil {
			t.Errorf("detach xfs device: %v", err)
		}
	})
	mnt := filepath.Join(base, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev.Path(), mnt, "xfs", 0, ""); err != nil {
		t.Fatalf("mount xfs: %v", err)
	}
	t.Cleanup(func() {
		// Busy for a moment after the test: a mount namespace another
		// process created meanwhile (a container starting) holds copies of
		// the mounts made on this filesystem (layered mode's erofs layers
		// and ext4 uppers), whose backing files stay open through this
		// mount until that namespace lets go.
		err := unix.Unmount(mnt, 0)
		for deadline := time.Now().Add(15 * time.Second); errors.Is(err, unix.EBUSY) && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
			err = unix.Unmount(mnt, 0)
		}
		if err != nil {
			t.Errorf("unmount xfs: %v", err)
		}
	})
	return mnt
}
