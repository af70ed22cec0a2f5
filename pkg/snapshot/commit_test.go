package snapshot

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/testfs"
	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

// prepareWritten prepares key, mounts it, writes one file and unmounts it;
// it returns the image path and the snapshot's device.
func prepareWritten(t *testing.T, s *snapshotter, base, key string) (image, device string) {
	t.Helper()
	ms, err := s.Prepare(context.Background(), key, "")
	if err != nil {
		t.Fatal(err)
	}
	m := filepath.Join(base, "m-"+key)
	unmount := mountAt(t, ms, m)
	if err := os.WriteFile(filepath.Join(m, "f"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	unmount()
	return s.imagePath(imageID(t, s, key)), ms[0].Source
}

func debugfsWrite(t *testing.T, image string, cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		if out, err := exec.Command("debugfs", "-w", "-R", c, image).CombinedOutput(); err != nil {
			t.Fatalf("debugfs %s: %v: %s", c, err, out)
		}
	}
}

// TestCommitRefusesDamagedImage: an image whose superblock records errors,
// or that e2fsck finds inconsistent, is not committed (DataLoss, the image
// named and kept), a retried Commit is refused again, also after a restart,
// and Remove keeps the image in damaged/, which Cleanup leaves alone.
func TestCommitRefusesDamagedImage(t *testing.T) {
	requireTools(t)
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	root := filepath.Join(base, "root")
	ctx := context.Background()
	s := openAt(t, root, nil)
	for _, tc := range []struct {
		key, want string
		damage    []string
	}{
		{"errors", "filesystem recorded 3 errors", []string{"ssv error_count 3"}},
		{"error-bit", "filesystem recorded the error state", []string{"ssv state 3"}},
		// Not marked clean, and a link count e2fsck -p would silently fix.
		{"inconsistent", "e2fsck found errors it would have to correct", []string{"sif /f links_count 5", "ssv state 0"}},
	} {
		image, device := prepareWritten(t, s, base, tc.key)
		// Through the device, as the kernel's ext4 writes it: a write to
		// the image file beside the attached device went unseen by Commit
		// once in a loaded run (cause not established).
		debugfsWrite(t, device, tc.damage...)
		err := s.Commit(ctx, tc.key+"-c", tc.key)
		if !errdefs.IsDataLoss(err) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), image) || !strings.Contains(err.Error(), "kept for inspection") {
			t.Errorf("%s: commit: %v, want DataLoss %q naming %s", tc.key, err, tc.want, image)
		}
		if err := s.Commit(ctx, tc.key+"-c", tc.key); !errdefs.IsDataLoss(err) {
			t.Errorf("%s: retried commit: %v, want DataLoss", tc.key, err)
		}
		if info, err := s.Stat(ctx, tc.key); err != nil || info.Kind != snapshots.KindActive {
			t.Errorf("%s: after refused commit: %v %v", tc.key, info.Kind, err)
		}
	}
	// The marker outlives the process.
	if err := s.Purge(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openAt(t, root, nil)
	if err := s.Commit(ctx, "errors-c", "errors"); !errdefs.IsDataLoss(err) || !strings.Contains(err.Error(), "recorded 3 errors") {
		t.Errorf("commit after restart: %v, want the recorded DataLoss", err)
	}
	if err := s.Remove(ctx, "errors"); err != nil {
		t.Fatal(err)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	kept, _ := filepath.Glob(filepath.Join(root, "damaged", "*", "image"))
	if len(kept) != 1 {
		t.Errorf("damaged images kept after Remove and Cleanup: %v, want 1", kept)
	}
}

// TestCommitFullBackingFilesystem reproduces the lost layer: on a backing
// filesystem with less room than the data written, the Commit fails, and
// so does the retry (before the fix e2fsck -p "repaired" the image and the
// retried Commit recorded a layer without the file).
func TestCommitFullBackingFilesystem(t *testing.T) {
	requireTools(t)
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	full := filepath.Join(base, "full")
	testfs.MountTmpfs(t, full, 96<<20)
	ctx := context.Background()
	s := openAt(t, filepath.Join(full, "root"), nil)
	ms, err := s.Prepare(ctx, "a", "", snapshots.WithLabels(map[string]string{LabelMaxSize: strconv.Itoa(256 << 20)}))
	if err != nil {
		t.Fatal(err)
	}
	m := filepath.Join(base, "m")
	unmount := mountAt(t, ms, m)
	werr := writeZeros(filepath.Join(m, "big"), 240<<20)
	t.Logf("writing 240 MiB onto a 96 MiB backing filesystem: %v", werr)
	unmount()
	err = s.Commit(ctx, "c", "a")
	t.Logf("commit: %v", err)
	if err == nil {
		t.Fatal("commit of an image that lost its writes succeeded")
	}
	if !errdefs.IsDataLoss(err) || !strings.Contains(err.Error(), "kept for inspection") {
		t.Errorf("commit: %v, want DataLoss keeping the image", err)
	}
	if err := s.Commit(ctx, "c", "a"); !errdefs.IsDataLoss(err) {
		t.Errorf("retried commit: %v, want DataLoss", err)
	}
	if _, err := s.Stat(ctx, "c"); !errdefs.IsNotFound(err) {
		t.Errorf("a damaged layer was committed: %v", err)
	}
	// Remove needs room for the metadata write; the disk is still full.
	t.Logf("remove on the full disk: %v", s.Remove(ctx, "a"))
}

// TestMountsCommitRace: a Mounts that read the snapshot as active before a
// Commit took the device lock must not attach a read-write device to the
// committed image once it gets the lock.
func TestMountsCommitRace(t *testing.T) {
	requireTools(t)
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	ctx := context.Background()
	read := make(chan struct{})
	mountsErr := make(chan error, 1)
	var s *snapshotter
	hook := func(step string) {
		switch step {
		case "mounts-read":
			close(read)
		case "commit-detached":
			// Commit holds the device lock: a Mounts starts and reads the
			// snapshot as active, then waits for the lock.
			go func() {
				_, err := s.Mounts(ctx, "a")
				mountsErr <- err
			}()
			<-read
		}
	}
	cfg := testConfig(filepath.Join(base, "root"))
	var err error
	s, err = newSnapshotter(ctx, cfg, withFaultHook(hook))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Purge(ctx); s.Close() })
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	id := imageID(t, s, "a")
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	if err := <-mountsErr; !errdefs.IsNotFound(err) {
		t.Errorf("Mounts racing Commit: %v, want NotFound", err)
	}
	bid, err := backingOf(s.imagePath(id))
	if err != nil {
		t.Fatal(err)
	}
	infos, err := loopdev.FindByBacking(s.imagePath(id), bid)
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range infos {
		if !i.ReadOnly {
			t.Errorf("read-write device %s attached to the committed image", i.Path)
		}
	}
}

