package testutil

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSnapshotSeesEscapedMounts: a mount point with a space (\040 in
// mountinfo) is found under its real name, and gone once unmounted.
func TestSnapshotSeesEscapedMounts(t *testing.T) {
	RequireRoot(t)
	base := t.TempDir()
	mnt := filepath.Join(base, "a b")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	want := "mount tmpfs on " + mnt
	got := Snapshot(base)
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if !got[want] {
		t.Errorf("Snapshot(%s) = %v, want %q", base, got, want)
	}
	if after := Snapshot(base); after[want] {
		t.Errorf("after unmount: %v", after)
	}
}
