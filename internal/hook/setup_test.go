package hook

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/loopkit/loopkit/internal/testutil"
)

// Check 1 and 2 at package level: each fstype mounts read-only, nosuid,
// nodev inside the container only; the loop device is read-only; after the
// container's namespace dies nothing stays bound and teardown removes the
// record; a second teardown is a no-op (check 3).
func TestSetupTeardownEachFSType(t *testing.T) {
	for _, fstype := range []string{"squashfs", "erofs", "ext4"} {
		t.Run(fstype, func(t *testing.T) {
			e := newTestEnv(t, fstype)
			c := e.newFakeContainer("c", true, nil)
			st := c.state("fs-"+fstype, StatusCreating, ann(fstype, "/data"))
			if err := e.hook.Setup(ctxT(t), st, nil); err != nil {
				t.Fatalf("setup: %v", err)
			}
			line := c.mountLine(t, "/data")
			if line == "" {
				t.Fatalf("no mount at /data in the container:\n%s", e.logBuf)
			}
			if opts := strings.Fields(line)[5]; !strings.HasPrefix(opts, "ro,nosuid,nodev") {
				t.Errorf("mount options %q, want ro,nosuid,nodev", opts)
			}
			if got := c.readInside(t, "/data/hello.txt"); got != fstype+"\n" {
				t.Errorf("hello.txt = %q", got)
			}
			if strings.Contains(hostMountinfo(t, e.dir), filepath.Join(c.Rootfs, "data")) {
				t.Errorf("mount visible in the host namespace")
			}
			img := e.cfg.Images[fstype].Path
			devs := testutil.BoundTo(img)
			if len(devs) != 1 {
				t.Fatalf("bound devices %v, want one", devs)
			}
			if ro, _ := os.ReadFile("/sys/block/" + devs[0] + "/ro"); strings.TrimSpace(string(ro)) != "1" {
				t.Errorf("/sys/block/%s/ro = %q, want 1", devs[0], ro)
			}
			rec, err := e.recordOf(t, st.ID)
			if err != nil || rec == nil || len(rec.Mounts) != 1 || rec.Mounts[0].Phase != PhaseMounted || rec.Mounts[0].Device != "/dev/"+devs[0] {
				t.Fatalf("record %+v, %v", rec, err)
			}
			c.Kill()
			waitUnbound(t, img)
			stopped := c.state(st.ID, StatusStopped, st.Annotations)
			for i := range 2 {
				if err := e.hook.Teardown(ctxT(t), stopped); err != nil {
					t.Fatalf("teardown %d: %v", i, err)
				}
			}
			if rec, err := e.recordOf(t, st.ID); rec != nil || err != nil {
				t.Fatalf("record left: %+v %v", rec, err)
			}
			// The device went with the namespace; by teardown time another
			// tester on this host may already have reused the number.
			if l := e.logBuf.String(); !strings.Contains(l, "already detached") && !strings.Contains(l, "reused: left alone") {
				t.Errorf("log lacks the teardown decision:\n%s", e.logBuf)
			}
		})
	}
}

