package hook

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/loopkit/loopkit/internal/testutil"
)

// Issue 12, finding 11: in a container with a user namespace of its own,
// whose root has CAP_SYS_ADMIN over its mount namespace, the flags the hook
// set (ro, nosuid, nodev) are locked: remounting with dev,suid,exec or rw
// fails, even though the same remount of an unlocked mount succeeds there.
func TestUserNSFlagsLocked(t *testing.T) {
	testutil.RequireBinaries(t, "nsenter", "mount")
	e := newTestEnv(t)
	e.userNS = true
	c := e.newFakeContainer("userns", true, nil)
	st := c.state("userns", StatusCreating, ann("squashfs", "/data"))
	if err := e.hook.Setup(ctxT(t), st, nil); err != nil {
		t.Fatalf("setup: %v\n%s", err, e.logBuf)
	}
	dest := filepath.Join(c.Rootfs, "data")
	inside := func(args ...string) (string, error) {
		full := append([]string{"-t", itoa(c.Pid), "-U", "-m", "--preserve-credentials"}, args...)
		out, err := exec.Command("nsenter", full...).CombinedOutput()
		return string(out), err
	}
	for _, opts := range []string{"remount,bind,dev,suid,exec", "remount,bind,rw"} {
		if out, err := inside("mount", "-o", opts, dest); err == nil {
			t.Errorf("mount -o %s succeeded inside the user namespace: %s", opts, out)
		}
	}
	if line := c.mountLine(t, "/data"); !strings.Contains(line, " ro,nosuid,nodev") {
		t.Errorf("mount flags changed: %q", line)
	}
	if got := c.readInside(t, "/data/hello.txt"); got != "squashfs\n" {
		t.Errorf("hello.txt = %q", got)
	}
	// Control: a mount the container's root made itself is not locked, so
	// the refusal above is the lock's doing, not a missing capability.
	ctl := filepath.Join(c.Rootfs, "mnt")
	if out, err := inside("mount", "-t", "tmpfs", "-o", "nosuid,nodev,noexec", "ctl", ctl); err != nil {
		t.Fatalf("control mount: %v %s", err, out)
	}
	if out, err := inside("mount", "-o", "remount,bind,dev,suid,exec", ctl); err != nil {
		t.Errorf("control remount refused, the test proves nothing: %v %s", err, out)
	}
	c.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	if err := e.hook.Teardown(ctxT(t), c.state("userns", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
}

// Issue 12, finding 10: the hook registered as both prestart and
// createRuntime runs setup twice for the same container; the second run
// finds the first's record and does nothing (one mount, one device).
func TestSetupTwiceSameContainer(t *testing.T) {
	e := newTestEnv(t)
	c := e.newFakeContainer("twice", true, nil)
	st := c.state("twice", StatusCreating, ann("squashfs", "/data"))
	for i := range 2 {
		if err := e.hook.Setup(ctxT(t), st, nil); err != nil {
			t.Fatalf("setup %d: %v", i, err)
		}
	}
	if n := len(testutil.BoundTo(e.cfg.Images["squashfs"].Path)); n != 1 {
		t.Errorf("%d devices bound, want 1", n)
	}
	data, _ := os.ReadFile("/proc/" + itoa(c.Pid) + "/mountinfo")
	if n := strings.Count(string(data), " "+filepath.Join(c.Rootfs, "data")+" "); n != 1 {
		t.Errorf("%d mounts at /data, want 1", n)
	}
	if !strings.Contains(e.logBuf.String(), "already set up by an earlier hook stage") {
		t.Errorf("log lacks the no-op line:\n%s", e.logBuf)
	}
	c.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	if err := e.hook.Teardown(ctxT(t), c.state("twice", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
	assertStateEmpty(t, e)
}

// Issue 12, findings 8 and 9: the same id with two bundles (two runc roots)
// is two containers; each teardown releases only its own record, and after
// both nothing of either is left in the state directory, lock files
// included.
func TestSameIDTwoBundles(t *testing.T) {
	e := newTestEnv(t)
	a := e.newFakeContainer("a", true, nil)
	b := e.newFakeContainer("b", true, nil)
	for _, c := range []*fakeContainer{a, b} {
		if err := e.hook.Setup(ctxT(t), c.state("same", StatusCreating, ann("squashfs", "/data")), nil); err != nil {
			t.Fatal(err)
		}
	}
	b.Kill()
	if err := e.hook.Teardown(ctxT(t), b.state("same", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
	if a.mountLine(t, "/data") == "" {
		t.Fatal("b's teardown unmounted a")
	}
	if names, _ := openTestStore(t, e).Names(); len(names) != 1 || names[0] != StateName("same", a.Bundle) {
		t.Fatalf("records after b's teardown: %v", names)
	}
	a.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	if err := e.hook.Teardown(ctxT(t), a.state("same", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
	assertStateEmpty(t, e)
}

// Issue 12, finding 9: gc prunes lock files that have no record.
func TestGCPrunesLockFiles(t *testing.T) {
	e := newTestEnv(t)
	store := openTestStore(t, e)
	if err := os.WriteFile(filepath.Join(e.cfg.StateDir, "old.0123456789abcdef.lock"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	busy, ok, err := store.TryLock("busy")
	if err != nil || !ok {
		t.Fatal(err)
	}
	if _, err := e.hook.GC(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(e.cfg.StateDir)
	if len(entries) != 1 || entries[0].Name() != "busy.lock" {
		t.Errorf("state dir after gc: %v (want only the held busy.lock)", entries)
	}
	if err := busy.Unlock(); err != nil {
		t.Fatal(err)
	}
	assertStateEmpty(t, e)
}

// Issue 12, finding 1: a directory above the image owned by somebody else
// than root (who could swap its entries for symlinks), or a symlink
// anywhere on the path, is refused before anything is opened by name.
func TestImageAncestors(t *testing.T) {
	e := newTestEnv(t)
	u := filepath.Join(e.dir, "u")
	images := filepath.Join(u, "images")
	mustMkdir(t, images, 0o755)
	makeImage(t, filepath.Join(images, "x.squashfs"), "squashfs", "x")
	e.cfg.AllowedImageDirs = []string{images}
	e.rebuild()
	c := e.newFakeContainer("anc", true, nil)
	setup := func(image string) error {
		return e.hook.Setup(ctxT(t), c.state("anc", StatusCreating, ann(image, "/data")), nil)
	}
	if err := os.Chown(u, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	err := setup(filepath.Join(images, "x.squashfs"))
	if ExitCode(err) != 3 || !strings.Contains(err.Error(), "insecure image directory "+u+": owned by uid 65534, not root") {
		t.Errorf("nobody-owned ancestor: %v", err)
	}
	// What that owner could do: images -> / makes every root-owned file
	// "beneath" the allowed directory.
	os.Chown(u, 0, 0)
	if err := os.Rename(images, filepath.Join(u, "old")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/", images); err != nil {
		t.Fatal(err)
	}
	err = setup(images + e.cfg.Images["squashfs"].Path)
	if ExitCode(err) != 3 || !strings.Contains(err.Error(), "open "+images+": symlink refused") {
		t.Errorf("symlinked allowed directory: %v", err)
	}
	assertNothingAttached(t, e)
	// A world-writable image: "insecure image file", not "configuration".
	os.Remove(images)
	os.Rename(filepath.Join(u, "old"), images)
	os.Chmod(filepath.Join(images, "x.squashfs"), 0o666)
	err = setup(filepath.Join(images, "x.squashfs"))
	if ExitCode(err) != 3 || !strings.Contains(err.Error(), "insecure image file "+images+"/x.squashfs: group- or world-writable (mode 0666)") {
		t.Errorf("world-writable image: %v", err)
	}
	assertNothingAttached(t, e)
}

// assertStateEmpty fails when the state directory holds any file.
func assertStateEmpty(t *testing.T, e *testEnv) {
	t.Helper()
	entries, _ := os.ReadDir(e.cfg.StateDir)
	for _, en := range entries {
		t.Errorf("state directory still holds %s", en.Name())
	}
}

// Issue 12 finding 12 / issue 13: an attach failure names the image and the
// backing once ("attach X: attach X:" was printed twice), and the hook's
// debug level shows pkg/loopdev's own records through the slog bridge.
func TestAttachErrorTextAndLibraryLog(t *testing.T) {
	e := newTestEnv(t)
	path := e.cfg.Images["squashfs"].Path
	wronly, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer wronly.Close()
	im := &Image{Plan: Plan{Name: "squashfs", ImagePath: path}, File: wronly}
	var undo undoStack
	_, err = e.hook.attach(withLog(ctxT(t), e.hook.log), im, "name", &undo, e.hook.log)
	undo.run()
	want := `image "squashfs": attach ` + path + `: backing opened O_PATH or write-only: file descriptor in bad state`
	if err == nil || err.Error() != want {
		t.Errorf("attach error %q\nwant %q", err, want)
	}
	c := e.newFakeContainer("slog", true, nil)
	if err := e.hook.Setup(ctxT(t), c.state("slog", StatusCreating, ann("squashfs", "/data")), nil); err != nil {
		t.Fatal(err)
	}
	if l := e.logBuf.String(); !strings.Contains(l, `msg="loop device attached"`) || !strings.Contains(l, "container_id=slog") {
		t.Errorf("pkg/loopdev's debug record is not in the hook's log with its fields:\n%s", l)
	}
	c.Kill()
	waitUnbound(t, path)
	if err := e.hook.Teardown(ctxT(t), c.state("slog", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
}

// Issue 12, finding 9: removing the lock file at unlock must not break
// mutual exclusion. Holders unlink the file while holding it; a waiter that
// locked the unlinked file starts over on the new one. Many lockers at
// once never overlap, and no lock file is left.
func TestLockFileRemovalKeepsExclusion(t *testing.T) {
	testutil.RequireRoot(t)
	dir := filepath.Join(t.TempDir(), "state")
	store, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	var (
		mu      sync.Mutex
		holders int
		wg      sync.WaitGroup
	)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				l, err := store.Lock(ctxT(t), "c")
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				holders++
				if holders != 1 {
					t.Errorf("%d holders at once", holders)
				}
				mu.Unlock()
				runtime.Gosched()
				mu.Lock()
				holders--
				mu.Unlock()
				if err := l.Unlock(); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("left in the state directory: %v", entries)
	}
}

// Issue 12, finding 8: a second container with the same id and bundle
// (another runtime root) is refused at setup while the first runs; the
// first keeps its mount and record.
func TestSameIDSameBundleRefused(t *testing.T) {
	e := newTestEnv(t)
	a := e.newFakeContainer("a", true, nil)
	b := e.newFakeContainer("b", true, nil)
	b.Bundle = a.Bundle
	if err := e.hook.Setup(ctxT(t), a.state("dup", StatusCreating, ann("squashfs", "/data")), nil); err != nil {
		t.Fatal(err)
	}
	err := e.hook.Setup(ctxT(t), b.state("dup", StatusCreating, ann("squashfs", "/data")), nil)
	if ExitCode(err) != 3 || !strings.Contains(err.Error(), "another running container (pid "+itoa(a.Pid)+") with the same id and bundle") {
		t.Fatalf("second setup: %v", err)
	}
	if r, _ := e.recordOf(t, "dup"); r == nil || r.InitPid != a.Pid || a.mountLine(t, "/data") == "" {
		t.Fatal("the refused setup touched the running container's record or mount")
	}
	if n := len(testutil.BoundTo(e.cfg.Images["squashfs"].Path)); n != 1 {
		t.Errorf("%d devices bound, want 1", n)
	}
	a.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	if err := e.hook.Teardown(ctxT(t), a.state("dup", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
	assertStateEmpty(t, e)
}
