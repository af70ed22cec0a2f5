package hook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

// testEnv is one privileged test's world: images, a rootfs, a state
// directory and a log buffer, all under one temp dir.
type testEnv struct {
	t      *testing.T
	dir    string
	images string // root-owned 0755 image directory
	cfg    config.Hook
	logBuf *syncBuffer
	hook   *Hook
	userNS bool // newFakeContainer puts the process in a user namespace of its own
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newTestEnv gates on root and loop devices, registers the leak check and
// builds a squashfs image "sq" (and "erofs"/"ext4" on request).
// TestMain lets the test binary play the hook's flag-locking helper, which
// the hook runs by re-executing /proc/self/exe.
func TestMain(m *testing.M) {
	if len(os.Args) == 3 && os.Args[1] == LockChildCommand {
		os.Exit(RunLockChild(os.Args[2]))
	}
	os.Exit(m.Run())
}

func newTestEnv(t *testing.T, fstypes ...string) *testEnv {
	t.Helper()
	testutil.RequireRoot(t)
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	e := &testEnv{t: t, dir: dir, images: filepath.Join(dir, "images"), logBuf: &syncBuffer{}}
	mustMkdir(t, e.images, 0o755)
	e.cfg = config.DefaultHook()
	e.cfg.StateDir = filepath.Join(dir, "state")
	e.cfg.Images = map[string]config.HookImage{}
	if len(fstypes) == 0 {
		fstypes = []string{"squashfs"}
	}
	for _, fs := range fstypes {
		e.addImage(fs, fs)
	}
	e.rebuild()
	return e
}

func (e *testEnv) rebuild() {
	l := logrus.New()
	l.SetOutput(e.logBuf)
	l.SetLevel(logrus.DebugLevel)
	l.SetFormatter(&logrus.TextFormatter{DisableColors: true, DisableTimestamp: true})
	e.hook = New(&e.cfg, logrus.NewEntry(l), "test")
}

// addImage builds an image of fstype holding hello.txt = name and lists it
// in the catalog under name.
func (e *testEnv) addImage(name, fstype string) string {
	e.t.Helper()
	path := filepath.Join(e.images, name+"."+fstype)
	makeImage(e.t, path, fstype, name)
	e.cfg.Images[name] = config.HookImage{Path: path, FSType: fstype}
	return path
}

func makeImage(t *testing.T, path, fstype, content string) {
	t.Helper()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "hello.txt"), []byte(content+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var cmd *exec.Cmd
	switch fstype {
	case "squashfs":
		testutil.RequireBinaries(t, "mksquashfs")
		cmd = exec.Command("mksquashfs", src, path, "-noappend", "-quiet", "-no-progress")
	case "erofs":
		testutil.RequireBinaries(t, "mkfs.erofs")
		cmd = exec.Command("mkfs.erofs", "--quiet", path, src)
	case "ext4":
		testutil.RequireBinaries(t, "mkfs.ext4")
		cmd = exec.Command("mkfs.ext4", "-q", "-F", "-d", src, path, "8M")
	default:
		t.Fatalf("unknown fstype %s", fstype)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
}

func mustMkdir(t *testing.T, p string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(p, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

// fakeContainer is a process in a private mount namespace of its own that
// plays runc init before pivot_root: its "/" is the host root, the rootfs is
// a directory below it, and the bundle's config.json names that rootfs.
type fakeContainer struct {
	Pid    int
	Bundle string
	Rootfs string
	cmd    *exec.Cmd
}

// newFakeContainer starts the process with "unshare --mount --propagation
// private" (or, with sharedNS, without a new namespace at all) and kills it
// at cleanup. prepare runs on the rootfs before the start.
func (e *testEnv) newFakeContainer(name string, newNS bool, prepare func(rootfs string)) *fakeContainer {
	e.t.Helper()
	testutil.RequireBinaries(e.t, "unshare", "sleep")
	bundle := filepath.Join(e.dir, "bundle-"+name)
	rootfs := filepath.Join(bundle, "rootfs")
	mustMkdir(e.t, filepath.Join(rootfs, "data"), 0o755)
	mustMkdir(e.t, filepath.Join(rootfs, "mnt"), 0o755)
	cfg := map[string]any{"ociVersion": "1.0.2", "root": map[string]any{"path": "rootfs"}}
	data, _ := json.Marshal(cfg)
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o644); err != nil {
		e.t.Fatal(err)
	}
	if prepare != nil {
		prepare(rootfs)
	}
	args := []string{"unshare", "--mount", "--propagation", "private", "sleep", "600"}
	if !newNS {
		args = []string{"sleep", "600"}
	}
	if e.userNS {
		args = []string{"unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", "sleep", "600"}
	}
	cmd := exec.Command(args[0], args[1:]...)
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	c := &fakeContainer{Pid: cmd.Process.Pid, Bundle: bundle, Rootfs: rootfs, cmd: cmd}
	e.t.Cleanup(c.Kill)
	// unshare execs sleep in place; wait until the exec happened so the pid
	// is in its final namespace.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		comm, _ := os.ReadFile("/proc/" + itoa(c.Pid) + "/comm")
		if strings.TrimSpace(string(comm)) == "sleep" {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	return c
}

// Kill ends the process and reaps it; its namespace dies with it, which
// unmounts whatever the hook moved there.
func (c *fakeContainer) Kill() {
	if c.cmd.ProcessState != nil {
		return
	}
	_ = c.cmd.Process.Kill()
	_ = c.cmd.Wait()
}

func (c *fakeContainer) state(id, status string, ann map[string]string) *State {
	pid := c.Pid
	if status == StatusStopped {
		pid = 0
	}
	return &State{OCIVersion: "1.0.2", ID: id, Status: status, Pid: pid, Bundle: c.Bundle, Annotations: ann}
}

// mountLine returns the line of the container's mountinfo whose mount point
// is the rootfs path + dest, or "".
func (c *fakeContainer) mountLine(t *testing.T, dest string) string {
	t.Helper()
	data, err := os.ReadFile("/proc/" + itoa(c.Pid) + "/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(c.Rootfs, dest)
	for _, l := range strings.Split(string(data), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && f[4] == want {
			return l
		}
	}
	return ""
}

// readInside reads a file through the container's root.
func (c *fakeContainer) readInside(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", itoa(c.Pid), "root", c.Rootfs, p))
	if err != nil {
		t.Fatalf("read %s inside the container: %v", p, err)
	}
	return string(b)
}

func ann(image, dest string) map[string]string {
	return map[string]string{"org.ociloop.image": image, "org.ociloop.dest": dest}
}

func itoa(i int) string { return strconv.Itoa(i) }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// hostMountinfo returns the lines of the test process's (host) mountinfo
// whose mount point lies at or under one of dirs or /etc, where a test could
// leak a mount (other parts of the host change under other tests).
func hostMountinfo(t *testing.T, dirs ...string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 5 {
			continue
		}
		for _, d := range append(dirs, "/etc") {
			if f[4] == d || strings.HasPrefix(f[4], d+"/") {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

// waitUnbound waits (bounded) for the autoclear detach of path's devices,
// which the kernel performs as the last holder goes away.
func waitUnbound(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(testutil.BoundTo(path)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s still bound: %v", path, testutil.BoundTo(path))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func nullLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

func isGoneOrReused(err error) bool {
	return errors.Is(err, loopdev.ErrGone) || errors.Is(err, loopdev.ErrReused)
}

// recordOf returns the stored record of the container id (whatever bundle
// it was keyed with), or nil; unreadable records are skipped.
func (e *testEnv) recordOf(t *testing.T, id string) (*Record, error) {
	t.Helper()
	store := openTestStore(t, e)
	names, err := store.Names()
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		rec, err := store.Read(n)
		if err == nil && rec != nil && rec.ID == id {
			return rec, nil
		}
	}
	return nil, nil
}