func openTestStore(t *testing.T, e *testEnv) *Store {
	t.Helper()
	s, err := OpenStore(e.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// assertNothingAttached fails if any loop device is bound to a file under
// the test directory or any record exists.
func assertNothingAttached(t *testing.T, e *testEnv) {
	t.Helper()
	for k := range testutil.Snapshot(e.dir) {
		t.Errorf("left behind: %s", k)
	}
	if names, err := os.ReadDir(e.cfg.StateDir); err == nil {
		for _, n := range names {
			if strings.HasSuffix(n.Name(), ".json") {
				t.Errorf("record left: %s", n.Name())
			}
		}
	}
}

// Check 16: a process without its own mount namespace is refused with exit
// 4 before anything is attached.
func TestSetupRefusesHostMountNamespace(t *testing.T) {
	e := newTestEnv(t)
	c := e.newFakeContainer("hostns", false, nil)
	err := e.hook.Setup(ctxT(t), c.state("hostns", StatusCreating, ann("squashfs", "/data")), nil)
	if ExitCode(err) != 4 {
		t.Fatalf("err %v (exit %d), want exit 4", err, ExitCode(err))
	}
	if strings.Contains(hostMountinfo(t, e.dir), filepath.Join(c.Rootfs, "data")) {
		t.Error("something was mounted on the host")
	}
	assertNothingAttached(t, e)
}

// Check 6: hostile destination symlinks. The default policy refuses before
// any attach; with dest_symlinks = "in-root" the symlink is followed inside
// the rootfs, and the location it reaches must pass the destination policy
// itself: /etc (not an allowed prefix), the climbed-to host directory (read
// in-root: <rootfs>/tmp/...) and the always-denied /, /proc, /sys, /dev are
// refused (issue 12, finding 2); /mnt/real is allowed and the mount lands at
// <rootfs>/mnt/real. The host's /etc, the climbed-to host directory and the
// host mountinfo stay untouched.
func TestDestinationSymlinkEscape(t *testing.T) {
	hostDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(hostDir, "marker"), []byte("host\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	climb := "../../../../../../../../.." + hostDir
	cases := []struct {
		name, target string
		inRootWant   string // where the symlink leads, relative to the rootfs
		inRootErr    string // refusal in in-root mode; "" = the mount lands there
	}{
		{"absolute-etc", "/etc", "/etc", "resolves to /etc, which is not below an allowed prefix"},
		{"climb", climb, hostDir, "resolves to " + hostDir + ", which is not below an allowed prefix"},
		{"sys", "/sys", "/sys", "resolves to /sys, which is always denied"},
		{"proc", "../proc", "/proc", "resolves to /proc, which is always denied"},
		{"dev", "/dev", "/dev", "resolves to /dev, which is always denied"},
		{"root", "/", "/", "resolves to /, which is always denied"},
		{"allowed", "/mnt/real", "/mnt/real", ""},
	}
	for _, tc := range cases {
		for _, mode := range []string{"refuse", "in-root"} {
			t.Run(tc.name+"/"+mode, func(t *testing.T) {
				e := newTestEnv(t)
				e.cfg.DestSymlinks = mode
				e.rebuild()
				c := e.newFakeContainer("sym", true, func(rootfs string) {
					os.Remove(filepath.Join(rootfs, "data"))
					mustMkdir(t, filepath.Join(rootfs, tc.inRootWant), 0o755)
					if err := os.Symlink(tc.target, filepath.Join(rootfs, "data")); err != nil {
						t.Fatal(err)
					}
				})
				hostBefore := hostMountinfo(t, e.dir, hostDir)
				err := e.hook.Setup(ctxT(t), c.state("sym-"+mode, StatusCreating, ann("squashfs", "/data")), nil)
				switch {
				case mode == "refuse":
					if ExitCode(err) != 3 || !strings.Contains(err.Error(), "symlink refused") {
						t.Fatalf("err %v (exit %d), want exit 3 symlink refused", err, ExitCode(err))
					}
					assertNothingAttached(t, e)
				case tc.inRootErr != "":
					if ExitCode(err) != 3 || !strings.Contains(err.Error(), tc.inRootErr) {
						t.Fatalf("err %v (exit %d), want exit 3 %q", err, ExitCode(err), tc.inRootErr)
					}
					assertNothingAttached(t, e)
					if c.mountLine(t, tc.inRootWant) != "" {
						t.Fatalf("mounted at <rootfs>%s", tc.inRootWant)
					}
				default:
					if err != nil {
						t.Fatalf("setup: %v", err)
					}
					if c.mountLine(t, tc.inRootWant) == "" {
						t.Fatalf("mount not at <rootfs>%s", tc.inRootWant)
					}
					if got := c.readInside(t, tc.inRootWant+"/hello.txt"); got != "squashfs\n" {
						t.Errorf("hello.txt = %q", got)
					}
				}
				if got := hostMountinfo(t, e.dir, hostDir); got != hostBefore {
					t.Errorf("host mountinfo changed:\n%s\n---\n%s", hostBefore, got)
				}
				if b, err := os.ReadFile(filepath.Join(hostDir, "marker")); err != nil || string(b) != "host\n" {
					t.Errorf("host directory changed: %q %v", b, err)
				}
				if _, err := os.Stat("/etc/hello.txt"); err == nil {
					t.Errorf("host /etc gained hello.txt")
				}
				c.Kill()
				waitUnbound(t, e.cfg.Images["squashfs"].Path)
				if err := e.hook.Teardown(ctxT(t), c.state("sym-"+mode, StatusStopped, nil)); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

// --mount arguments combine with the JSON list annotation; when a later
// mount fails, the earlier ones are rolled back completely (podman runs no
// poststop after a failed setup).
func TestMultipleMountsAndRollback(t *testing.T) {
	e := newTestEnv(t, "squashfs", "erofs")
	c := e.newFakeContainer("multi", true, nil)
	args := []Request{{Image: "squashfs", Dest: "/mnt", Source: "argument"}}
	list := map[string]string{"org.ociloop.mounts": `[{"image":"erofs","dest":"/data","noexec":true}]`}
	st := c.state("multi", StatusCreating, list)
	if err := e.hook.Setup(ctxT(t), st, args); err != nil {
		t.Fatalf("setup: %v", err)
	}
	if got := c.readInside(t, "/mnt/hello.txt"); got != "squashfs\n" {
		t.Errorf("/mnt/hello.txt = %q", got)
	}
	if got := c.readInside(t, "/data/hello.txt"); got != "erofs\n" {
		t.Errorf("/data/hello.txt = %q", got)
	}
	if opts := strings.Fields(c.mountLine(t, "/data"))[5]; !strings.Contains(opts, "noexec") {
		t.Errorf("/data options %q lack noexec", opts)
	}
	rec, _ := e.recordOf(t, "multi")
	if rec == nil || len(rec.Mounts) != 2 {
		t.Fatalf("record %+v", rec)
	}
	c.Kill()
	for _, im := range e.cfg.Images {
		waitUnbound(t, im.Path)
	}
	if err := e.hook.Teardown(ctxT(t), c.state("multi", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}

	// The second mount's device fails to mount (a corrupt erofs body): the
	// first mount, already attached, is undone, and no record stays.
	bad := e.cfg.Images["erofs"]
	data, _ := os.ReadFile(bad.Path)
	for i := 1024 + 4; i < len(data); i++ {
		data[i] = 0xff
	}
	if err := os.WriteFile(bad.Path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	c2 := e.newFakeContainer("multi2", true, nil)
	err := e.hook.Setup(ctxT(t), c2.state("multi2", StatusCreating, list), args)
	if err == nil {
		t.Fatal("setup with a corrupt second image succeeded")
	}
	t.Logf("setup error: %v", err)
	// The first mount was moved into the container before the failure; the
	// runtime destroys the container, and with it that mount.
	c2.Kill()
	for _, im := range e.cfg.Images {
		waitUnbound(t, im.Path)
	}
	assertNothingAttached(t, e)
}
