package hook

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

// Check 14: a teardown started while setup holds the container lock waits,
// then sees the complete record; two setups for one id are serialized, the
// second replacing the first's record after a guarded teardown.
func TestSameContainerIDSerialized(t *testing.T) {
	e := newTestEnv(t)
	release := make(chan struct{})
	attached := make(chan struct{})
	var once sync.Once
	e.hook.hookForceAfterAttach = func(*loopdev.Device) {
		once.Do(func() { close(attached); <-release })
	}
	c := e.newFakeContainer("same", true, nil)
	st := c.state("same", StatusCreating, ann("squashfs", "/data"))
	setupDone := make(chan error, 1)
	go func() { setupDone <- e.hook.Setup(ctxT(t), st, nil) }()
	<-attached
	teardownDone := make(chan error, 1)
	go func() { teardownDone <- e.hook.Teardown(ctxT(t), c.state("same", StatusStopped, nil)) }()
	time.Sleep(100 * time.Millisecond)
	select {
	case err := <-teardownDone:
		close(release)
		t.Fatalf("teardown did not wait for the setup holding the lock: %v", err)
	default:
	}
	close(release)
	if err := <-setupDone; err != nil {
		t.Fatalf("setup: %v", err)
	}
	if err := <-teardownDone; err != nil {
		t.Fatalf("teardown: %v", err)
	}
	// The teardown saw the complete record: it found the mounted device and
	// cleared it (deferred: still mounted in the container).
	if !strings.Contains(e.logBuf.String(), "detach deferred") {
		t.Errorf("teardown did not act on the record:\n%s", e.logBuf)
	}
	if r, _ := e.recordOf(t, "same"); r != nil {
		t.Error("record left")
	}

	// Two concurrent setups for one id: both may succeed in turn, but only one
	// record exists and it names one device.
	e.hook.hookForceAfterAttach = nil
	c1 := e.newFakeContainer("same1", true, nil)
	c2 := e.newFakeContainer("same2", true, nil)
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, cc := range []*fakeContainer{c1, c2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = e.hook.Setup(ctxT(t), cc.state("same-twice", StatusCreating, ann("squashfs", "/data")), nil)
		}()
	}
	wg.Wait()
	rec, err := e.recordOf(t, "same-twice")
	if err != nil || rec == nil || len(rec.Mounts) != 1 {
		t.Fatalf("record %+v %v (setup errors %v)", rec, err, errs)
	}
	c.Kill()
	c1.Kill()
	c2.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	if err := e.hook.Teardown(ctxT(t), c1.state("same-twice", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
}

// Check 15: rw needs the global and the per-image switch; an rw image is
// exclusive: a second rw or an ro request for it is refused.
func TestReadWritePolicyAndExclusivity(t *testing.T) {
	e := newTestEnv(t, "ext4")
	img := e.cfg.Images["ext4"]
	rwAnn := func() map[string]string {
		a := ann("ext4", "/data")
		a["org.ociloop.rw"] = "true"
		return a
	}
	c1 := e.newFakeContainer("rw1", true, nil)
	// Global switch off.
	img.AllowRW = true
	e.cfg.Images["ext4"] = img
	e.rebuild()
	if err := e.hook.Setup(ctxT(t), c1.state("rw1", StatusCreating, rwAnn()), nil); ExitCode(err) != 3 {
		t.Fatalf("rw with allow_rw=false: %v", err)
	}
	// Image switch off.
	e.cfg.AllowRW = true
	img.AllowRW = false
	e.cfg.Images["ext4"] = img
	e.rebuild()
	if err := e.hook.Setup(ctxT(t), c1.state("rw1", StatusCreating, rwAnn()), nil); ExitCode(err) != 3 {
		t.Fatalf("rw with image allow_rw=false: %v", err)
	}
	assertNothingAttached(t, e)
	img.AllowRW = true
	e.cfg.Images["ext4"] = img
	e.rebuild()
	if err := e.hook.Setup(ctxT(t), c1.state("rw1", StatusCreating, rwAnn()), nil); err != nil {
		t.Fatalf("rw setup: %v", err)
	}
	line := c1.mountLine(t, "/data")
	if opts := strings.Fields(line)[5]; !strings.HasPrefix(opts, "rw,nosuid,nodev") {
		t.Errorf("rw mount options %q", opts)
	}
	c2 := e.newFakeContainer("rw2", true, nil)
	if err := e.hook.Setup(ctxT(t), c2.state("rw2", StatusCreating, rwAnn()), nil); ExitCode(err) != 3 {
		t.Fatalf("second rw: %v", err)
	}
	if err := e.hook.Setup(ctxT(t), c2.state("rw2", StatusCreating, ann("ext4", "/data")), nil); ExitCode(err) != 3 {
		t.Fatalf("ro while rw: %v", err)
	}
	if c2.mountLine(t, "/data") != "" {
		t.Fatal("second container got a mount")
	}
	c1.Kill()
	waitUnbound(t, img.Path)
	for _, id := range []string{"rw1", "rw2"} {
		if err := e.hook.Teardown(ctxT(t), c1.state(id, StatusStopped, nil)); err != nil {
			t.Fatal(err)
		}
	}
	// ro first, then rw: refused too.
	c3 := e.newFakeContainer("ro3", true, nil)
	if err := e.hook.Setup(ctxT(t), c3.state("ro3", StatusCreating, ann("ext4", "/data")), nil); err != nil {
		t.Fatal(err)
	}
	c4 := e.newFakeContainer("rw4", true, nil)
	if err := e.hook.Setup(ctxT(t), c4.state("rw4", StatusCreating, rwAnn()), nil); ExitCode(err) != 3 {
		t.Fatalf("rw while ro: %v", err)
	}
	c3.Kill()
	waitUnbound(t, img.Path)
	if err := e.hook.Teardown(ctxT(t), c3.state("ro3", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
}

// Check 21 (gc): records of dead containers are torn down, live ones and
// locked ones are left alone, corrupt ones are reported and kept.
func TestGC(t *testing.T) {
	e := newTestEnv(t)
	dead := e.newFakeContainer("dead", true, nil)
	live := e.newFakeContainer("live", true, nil)
	for id, c := range map[string]*fakeContainer{"gc-dead": dead, "gc-live": live} {
		if err := e.hook.Setup(ctxT(t), c.state(id, StatusCreating, ann("squashfs", "/data")), nil); err != nil {
			t.Fatal(err)
		}
	}
	store := openTestStore(t, e)
	// A stale record from a previous boot: its pid does not exist (or has
	// another start time).
	stale := &Record{ID: "gc-stale", InitPid: 1, InitStartTime: 1 << 40, Mounts: []MountRecord{{
		ImageDev: 1, ImageIno: 2, Device: "/dev/loop999999", Devnum: loopdev.Devnum(unix.Mkdev(7, 999999)), DiskSeq: 1, Phase: PhaseMounted,
	}}}
	if err := store.Write("gc-stale", stale); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.cfg.StateDir, "gc-corrupt.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(filepath.Join(e.cfg.StateDir, "gc-corrupt.json")) })
	busy, ok, err := store.TryLock("gc-busy")
	if err != nil || !ok {
		t.Fatal(err)
	}
	if err := store.Write("gc-busy", stale); err != nil {
		t.Fatal(err)
	}
	dead.Kill()
	res, err := e.hook.GC(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"removed": {"gc-dead", "gc-stale"}, "live": {"gc-live"}, "busy": {"gc-busy"}, "corrupt": {"gc-corrupt"},
	}
	got := map[string][]string{"removed": ids(res.Removed), "live": ids(res.Live), "busy": ids(res.Busy), "corrupt": ids(res.Corrupt)}
	for k := range want {
		if strings.Join(got[k], ",") != strings.Join(want[k], ",") {
			t.Errorf("gc %s = %v, want %v", k, got[k], want[k])
		}
	}
	if r, _ := e.recordOf(t, "gc-live"); r == nil {
		t.Error("live record removed")
	}
	if _, err := os.Stat(filepath.Join(e.cfg.StateDir, "gc-corrupt.json")); err != nil {
		t.Error("corrupt record removed")
	}
	busy.Unlock()
	store.Remove("gc-busy")
	live.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	res, err = e.hook.GC(ctxT(t))
	if err != nil || strings.Join(ids(res.Removed), ",") != "gc-live" {
		t.Fatalf("second gc: %+v %v", res, err)
	}
}

// Check 17: a destination on a shared mount is refused (a mount there would
// propagate to the peers, here the host).
func TestSharedDestinationRefused(t *testing.T) {
	e := newTestEnv(t)
	testutil.RequireBinaries(t, "mount", "umount")
	shared := filepath.Join(e.dir, "bundle-shared", "rootfs", "data")
	c := e.newSharedContainer(shared)
	before := hostMountinfo(t, e.dir)
	err := e.hook.Setup(ctxT(t), c.state("shared", StatusCreating, ann("squashfs", "/data")), nil)
	if ExitCode(err) != 3 || !strings.Contains(err.Error(), "shared") {
		t.Fatalf("err %v (exit %d), want exit 3 shared", err, ExitCode(err))
	}
	if hostMountinfo(t, e.dir) != before {
		t.Error("host mountinfo changed")
	}
	if b := testutil.BoundTo(e.cfg.Images["squashfs"].Path); len(b) != 0 {
		t.Errorf("image still bound: %v", b)
	}
	if r, _ := e.recordOf(t, "shared"); r != nil {
		t.Error("record left")
	}
}

// newSharedContainer bind-mounts dir onto itself as a shared mount in the
// host namespace and starts a container namespace that keeps it a peer.
func (e *testEnv) newSharedContainer(dir string) *fakeContainer {
	t := e.t
	mustMkdir(t, dir, 0o755)
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Dir(filepath.Dir(dir))
	data, _ := json.Marshal(map[string]any{"ociVersion": "1.0.2", "root": map[string]any{"path": "rootfs"}})
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "unchanged", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &fakeContainer{Pid: cmd.Process.Pid, Bundle: bundle, Rootfs: filepath.Join(bundle, "rootfs"), cmd: cmd}
	t.Cleanup(c.Kill)
	for range 500 {
		comm, _ := os.ReadFile("/proc/" + itoa(c.Pid) + "/comm")
		if strings.TrimSpace(string(comm)) == "sleep" {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	return c
}

// Check 24: an ext4 image whose journal needs recovery mounts read-only
// thanks to noload; without it the kernel refuses on a read-only device.
func TestExt4DirtyJournal(t *testing.T) {
	e := newTestEnv(t, "ext4")
	testutil.RequireBinaries(t, "debugfs", "dumpe2fs")
	img := e.cfg.Images["ext4"].Path
	if out, err := exec.Command("debugfs", "-w", "-R", "feature needs_recovery", img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v %s", err, out)
	}
	out, err := exec.Command("dumpe2fs", "-h", img).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "needs_recovery") {
		t.Fatalf("image is not dirty: %v %s", err, out)
	}
	e.cfg.Ext4ReadOnlyOptions = ""
	e.rebuild()
	c := e.newFakeContainer("dirty", true, nil)
	err = e.hook.Setup(ctxT(t), c.state("dirty0", StatusCreating, ann("ext4", "/data")), nil)
	if err == nil {
		t.Fatal("dirty ext4 mounted read-only without noload; the test proves nothing")
	}
	assertNothingAttached(t, e)
	e.cfg.Ext4ReadOnlyOptions = config.DefaultHook().Ext4ReadOnlyOptions
	e.rebuild()
	if err := e.hook.Setup(ctxT(t), c.state("dirty", StatusCreating, ann("ext4", "/data")), nil); err != nil {
		t.Fatalf("setup with noload: %v", err)
	}
	if got := c.readInside(t, "/data/hello.txt"); got != "ext4\n" {
		t.Errorf("hello.txt = %q", got)
	}
	c.Kill()
	waitUnbound(t, img)
	if err := e.hook.Teardown(ctxT(t), c.state("dirty", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
}

// Restart (check 22): a second setup for the same id and bundle replaces
// the record after tearing the previous one down; nothing of the first run
// leaks.
func TestRestartSameID(t *testing.T) {
	e := newTestEnv(t)
	c1 := e.newFakeContainer("r1", true, nil)
	if err := e.hook.Setup(ctxT(t), c1.state("restart", StatusCreating, ann("squashfs", "/data")), nil); err != nil {
		t.Fatal(err)
	}
	first, _ := e.recordOf(t, "restart")
	c1.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	c2 := e.newFakeContainer("r2", true, nil)
	c2.Bundle = c1.Bundle
	if err := e.hook.Setup(ctxT(t), c2.state("restart", StatusCreating, ann("squashfs", "/data")), nil); err != nil {
		t.Fatal(err)
	}
	second, _ := e.recordOf(t, "restart")
	if first == nil || second == nil || second.InitPid != c2.Pid || second.Mounts[0].DiskSeq == first.Mounts[0].DiskSeq {
		t.Fatalf("record not fresh: %+v then %+v", first, second)
	}
	if n := len(testutil.BoundTo(e.cfg.Images["squashfs"].Path)); n != 1 {
		t.Fatalf("%d devices bound, want 1", n)
	}
	c2.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	if err := e.hook.Teardown(ctxT(t), c2.state("restart", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
}

// Check 23: on the built-in defaults (no config file) a request is refused
// with exit 3, no request is exit 0, and teardown of an existing record
// still works (it needs only state_dir).
func TestBuiltInDefaults(t *testing.T) {
	e := newTestEnv(t)
	c := e.newFakeContainer("defaults", true, nil)
	if err := e.hook.Setup(ctxT(t), c.state("defaults", StatusCreating, ann("squashfs", "/data")), nil); err != nil {
		t.Fatal(err)
	}
	def := config.DefaultHook()
	def.StateDir = e.cfg.StateDir
	h := New(&def, nullLog(), "test")
	if err := h.Setup(ctxT(t), c.state("defaults2", StatusCreating, ann("squashfs", "/data")), nil); ExitCode(err) != 3 {
		t.Errorf("request on defaults: %v, want exit 3", err)
	}
	if err := h.Setup(ctxT(t), c.state("defaults3", StatusCreating, map[string]string{"x": "y"}), nil); err != nil {
		t.Errorf("no request on defaults: %v", err)
	}
	c.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	if err := h.Teardown(ctxT(t), c.state("defaults", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
	if r, _ := e.recordOf(t, "defaults"); r != nil {
		t.Error("record left")
	}
}

// ids strips the bundle hash from state names (these test ids have no dot).
func ids(names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i], _, _ = strings.Cut(n, ".")
	}
	return out
}
