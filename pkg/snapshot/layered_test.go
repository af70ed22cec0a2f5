package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
)

func newLayered(t *testing.T, mutate func(*config.Snapshotter)) (*snapshotter, string) {
	t.Helper()
	return newTestSnapshotter(t, func(c *config.Snapshotter) {
		c.Mode = config.ModeLayered
		if mutate != nil {
			mutate(c)
		}
	})
}

// mountAll mounts ms on a new directory dir the way containerd does and
// unmounts it at cleanup (unless the test unmounts first).
func mountAll(t *testing.T, ms []mount.Mount, dir string) func() {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mount.All(ms, dir); err != nil {
		t.Fatalf("mount %v on %s: %v", ms, dir, err)
	}
	return unmountAtCleanup(t, dir)
}

func upperdirOf(t *testing.T, ms []mount.Mount) string {
	t.Helper()
	for _, o := range ms[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v
		}
	}
	t.Fatalf("no upperdir in %v", ms)
	return ""
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestLayeredWhiteoutsAndTree: an overlay whiteout and an opaque directory
// written into an unpack snapshot's upper (as containerd's applier does)
// survive mkfs.erofs and hide the lower entries; hard links, symlinks,
// device nodes, FIFOs, setuid bits, owners, xattrs and mtimes come through.
func TestLayeredWhiteoutsAndTree(t *testing.T) {
	for _, backing := range []string{backingFile, backingLoop} {
		t.Run(backing, func(t *testing.T) {
			s, base := newLayered(t, func(c *config.Snapshotter) { c.LayerBacking = backing })
			ctx := context.Background()
			ms, err := s.Prepare(ctx, "extract-1", "")
			must(t, err)
			if ms[0].Type != "bind" {
				t.Fatalf("parentless unpack mounts %v, want a bind mount", ms)
			}
			d := filepath.Join(base, "w1")
			um := mountAll(t, ms, d)
			mtime := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
			for _, dir := range []string{"d", "o"} {
				must(t, os.Mkdir(filepath.Join(d, dir), 0o755))
			}
			for _, f := range []string{"a", "d/x", "o/y"} {
				must(t, os.WriteFile(filepath.Join(d, f), []byte("content of "+f), 0o644))
			}
			must(t, os.Link(filepath.Join(d, "d/x"), filepath.Join(d, "d/h")))
			must(t, os.Symlink("d/x", filepath.Join(d, "s")))
			must(t, unix.Mkfifo(filepath.Join(d, "fifo"), 0o600))
			must(t, unix.Mknod(filepath.Join(d, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
			must(t, os.WriteFile(filepath.Join(d, "suid"), []byte("x"), 0o755))
			must(t, os.Lchown(filepath.Join(d, "suid"), 1234, 5678))
			must(t, os.Chmod(filepath.Join(d, "suid"), 0o755|os.ModeSetuid))
			must(t, unix.Setxattr(filepath.Join(d, "d/x"), "user.k", []byte("v"), 0))
			must(t, os.Chtimes(filepath.Join(d, "d/x"), mtime, mtime))
			um()
			must(t, s.Commit(ctx, "L1", "extract-1"))

			ms, err = s.Prepare(ctx, "extract-2", "L1")
			must(t, err)
			up := upperdirOf(t, ms)
			must(t, unix.Mknod(filepath.Join(up, "a"), unix.S_IFCHR, 0))
			must(t, os.Mkdir(filepath.Join(up, "o"), 0o755))
			must(t, unix.Setxattr(filepath.Join(up, "o"), "trusted.overlay.opaque", []byte("y"), 0))
			must(t, os.WriteFile(filepath.Join(up, "o/z"), []byte("z"), 0o644))
			must(t, s.Commit(ctx, "L2", "extract-2"))
			if _, err := os.Lstat(s.upperRoot("2")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("unpack upper still there after Commit: %v", err)
			}

			ms, err = s.View(ctx, "v", "L2")
			must(t, err)
			v := filepath.Join(base, "v")
			mountAll(t, ms, v)
			if _, err := os.Lstat(filepath.Join(v, "a")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("whited-out file: %v", err)
			}
			if es, _ := os.ReadDir(filepath.Join(v, "o")); len(es) != 1 || es[0].Name() != "z" {
				t.Errorf("opaque dir lists %v, want only z", es)
			}
			var st unix.Stat_t
			must(t, unix.Lstat(filepath.Join(v, "d/x"), &st))
			if st.Nlink != 2 || st.Mtim.Sec != mtime.Unix() {
				t.Errorf("d/x: nlink %d mtime %d, want 2 and %d", st.Nlink, st.Mtim.Sec, mtime.Unix())
			}
			var st2 unix.Stat_t
			must(t, unix.Lstat(filepath.Join(v, "d/h"), &st2))
			if st2.Ino != st.Ino {
				t.Errorf("hard link d/h has inode %d, d/x %d", st2.Ino, st.Ino)
			}
			buf := make([]byte, 8)
			if n, err := unix.Getxattr(filepath.Join(v, "d/x"), "user.k", buf); err != nil || string(buf[:n]) != "v" {
				t.Errorf("xattr user.k: %q %v", buf[:max(n, 0)], err)
			}
			if target, err := os.Readlink(filepath.Join(v, "s")); err != nil || target != "d/x" {
				t.Errorf("symlink: %q %v", target, err)
			}
			must(t, unix.Lstat(filepath.Join(v, "fifo"), &st))
			if st.Mode&unix.S_IFMT != unix.S_IFIFO {
				t.Errorf("fifo mode %o", st.Mode)
			}
			must(t, unix.Lstat(filepath.Join(v, "null"), &st))
			if st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != unix.Mkdev(1, 3) {
				t.Errorf("null: mode %o rdev %x", st.Mode, st.Rdev)
			}
			must(t, unix.Lstat(filepath.Join(v, "suid"), &st))
			if st.Mode&0o7777 != 0o4755 || st.Uid != 1234 || st.Gid != 5678 {
				t.Errorf("suid: mode %o owner %d:%d", st.Mode&0o7777, st.Uid, st.Gid)
			}

			// Each layer is mounted once, shared by every snapshot above it.
			for _, id := range []string{"1", "2"} {
				if ok, err := mountinfo.Mounted(s.layerDir(id)); err != nil || !ok {
					t.Errorf("layer %s not mounted: %v", id, err)
				}
			}
			ms2, err := s.View(ctx, "v2", "L2")
			must(t, err)
			if strings.Join(ms2[0].Options, ",") != strings.Join(ms[0].Options, ",") {
				t.Errorf("second view %v, first %v", ms2, ms)
			}
			st0, err := s.Status(ctx)
			must(t, err)
			var devs int
			for _, sn := range st0.Snapshots {
				if sn.Device != "" {
					devs++
				}
			}
			if want := map[string]int{backingFile: 0, backingLoop: 2}[backing]; devs != want || st0.LayerBacking != backing || st0.Mode != config.ModeLayered {
				t.Errorf("%s backing: status %+v, %d devices, want %d", backing, st0, devs, want)
			}
		})
	}
}

// TestLayeredContainerLimit: an active snapshot's writable space is its
// ext4 image: statfs shows the label, a write past it is ENOSPC, and a new
// container allocates next to nothing before it writes.
func TestLayeredContainerLimit(t *testing.T) {
	s, base := newLayered(t, nil)
	ctx := context.Background()
	ms, err := s.Prepare(ctx, "extract-base", "")
	must(t, err)
	d := filepath.Join(base, "b")
	um := mountAll(t, ms, d)
	must(t, os.WriteFile(filepath.Join(d, "f"), []byte("base"), 0o644))
	um()
	must(t, s.Commit(ctx, "base", "extract-base"))

	label := snapshots.WithLabels(map[string]string{LabelMaxSize: strconv.Itoa(128 << 20)})
	ms, err = s.Prepare(ctx, "c", "base", label)
	must(t, err)
	if ms[0].Type != "overlay" {
		t.Fatalf("container mounts %v, want overlay", ms)
	}
	img := filepath.Join(s.upperRoot(imageID(t, s, "c")), "image")
	if a, err := allocated(img); err != nil || a > 2<<20 {
		t.Errorf("new container's image allocates %d bytes (%v), want at most 2 MiB", a, err)
	}
	_, err = s.Prepare(ctx, "big", "base", snapshots.WithLabels(map[string]string{LabelMaxSize: strconv.Itoa(4 << 30)}))
	must(t, err)
	if a, err := allocated(filepath.Join(s.upperRoot(imageID(t, s, "big")), "image")); err != nil || a > 2<<20 {
		t.Errorf("new 4 GiB container allocates %d bytes (%v), want at most 2 MiB", a, err)
	}
	c := filepath.Join(base, "c")
	mountAll(t, ms, c)
	var st unix.Statfs_t
	must(t, unix.Statfs(c, &st))
	total := int64(st.Blocks) * st.Bsize
	if total > 128<<20 || total < 100<<20 {
		t.Errorf("container filesystem size %d, want about %d", total, 128<<20)
	}
	u0, err := s.Usage(ctx, "c")
	must(t, err)
	if err := writeZeros(filepath.Join(c, "fill"), 200<<20); !errors.Is(err, unix.ENOSPC) {
		t.Errorf("writing 200 MiB into 128 MiB: %v, want ENOSPC", err)
	}
	u1, err := s.Usage(ctx, "c")
	must(t, err)
	if u1.Size < u0.Size+90<<20 || u1.Inodes <= u0.Inodes {
		t.Errorf("usage %+v after filling, %+v before", u1, u0)
	}
	ul, err := s.Usage(ctx, "base")
	must(t, err)
	if ul.Size <= 0 || ul.Inodes < 2 {
		t.Errorf("layer usage %+v", ul)
	}
}

// TestLayeredCommitRules: a plain-directory upper still mounted is refused
// (FailedPrecondition, saying why); a running container's upper is frozen
// for the build, so its Commit is one point in time and the container
// keeps writing afterwards.
func TestLayeredCommitRules(t *testing.T) {
	s, base := newLayered(t, nil)
	ctx := context.Background()
	ms, err := s.Prepare(ctx, "extract-1", "")
	must(t, err)
	d := filepath.Join(base, "e")
	um := mountAll(t, ms, d)
	must(t, os.WriteFile(filepath.Join(d, "f"), []byte("1"), 0o644))
	err = s.Commit(ctx, "L1", "extract-1")
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "still mounted") {
		t.Fatalf("Commit of a mounted unpack upper: %v, want FailedPrecondition saying it is mounted", err)
	}
	um()
	must(t, s.Commit(ctx, "L1", "extract-1"))

	ms, err = s.Prepare(ctx, "run", "L1")
	must(t, err)
	r := filepath.Join(base, "run")
	um = mountAll(t, ms, r)
	f, err := os.Create(filepath.Join(r, "log"))
	must(t, err)
	defer f.Close()
	_, err = f.WriteString("before\n")
	must(t, err)
	must(t, s.Commit(ctx, "snap", "run"))
	if _, err := f.WriteString("after\n"); err != nil {
		t.Errorf("container write after Commit: %v", err)
	}
	ms, err = s.View(ctx, "v", "snap")
	must(t, err)
	v := filepath.Join(base, "v")
	mountAll(t, ms, v)
	if b, err := os.ReadFile(filepath.Join(v, "log")); err != nil || string(b) != "before\n" {
		t.Errorf("committed log %q %v, want the state at Commit", b, err)
	}
	f.Close()
	um()
	must(t, s.Cleanup(ctx))
	if st, err := s.Status(ctx); err != nil || len(st.Orphans) != 0 {
		t.Errorf("after Cleanup: %+v %v", st, err)
	}
}

// TestLayeredRestart: a restart adopts the mounts and devices of live
// snapshots (the container keeps its root); after a simulated reboot
// (everything unmounted and detached) Mounts mounts again and the data is
// there.
func TestLayeredRestart(t *testing.T) {
	requireTools(t)
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	cfg := testConfigMode(filepath.Join(base, "root"), config.ModeLayered)
	ctx := context.Background()
	open := func() *snapshotter {
		t.Helper()
		s, err := newSnapshotter(ctx, cfg)
		must(t, err)
		return s
	}
	s := open()
	t.Cleanup(func() {
		s.Purge(ctx)
		s.Close()
	})
	ms, err := s.Prepare(ctx, "extract-1", "")
	must(t, err)
	d := filepath.Join(base, "e")
	um := mountAll(t, ms, d)
	must(t, os.WriteFile(filepath.Join(d, "f"), []byte("1"), 0o644))
	um()
	must(t, s.Commit(ctx, "L1", "extract-1"))
	ms, err = s.Prepare(ctx, "c", "L1")
	must(t, err)
	c := filepath.Join(base, "c")
	um = mountAll(t, ms, c)
	must(t, os.WriteFile(filepath.Join(c, "data"), []byte("kept"), 0o644))
	must(t, s.Close())

	s = open()
	st, err := s.Status(ctx)
	must(t, err)
	if len(st.Orphans) != 0 {
		t.Errorf("orphans after restart: %+v", st.Orphans)
	}
	ms2, err := s.Mounts(ctx, "c")
	must(t, err)
	if strings.Join(ms2[0].Options, ",") != strings.Join(ms[0].Options, ",") {
		t.Errorf("Mounts after restart %v, before %v", ms2, ms)
	}
	must(t, os.WriteFile(filepath.Join(c, "more"), []byte("x"), 0o644))
	um()

	// Reboot: nothing mounted, no device.
	must(t, s.Purge(ctx))
	must(t, s.Close())
	s = open()
	ms3, err := s.Mounts(ctx, "c")
	must(t, err)
	c2 := filepath.Join(base, "c2")
	mountAll(t, ms3, c2)
	for _, f := range []string{"f", "data", "more"} {
		if _, err := os.Stat(filepath.Join(c2, f)); err != nil {
			t.Errorf("after reboot: %v", err)
		}
	}
}

// TestLayeredRemoveAndOrphans: Remove unmounts and detaches what the
// snapshot owned; a mount and a device whose record is gone (a crash
// between Remove's record and its unmount) are unmounted and detached at
// startup, and Cleanup deletes their files.
func TestLayeredRemoveAndOrphans(t *testing.T) {
	requireTools(t)
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	cfg := testConfigMode(filepath.Join(base, "root"), config.ModeLayered)
	cfg.LayerBacking = backingLoop
	ctx := context.Background()
	s, err := newSnapshotter(ctx, cfg)
	must(t, err)
	t.Cleanup(func() {
		s.Purge(ctx)
		s.Close()
	})
	_, err = s.Prepare(ctx, "extract-1", "")
	must(t, err)
	must(t, s.Commit(ctx, "L1", "extract-1"))
	for _, k := range []string{"c", "orphan"} {
		_, err = s.Prepare(ctx, k, "L1")
		must(t, err)
	}
	cid, oid := imageID(t, s, "c"), imageID(t, s, "orphan")
	must(t, s.Remove(ctx, "c"))
	if ok, _ := mountinfo.Mounted(filepath.Join(s.upperRoot(cid), "m")); ok {
		t.Errorf("upper still mounted after Remove")
	}
	must(t, s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, "orphan")
		return err
	}))
	must(t, s.Close())
	s, err = newSnapshotter(ctx, cfg)
	must(t, err)
	if ok, _ := mountinfo.Mounted(filepath.Join(s.upperRoot(oid), "m")); ok {
		t.Errorf("orphan upper still mounted after restart")
	}
	own, err := s.ownDevices()
	must(t, err)
	for _, d := range own {
		if d.key.role == roleUpper {
			t.Errorf("upper device left after restart: %+v", d)
		}
	}
	must(t, s.Remove(ctx, "L1"))
	if ok, _ := mountinfo.Mounted(s.layerDir("1")); ok {
		t.Errorf("layer still mounted after Remove")
	}
	// A foreign prober (losetup -j, udev's blkid) that has a device open at
	// the clear defers its unbind to the prober's close: wait for that.
	deadline := time.Now().Add(5 * time.Second)
	for own, err = s.ownDevices(); err == nil && len(own) != 0 && time.Now().Before(deadline); own, err = s.ownDevices() {
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil || len(own) != 0 {
		t.Errorf("devices 5 s after Remove: %+v %v", own, err)
	}
	must(t, s.Cleanup(ctx))
	for _, d := range []string{"u", "layers", "trash", "l"} {
		if es, _ := os.ReadDir(filepath.Join(s.root, d)); len(es) != 0 {
			t.Errorf("%s/ after Cleanup: %v", d, es)
		}
	}
}