// TestCommitReportsHolder: a mount copy in another mount namespace pins
// the device; Commit fails at once with FailedPrecondition naming the
// process and its mount namespace, and succeeds once the holder is gone.
func TestCommitReportsHolder(t *testing.T) {
	testutil.RequireBinaries(t, "unshare")
	s, base := newTestSnapshotter(t, nil)
	ctx := context.Background()
	ms, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	m := filepath.Join(base, "m")
	unmount := mountAt(t, ms, m)
	// The holder copies our mount table, the snapshot's mount included.
	holder := exec.Command("unshare", "-m", "--propagation", "private", "sleep", "300")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	stop := func() { holder.Process.Kill(); holder.Wait() }
	t.Cleanup(stop)
	// unshare has made its namespace once it has exec'd sleep.
	for {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(holder.Process.Pid) + "/comm"); err == nil && strings.TrimSpace(string(b)) == "sleep" {
			break
		}
	}
	unmount()
	err = s.Commit(ctx, "c", "a")
	ns, _ := os.Readlink("/proc/" + strconv.Itoa(holder.Process.Pid) + "/ns/mnt")
	want := "pid " + strconv.Itoa(holder.Process.Pid) + " sleep (" + ns + ") at " + m
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), want) {
		t.Errorf("commit with a mount copy elsewhere: %v, want FailedPrecondition naming %q", err, want)
	}
	stop()
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Errorf("commit once the holder is gone: %v", err)
	}
}

// TestUsableSpace: an empty container filesystem of 256 MiB and above
// offers at least 90% of its label as available space (no reserved blocks,
// a journal and inode tables sized for the label).
func TestUsableSpace(t *testing.T) {
	s, base := newTestSnapshotter(t, nil)
	ctx := context.Background()
	for _, size := range []int64{256 << 20, 1 << 30, 4 << 30} {
		key := strconv.FormatInt(size, 10)
		ms, err := s.Prepare(ctx, key, "", snapshots.WithLabels(map[string]string{LabelMaxSize: key}))
		if err != nil {
			t.Fatal(err)
		}
		m := filepath.Join(base, "m"+key)
		unmount := mountAt(t, ms, m)
		var st unix.Statfs_t
		if err := unix.Statfs(m, &st); err != nil {
			t.Fatal(err)
		}
		avail := int64(st.Bavail) * st.Bsize
		t.Logf("label %d: available %d (%.1f%%), %d inodes", size, avail, 100*float64(avail)/float64(size), st.Files)
		if avail < size*9/10 {
			t.Errorf("label %d: %d available, want >= 90%%", size, avail)
		}
		unmount()
	}
}

// TestCleanupPrunesTemplates: Cleanup removes the templates of sizes other
// than default_size, which stays for the next plain Prepare.
func TestCleanupPrunesTemplates(t *testing.T) {
	s, _ := newTestSnapshotter(t, nil)
	ctx := context.Background()
	for _, size := range []int64{48 << 20, 80 << 20} {
		if _, err := s.Prepare(ctx, strconv.FormatInt(size, 10), "", snapshots.WithLabels(map[string]string{LabelMaxSize: strconv.FormatInt(size, 10)})); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Prepare(ctx, "default", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	es, _ := os.ReadDir(filepath.Join(s.root, "templates"))
	if len(es) != 1 || es[0].Name() != filepath.Base(s.templatePath("ext4-", 64<<20)) {
		t.Errorf("templates after Cleanup: %v, want only the default_size one", es)
	}
	if _, err := s.Prepare(ctx, "again", "", snapshots.WithLabels(map[string]string{LabelMaxSize: strconv.Itoa(48 << 20)})); err != nil {
		t.Errorf("prepare after prune: %v", err)
	}
}

// TestModeFile: the mode file is written whole; an empty one (a crash on
// first start by an older version) in a root without metadata is a first
// start, with metadata it is refused.
func TestModeFile(t *testing.T) {
	requireTools(t)
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	root := filepath.Join(base, "root")
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "mode"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s := openAt(t, root, nil)
	if err := s.Purge(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if b, _ := os.ReadFile(filepath.Join(root, "mode")); string(b) != "flat\n" {
		t.Errorf("mode file %q, want \"flat\\n\"", b)
	}
	if err := os.WriteFile(filepath.Join(root, "mode"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := newSnapshotter(context.Background(), testConfig(root)); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("empty mode file beside metadata: %v, want FailedPrecondition", err)
	}
}
