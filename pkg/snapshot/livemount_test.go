package snapshot

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// newActive opens a snapshotter and prepares the active snapshot "a"; it
// returns the snapshotter, the test's base directory and a's mounts.
func newActive(t *testing.T) (*snapshotter, string, []mount.Mount) {
	t.Helper()
	s, base := newTestSnapshotter(t, nil)
	ms, err := s.Prepare(context.Background(), "a", "")
	if err != nil {
		t.Fatal(err)
	}
	return s, base, ms
}

// devMounts lists the mount points of filesystems on devnum here.
func devMounts(t *testing.T, devnum loopdev.Devnum) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(func(i *mountinfo.Info) (bool, bool) {
		return uint32(i.Major) != devnum.Major() || uint32(i.Minor) != devnum.Minor(), false
	})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		out = append(out, m.Mountpoint+" "+m.Options)
	}
	return out
}

// mountsOf calls Mounts and checks that it returned either the block device
// (wantBind "") or a read-write bind of wantBind.
func mountsOf(t *testing.T, s *snapshotter, key, device, wantBind string) []mount.Mount {
	t.Helper()
	ms, err := s.Mounts(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 {
		t.Fatalf("Mounts(%s): %+v, want one mount", key, ms)
	}
	m := ms[0]
	switch {
	case wantBind == "" && (m.Type != "ext4" || m.Source != device || m.Options[0] != "rw"):
		t.Errorf("Mounts(%s) = %+v, want the read-write ext4 block device %s", key, m, device)
	case wantBind != "" && (m.Type != "bind" || m.Source != wantBind || strings.Join(m.Options, ",") != "rw,bind"):
		t.Errorf("Mounts(%s) = %+v, want a read-write bind of %s", key, m, wantBind)
	}
	return ms
}

// TestMountsOfMountedActiveSnapshot: Mounts of an active snapshot whose
// filesystem is mounted read-write here (a container's root) is a bind of
// that mount, which containerd's read-only temp mount (its differ's) can
// mount where the block device is refused; with nothing mounted it is the
// block device, and a second read-write user of the bind writes the same
// filesystem.
func TestMountsOfMountedActiveSnapshot(t *testing.T) {
	s, base, ms := newActive(t)
	ctx := context.Background()
	dev := ms[0].Source
	mountsOf(t, s, "a", dev, "")

	root := filepath.Join(base, "rootfs")
	unmount := mountAll(t, ms, root)
	if err := os.WriteFile(filepath.Join(root, "committed"), []byte("committed\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Why the bind: the kernel refuses the read-only mount of the block
	// device that the differ would otherwise make.
	err := mount.WithReadonlyTempMount(ctx, ms, func(string) error { return nil })
	if !errors.Is(err, unix.EBUSY) {
		t.Fatalf("read-only temp mount of the block device mounted read-write: %v, want EBUSY", err)
	}

	bind := mountsOf(t, s, "a", dev, root)
	err = mount.WithReadonlyTempMount(ctx, bind, func(dir string) error {
		b, err := os.ReadFile(filepath.Join(dir, "committed"))
		if err != nil || string(b) != "committed\n" {
			t.Errorf("read through the read-only bind: %q %v", b, err)
		}
		if err := os.WriteFile(filepath.Join(dir, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("write through the read-only bind: %v, want EROFS", err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("read-only temp mount of the bind: %v", err)
	}
	second := filepath.Join(base, "second")
	unmountSecond := mountAll(t, bind, second)
	if err := os.WriteFile(filepath.Join(second, "second"), []byte("2"), 0o644); err != nil {
		t.Errorf("write through a read-write user of the bind: %v", err)
	} else if _, err := os.Stat(filepath.Join(root, "second")); err != nil {
		t.Errorf("write through the bind not seen in the container's root: %v", err)
	}
	unmountSecond()

	// Over-mounted: the mount point no longer leads to the filesystem.
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	mountsOf(t, s, "a", dev, "")
	if err := unix.Unmount(root, 0); err != nil {
		t.Fatal(err)
	}
	mountsOf(t, s, "a", dev, root)

	unmount()
	mountsOf(t, s, "a", dev, "")
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatalf("commit once unmounted: %v", err)
	}
	if left := devMounts(t, loopdevDevnum(t, dev)); len(left) > 0 {
		t.Errorf("mounts of %s left: %v", dev, left)
	}
}

// TestMountsSkipsReadOnlyBind: a read-only bind of the filesystem (one the
// differ left behind, say) is not what Mounts binds: a bind of it would be
// read-only where the caller asked read-write. A read-write mount listed
// after it is used; with only the read-only bind left, the block device.
func TestMountsSkipsReadOnlyBind(t *testing.T) {
	s, base, ms := newActive(t)
	dev := ms[0].Source
	first := filepath.Join(base, "first")
	unmountFirst := mountAll(t, ms, first)
	ro := filepath.Join(base, "ro")
	unmountRO := mountAll(t, []mount.Mount{{Type: "bind", Source: first, Options: []string{"bind", "ro"}}}, ro)
	unmountFirst()
	// Shares the read-write superblock the read-only bind still holds.
	later := filepath.Join(base, "later")
	unmountLater := mountAll(t, ms, later)
	mountsOf(t, s, "a", dev, later)
	unmountLater()
	mountsOf(t, s, "a", dev, "")
	unmountRO()
}

// TestMountsBindSourceVanishes: when the mount a bind names is unmounted
// before the bind is mounted (the container's task deleted meanwhile:
// containerd unmounts its rootfs and removes the directory), the bind
// fails with a clear error, leaves no mount behind, and the snapshot
// commits.
func TestMountsBindSourceVanishes(t *testing.T) {
	s, base, ms := newActive(t)
	ctx := context.Background()
	dev := ms[0].Source
	root := filepath.Join(base, "bundle", "rootfs")
	unmount := mountAll(t, ms, root)
	bind := mountsOf(t, s, "a", dev, root)
	unmount()
	if err := os.Remove(root); err != nil {
		t.Fatal(err)
	}
	err := mount.WithReadonlyTempMount(ctx, bind, func(string) error {
		t.Error("the bind of a vanished mount was mounted")
		return nil
	})
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "failed to mount") {
		t.Errorf("temp mount of a bind whose source vanished: %v, want a failed mount, ENOENT", err)
	}
	if left := devMounts(t, loopdevDevnum(t, dev)); len(left) > 0 {
		t.Errorf("mounts of %s left: %v", dev, left)
	}
	mountsOf(t, s, "a", dev, "")
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Errorf("commit after the failed bind: %v", err)
	}
}

// TestCommitSeesBindLeftBehind: a bind of the container's root that
// outlives it holds the filesystem as the root did; Commit refuses the
// snapshot, naming the bind, until it is unmounted, and the committed
// image holds what the container wrote.
func TestCommitSeesBindLeftBehind(t *testing.T) {
	s, base, ms := newActive(t)
	ctx := context.Background()
	dev := ms[0].Source
	root := filepath.Join(base, "rootfs")
	unmount := mountAll(t, ms, root)
	if err := os.WriteFile(filepath.Join(root, "committed"), []byte("committed\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	left := filepath.Join(base, "left")
	unmountLeft := mountAll(t, mountsOf(t, s, "a", dev, root), left)
	unmount()
	err := s.Commit(ctx, "c", "a")
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "still mounted") || !strings.Contains(err.Error(), " at "+left) {
		t.Errorf("commit with a bind left at %s: %v, want FailedPrecondition naming it", left, err)
	}
	unmountLeft()
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatalf("commit once the bind is gone: %v", err)
	}
	vm, err := s.View(ctx, "v", "c")
	if err != nil {
		t.Fatal(err)
	}
	view := filepath.Join(base, "view")
	mountAll(t, vm, view)
	if b, err := os.ReadFile(filepath.Join(view, "committed")); err != nil || string(b) != "committed\n" {
		t.Errorf("committed image: %q %v", b, err)
	}
}

func loopdevDevnum(t *testing.T, device string) loopdev.Devnum {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(device, &st); err != nil {
		t.Fatal(err)
	}
	return loopdev.Devnum(st.Rdev)
}