// TestModeOfRoot: a new root records the configured mode (layered when
// unset); an unset mode keeps a root's recorded one; the other mode is
// refused with a message saying how to move.
func TestModeOfRoot(t *testing.T) {
	requireTools(t)
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	ctx := context.Background()
	cfg := testConfigMode(filepath.Join(base, "root"), "")
	s, err := newSnapshotter(ctx, cfg)
	must(t, err)
	if s.mode != config.ModeLayered {
		t.Errorf("new root mode %q, want layered", s.mode)
	}
	must(t, s.Close())
	cfg.Mode = config.ModeFlat
	_, err = newSnapshotter(ctx, cfg)
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "layered-mode store") || strings.Contains(err.Error(), "\n") {
		t.Errorf("flat on a layered root: %v", err)
	}
	cfg2 := testConfigMode(filepath.Join(base, "flat"), config.ModeFlat)
	s, err = newSnapshotter(ctx, cfg2)
	must(t, err)
	must(t, s.Close())
	cfg2.Mode = ""
	s, err = newSnapshotter(ctx, cfg2)
	must(t, err)
	if s.mode != config.ModeFlat {
		t.Errorf("unset mode on a flat root: %q", s.mode)
	}
	must(t, s.Close())
}

// TestLayeredMetrics: the metrics name the mode and the layer backing and
// count mounted layers.
func TestLayeredMetrics(t *testing.T) {
	s, _ := newLayered(t, nil)
	ctx := context.Background()
	_, err := s.Prepare(ctx, "extract-1", "")
	must(t, err)
	must(t, s.Commit(ctx, "L1", "extract-1"))
	_, err = s.Prepare(ctx, "c", "L1")
	must(t, err)
	reg := prometheus.NewRegistry()
	must(t, reg.Register(s))
	mfs, err := reg.Gather()
	must(t, err)
	got := map[string]string{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName()+"="+l.GetValue())
			}
			got[mf.GetName()+"{"+strings.Join(labels, ",")+"}"] = fmt.Sprint(m.GetGauge().GetValue())
		}
	}
	if v := got["loop_snapshotter_mode{layer_backing="+s.backing+",mode=layered}"]; v != "1" {
		t.Errorf("mode metric: %v", got)
	}
	if v := got["loop_snapshotter_layer_mounts{}"]; v != "1" {
		t.Errorf("layer mounts %q, want 1: %v", v, got)
	}
}
