package hook

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

// Checks 8, 9, 10: images outside the allow-list, non-regular files,
// insecure files and magic mismatches are refused with exit 3 and nothing
// is attached. A FIFO must not hang the hook.
func TestImageRefusals(t *testing.T) {
	e := newTestEnv(t, "squashfs", "ext4")
	sq := e.cfg.Images["squashfs"].Path
	scratch := filepath.Join(e.dir, "scratch")
	mustMkdir(t, scratch, 0o777)
	if err := unix.Chmod(scratch, 0o1777); err != nil {
		t.Fatal(err)
	}
	copyFile(t, sq, filepath.Join(scratch, "x.sqfs"))
	raw := filepath.Join(e.dir, "raw")
	mustMkdir(t, raw, 0o755)
	copyFile(t, sq, filepath.Join(raw, "ok.sqfs"))
	if err := os.Symlink("/etc/passwd", filepath.Join(raw, "out.sqfs")); err != nil {
		t.Fatal(err)
	}
	e.cfg.AllowedImageDirs = []string{raw}

	special := map[string]string{}
	add := func(name string, mk func(p string)) {
		p := filepath.Join(e.images, name)
		mk(p)
		e.cfg.Images[name] = config.HookImage{Path: p, FSType: "squashfs"}
		special[name] = p
	}
	// A device node (what a symlink or hardlink to /dev/loopX amounts to).
	add("blockdev", func(p string) {
		if err := unix.Mknod(p, unix.S_IFBLK|0o600, int(unix.Mkdev(7, 0))); err != nil {
			t.Fatal(err)
		}
	})
	add("devsymlink", func(p string) {
		if err := os.Symlink("/dev/loop0", p); err != nil {
			t.Fatal(err)
		}
	})
	add("fifo", func(p string) {
		if err := unix.Mkfifo(p, 0o600); err != nil {
			t.Fatal(err)
		}
	})
	add("dir", func(p string) { mustMkdir(t, p, 0o755) })
	add("socket", func(p string) {
		l, err := net.Listen("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
	})
	add("groupwritable", func(p string) {
		copyFile(t, sq, p)
		if err := os.Chmod(p, 0o664); err != nil {
			t.Fatal(err)
		}
	})
	add("notroot", func(p string) {
		copyFile(t, sq, p)
		if err := os.Chown(p, 1000, 1000); err != nil {
			t.Fatal(err)
		}
	})
	// Magic mismatch: a squashfs image declared as ext4 and the reverse.
	e.cfg.Images["sq-as-ext4"] = config.HookImage{Path: sq, FSType: "ext4"}
	e.cfg.Images["ext4-as-erofs"] = config.HookImage{Path: e.cfg.Images["ext4"].Path, FSType: "erofs"}
	e.rebuild()

	c := e.newFakeContainer("adv", true, nil)
	cases := []struct {
		name, image string
		code        int
	}{
		{"etc-shadow", "/etc/shadow", 3},
		{"world-writable-dir", filepath.Join(scratch, "x.sqfs"), 3},
		{"dotdot", "../../etc/passwd", 3},
		{"raw-not-clean", raw + "/../raw/ok.sqfs", 3},
		{"symlink-out", filepath.Join(raw, "out.sqfs"), 3},
		{"not-in-catalog", "dataset9", 3},
		{"bad-name", "data set", 2},
		{"block-device", "blockdev", 3},
		{"symlink-to-loop", "devsymlink", 3},
		{"fifo", "fifo", 3},
		{"directory", "dir", 3},
		{"socket", "socket", 3},
		{"group-writable", "groupwritable", 3},
		{"not-root-owned", "notroot", 3},
		{"magic-sq-as-ext4", "sq-as-ext4", 3},
		{"magic-ext4-as-erofs", "ext4-as-erofs", 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := e.hook.Setup(ctxT(t), c.state("adv-"+tc.name, StatusCreating, ann(tc.image, "/data")), nil)
			if got := ExitCode(err); got != tc.code {
				t.Fatalf("err %v: exit %d, want %d", err, got, tc.code)
			}
			if strings.Contains(err.Error(), "no such file or directory") {
				t.Errorf("error text %q contains the bare strerror", err)
			}
			if c.mountLine(t, "/data") != "" {
				t.Fatal("something got mounted")
			}
			assertNothingAttached(t, e)
		})
	}
	// The raw-path mode itself works, so the refusals above are not vacuous.
	t.Run("raw-allowed", func(t *testing.T) {
		st := c.state("adv-raw", StatusCreating, ann(filepath.Join(raw, "ok.sqfs"), "/data"))
		if err := e.hook.Setup(ctxT(t), st, nil); err != nil {
			t.Fatalf("setup: %v", err)
		}
		if c.mountLine(t, "/data") == "" {
			t.Fatal("raw image not mounted")
		}
		c.Kill()
		waitUnbound(t, filepath.Join(raw, "ok.sqfs"))
		if err := e.hook.Teardown(ctxT(t), c.state(st.ID, StatusStopped, nil)); err != nil {
			t.Fatal(err)
		}
	})
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// Check 11: after the container is gone another file is attached to the
// same /dev/loopN (new diskseq); teardown leaves that binding alone, logs
// "reused: left alone" and succeeds.
func TestTeardownLeavesReusedDevice(t *testing.T) {
	e := newTestEnv(t)
	testutil.RequireBinaries(t, "losetup")
	c := e.newFakeContainer("reuse", true, nil)
	st := c.state("reuse", StatusCreating, ann("squashfs", "/data"))
	if err := e.hook.Setup(ctxT(t), st, nil); err != nil {
		t.Fatal(err)
	}
	rec, err := e.recordOf(t, "reuse")
	if err != nil || rec == nil {
		t.Fatalf("record: %v", err)
	}
	c.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)

	other := filepath.Join(e.dir, "other.img")
	if err := os.WriteFile(other, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	node := rec.Mounts[0].Device
	if out, err := exec.Command("losetup", node, other).CombinedOutput(); err != nil {
		t.Skipf("%s was taken by someone else before the test could reuse it: %v %s", node, err, out)
	}
	foreign, err := loopdev.Open(ctxT(t), node, loopdev.OpenOptions{Access: loopdev.AccessReadOnly})
	if err != nil {
		t.Fatal(err)
	}
	foreignRec := foreign.Record()
	foreign.Close()
	t.Cleanup(func() {
		if err := loopdev.DetachRecord(ctxT(t), foreignRec, loopdev.DetachOptions{}); err != nil && !isGoneOrReused(err) {
			t.Errorf("cleanup detach %s: %v", node, err)
		}
	})
	if foreignRec.DiskSeq == rec.Mounts[0].DiskSeq {
		t.Fatalf("diskseq did not change on reuse: %d", foreignRec.DiskSeq)
	}
	if err := e.hook.Teardown(ctxT(t), c.state("reuse", StatusStopped, nil)); err != nil {
		t.Fatalf("teardown: %v", err)
	}
	if !strings.Contains(e.logBuf.String(), "reused: left alone") {
		t.Errorf("log lacks 'reused: left alone':\n%s", e.logBuf)
	}
	if err := loopdev.Verify(foreignRec); err != nil {
		t.Fatalf("the foreign binding was touched: %v", err)
	}
	if r, _ := e.recordOf(t, "reuse"); r != nil {
		t.Error("record left after teardown")
	}
}

// Check 12: while setup holds the loop fd, the device is detached from
// outside. Setup either completes with a record whose diskseq is the
// device's current one, or fails cleanly; no record ever names a device
// with another diskseq.
func TestForeignDetachDuringSetup(t *testing.T) {
	e := newTestEnv(t)
	testutil.RequireBinaries(t, "losetup")
	var losetupErr error
	e.hook.hookForceAfterAttach = func(d *loopdev.Device) {
		if out, err := exec.Command("losetup", "-d", d.Path()).CombinedOutput(); err != nil {
			losetupErr = err
			t.Logf("losetup -d: %v %s", err, out)
		}
	}
	c := e.newFakeContainer("race", true, nil)
	err := e.hook.Setup(ctxT(t), c.state("race", StatusCreating, ann("squashfs", "/data")), nil)
	if losetupErr != nil {
		t.Logf("foreign detach failed: %v", losetupErr)
	}
	rec, rerr := e.recordOf(t, "race")
	if rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil {
		if rec != nil {
			t.Fatalf("failed setup (%v) left a record", err)
		}
		assertNothingAttached(t, e)
		return
	}
	if rec == nil || len(rec.Mounts) != 1 {
		t.Fatalf("record %+v", rec)
	}
	if got := c.readInside(t, "/data/hello.txt"); got != "squashfs\n" {
		t.Errorf("hello.txt = %q", got)
	}
	m := rec.Mounts[0]
	seq, err := os.ReadFile("/sys/block/" + filepath.Base(m.Device) + "/diskseq")
	if err != nil {
		t.Fatalf("device of the record is gone while mounted: %v", err)
	}
	if strings.TrimSpace(string(seq)) != itoa(int(m.DiskSeq)) {
		t.Fatalf("record diskseq %d, device %s", m.DiskSeq, seq)
	}
	c.Kill()
	waitUnbound(t, e.cfg.Images["squashfs"].Path)
	if err := e.hook.Teardown(ctxT(t), c.state("race", StatusStopped, nil)); err != nil {
		t.Fatal(err)
	}
}
