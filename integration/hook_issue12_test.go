//go:build integration

package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/hook"
	"github.com/loopkit/loopkit/internal/nsthread"
	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

// TestHookIssue12 holds the regression tests of issue 12 (oci-loop-hook
// red-team findings), each through real runc as the finding was reproduced.
func TestHookIssue12(t *testing.T) {
	w := newHookWorld(t, "")
	failsWith := func(t *testing.T, out string, err error, exit int, reason string) {
		t.Helper()
		if err == nil {
			t.Fatalf("runc run succeeded:\n%s", out)
		}
		if !strings.Contains(out, fmt.Sprintf("exit status %d", exit)) || !strings.Contains(out, reason) {
			t.Errorf("runc output lacks exit %d and %q:\n%s", exit, reason, out)
		}
	}

	// Finding 1: allowed_image_dirs = [/X/u/images] with /X/u owned by
	// nobody, who swaps images for a symlink to / and requests a root-owned
	// image elsewhere. Refused: every directory on the path is checked, and
	// no component is followed through a symlink.
	t.Run("f1-image-ancestor", func(t *testing.T) {
		u := filepath.Join(w.dir, "f1", "u")
		images := filepath.Join(u, "images")
		if err := os.MkdirAll(images, 0o755); err != nil {
			t.Fatal(err)
		}
		os.Chmod(filepath.Join(w.dir, "f1"), 0o755)
		cfg := w.withConfig("f1", fmt.Sprintf("allowed_image_dirs = [%q]", images), "")
		// What nobody (owner of u) can do: mv images old; ln -s / images.
		if err := os.Rename(images, filepath.Join(u, "old")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/", images); err != nil {
			t.Fatal(err)
		}
		os.Lchown(images, 65534, 65534)
		target := images + filepath.Join(w.images, "e.erofs") // a root-owned image outside the allowed dir
		for _, tc := range []struct{ name, reason string }{
			{"owner-nobody", "insecure image directory " + u + ": owned by uid 65534, not root"},
			{"owner-root", "open " + images + ": symlink refused"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				uid := 65534
				if tc.name == "owner-root" {
					uid = 0
				}
				if err := os.Chown(u, uid, uid); err != nil {
					t.Fatal(err)
				}
				id := hookUniqueID("f1")
				b := w.bundle(id, bundleOpts{args: []string{"/bin/true"}, annotations: annFor(target, "/data"), setupArgs: setupWith(cfg)})
				out, err := w.runcRun(id, b)
				failsWith(t, out, err, 3, tc.reason)
				w.assertClean()
			})
		}
	})

	// Finding 2: with dest_symlinks = "in-root", data -> /sys (/, /proc,
	// /dev, /etc) in the rootfs mounted the image over the container's
	// /sys. The resolved location is now checked like the request.
	t.Run("f2-in-root-denied", func(t *testing.T) {
		cfg := w.withConfig("f2", `dest_symlinks = "in-root"`, "")
		for target, reason := range map[string]string{
			"/sys": "resolves to /sys, which is always denied", "/proc": "resolves to /proc, which is always denied",
			"/dev": "resolves to /dev, which is always denied", "/": "resolves to /, which is always denied",
			"/etc": "resolves to /etc, which is not below an allowed prefix",
		} {
			t.Run(strings.Trim(strings.ReplaceAll(target, "/", "-"), "-")+"root", func(t *testing.T) {
				id := hookUniqueID("f2")
				b := w.bundle(id, bundleOpts{args: []string{"/bin/true"}, annotations: annFor("sq", "/data"), setupArgs: setupWith(cfg),
					prepare: func(rootfs string) {
						os.Remove(filepath.Join(rootfs, "data"))
						if err := os.Symlink(target, filepath.Join(rootfs, "data")); err != nil {
							t.Fatal(err)
						}
					}})
				out, err := w.runcRun(id, b)
				failsWith(t, out, err, 3, reason)
				w.assertClean()
			})
		}
	})

	// Finding 3: setup stat'ed every loop device's backing path on the
	// host; one backing on a hung FUSE mount stalled every setup to the
	// watchdog. Here a loop device of this test has its backing under a
	// FUSE mount whose daemon never answers, in a private mount namespace
	// where runc (and so the hook) runs: any lookup of that path blocks
	// until the connection is aborted. Setup must succeed, and the FUSE
	// connection must have no request waiting.
	t.Run("f3-hung-fuse-backing", func(t *testing.T) {
		hung := filepath.Join(w.dir, "f3-fuse")
		if err := os.MkdirAll(hung, 0o755); err != nil {
			t.Fatal(err)
		}
		backing := filepath.Join(hung, "x.img")
		if err := os.WriteFile(backing, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		dev, err := loopdev.Attach(ctx, backing, loopdev.Options{Access: loopdev.AccessReadOnly})
		if err != nil {
			t.Fatal(err)
		}
		defer dev.Close() // autoclear frees it
		id := hookUniqueID("f3")
		b := w.bundle(id, bundleOpts{args: []string{"/bin/cat", "/data/hello.txt"}, annotations: annFor("sq", "/data")})
		var out, before, after string
		err = hookInHungFUSENamespace(t, hung, func(connDir string) error {
			// FUSE_INIT, queued at mount time and never answered, is
			// the one request waiting before the run.
			b0, _ := os.ReadFile(filepath.Join(connDir, "waiting"))
			before = strings.TrimSpace(string(b0))
			cmd := exec.Command("runc", "--root", w.runcRoot, "run", "--bundle", b, id)
			o, err := cmd.CombinedOutput()
			out = string(o)
			b1, _ := os.ReadFile(filepath.Join(connDir, "waiting"))
			after = strings.TrimSpace(string(b1))
			return err
		})
		if err != nil || !strings.Contains(out, "hello from the image") {
			t.Fatalf("runc run with a hung backing on the host: %v\n%s\n%s", err, out, w.logText())
		}
		if before != "1" || after != before {
			t.Errorf("requests waiting on the hung FUSE connection: %s before the run, %s after", before, after)
		}
		w.assertClean()
	})

	// Finding 4: a record with diskseq 0 and a zero backing identity made
	// teardown detach a foreign device even with require_diskseq = true.
	// Such a record is corrupt: exit 2, the record stays, the device too.
	t.Run("f4-zero-identity", func(t *testing.T) {
		other := filepath.Join(w.dir, "f4-foreign.img")
		if err := os.WriteFile(other, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		foreign, err := loopdev.Attach(ctx, other, loopdev.Options{Access: loopdev.AccessReadOnly})
		if err != nil {
			t.Fatal(err)
		}
		defer foreign.Close()
		id, bundle := hookUniqueID("f4"), "/run/f4-bundle"
		rec := fmt.Sprintf(`{"tool_version":"x","id":%q,"bundle":%q,"init_pid":0,"init_start_time":0,"mnt_ns_inode":0,"created":"2026-01-01T00:00:00Z","mounts":[{"name":"sq","image_path":"/x","image_dev":0,"image_ino":0,"image_size":1,"fstype":"squashfs","mode":"ro","dest":"/data","device":%q,"devnum":%q,"diskseq":0,"phase":"mounted"}]}`,
			id, bundle, foreign.Path(), foreign.Devnum().String())
		os.MkdirAll(w.state, 0o700)
		recPath := filepath.Join(w.state, hook.StateName(id, bundle)+".json")
		if err := os.WriteFile(recPath, []byte(rec), 0o600); err != nil {
			t.Fatal(err)
		}
		// The corrupt record stays for inspection, and its lock file with it.
		defer os.Remove(strings.TrimSuffix(recPath, ".json") + ".lock")
		defer os.Remove(recPath)
		code, errs := runHookBin(t, w.bin, hookState(id, "stopped", 0, bundle, nil), nil, "/", "--config", w.config, "poststop")
		if code != 2 || !strings.Contains(errs, "corrupt: mounts[0]: image_dev and image_ino are 0 (no backing identity)") {
			t.Errorf("teardown of a zero-identity record: exit %d %q", code, errs)
		}
		if err := loopdev.Verify(foreign.Record()); err != nil {
			t.Errorf("the foreign device was touched: %v", err)
		}
		if _, err := os.Stat(recPath); err != nil {
			t.Errorf("corrupt record not left in place: %v", err)
		}
	})

	// Finding 5: create_dest made 0700 directories (the hook's umask), so a
	// container running as uid 1000 got "Permission denied" below them.
	t.Run("f5-create-dest-nonroot", func(t *testing.T) {
		cfg := w.withConfig("f5", "create_dest = true", "")
		id := hookUniqueID("f5")
		b := w.bundle(id, bundleOpts{uid: 1000, args: []string{"/bin/sh", "-c", "stat -c %a /data/a; cat /data/a/b/hello.txt"},
			annotations: annFor("sq", "/data/a/b"), setupArgs: setupWith(cfg)})
		out, err := w.runcRun(id, b)
		if err != nil || !strings.HasPrefix(out, "755\n") || !strings.Contains(out, "hello from the image") {
			t.Errorf("uid 1000 below a created destination: %v\n%s\n%s", err, out, w.logText())
		}
		w.assertClean()
	})

	// Finding 6: with [{sq -> /data}, {erofs -> /data/sub}] the second mount
	// landed hidden under the first. Nested destinations are refused, also
	// when only their resolved locations nest (in-root symlink).
	t.Run("f6-nested", func(t *testing.T) {
		cfg := w.withConfig("f6", `dest_symlinks = "in-root"`, "")
		for name, tc := range map[string]struct{ mounts, reason string }{
			"lexical":  {`[{"image":"sq","dest":"/data"},{"image":"erofs","dest":"/data/sub"}]`, "destinations /data and /data/sub are nested"},
			"resolved": {`[{"image":"sq","dest":"/data/in"},{"image":"erofs","dest":"/mnt/link"}]`, "destinations /data/in and /mnt/link are nested (they resolve to /data/in and /data)"},
		} {
			t.Run(name, func(t *testing.T) {
				id := hookUniqueID("f6")
				b := w.bundle(id, bundleOpts{args: []string{"/bin/true"}, setupArgs: setupWith(cfg),
					annotations: map[string]string{"org.ociloop.mounts": tc.mounts},
					prepare: func(rootfs string) {
						os.MkdirAll(filepath.Join(rootfs, "data", "in"), 0o755)
						os.Symlink("/data", filepath.Join(rootfs, "mnt", "link"))
					}})
				out, err := w.runcRun(id, b)
				failsWith(t, out, err, 2, tc.reason)
				w.assertClean()
			})
		}
	})

	// Finding 7: a FIFO at the log path hung the hook forever.
	t.Run("f7-fifo-log", func(t *testing.T) {
		fifo := filepath.Join(w.dir, "f7.fifo")
		if err := unix.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg := filepath.Join(w.dir, "f7.toml")
		os.WriteFile(cfg, []byte(strings.Replace(w.cfgBody, "log = \"file:"+w.log+"\"", "log = \"file:"+fifo+"\"", 1)), 0o644)
		id := hookUniqueID("f7")
		b := w.bundle(id, bundleOpts{args: []string{"/bin/cat", "/data/hello.txt"}, annotations: annFor("sq", "/data"), setupArgs: setupWith(cfg)})
		out, err := w.runcRun(id, b)
		if err != nil || !strings.Contains(out, "hello from the image") {
			t.Errorf("runc run with a FIFO log: %v\n%s", err, out)
		}
		w.assertClean()
	})

	// Finding 8: the same id under two runc roots made each container's
	// poststop tear down the other's record. Now each has its own.
	t.Run("f8-same-id-two-roots", func(t *testing.T) {
		id := hookUniqueID("f8")
		root2 := filepath.Join(w.dir, "runc2")
		os.MkdirAll(root2, 0o700)
		b1 := w.bundle(id, bundleOpts{dir: id + "-1", args: []string{"/bin/sleep", "600"}, annotations: annFor("sq", "/data")})
		b2 := w.bundle(id, bundleOpts{dir: id + "-2", args: []string{"/bin/sleep", "600"}, annotations: annFor("erofs", "/data")})
		t.Cleanup(func() { exec.Command("runc", "--root", root2, "delete", "--force", id).Run() })
		if err := w.runcDetached(id, b1); err != nil {
			t.Fatal(err)
		}
		if err := w.runcDetachedIn(root2, id, b2); err != nil {
			t.Fatal(err)
		}
		if n := len(testutil.BoundTo(filepath.Join(w.images, "sq.sqfs"))) + len(testutil.BoundTo(filepath.Join(w.images, "e.erofs"))); n != 2 {
			t.Fatalf("%d devices bound, want 2", n)
		}
		w.runcStopIn(root2, id)
		if out, err := w.runcExec(id, "cat", "/data/hello.txt"); err != nil || !strings.Contains(out, "hello from the image") {
			t.Errorf("the first container lost its mount when the second stopped: %v %s", err, out)
		}
		if len(testutil.BoundTo(filepath.Join(w.images, "sq.sqfs"))) != 1 || w.record(id) == nil {
			t.Errorf("the first container's device or record is gone")
		}
		w.runcStop(id)
		w.assertClean()
	})

	// Finding 10: the hook registered for both prestart and createRuntime
	// gave two stacked mounts and two devices.
	t.Run("f10-prestart-and-createRuntime", func(t *testing.T) {
		id := hookUniqueID("f10")
		b := w.bundle(id, bundleOpts{prestart: true, args: []string{"/bin/sh", "-c", "grep -c ' /data ' /proc/self/mountinfo; cat /data/hello.txt"},
			annotations: annFor("sq", "/data")})
		out, err := w.runcRun(id, b)
		if err != nil || !strings.HasPrefix(out, "1\n") || !strings.Contains(out, "hello from the image") {
			t.Errorf("prestart+createRuntime: %v\n%s", err, out)
		}
		if !strings.Contains(w.logText(), "already set up by an earlier hook stage") {
			t.Errorf("the second stage did not log its no-op:\n%s", w.logText())
		}
		w.assertClean()
	})

	// Finding 11: in a user-namespaced container with CAP_SYS_ADMIN in its
	// namespace, "mount -o remount,bind,dev,suid,exec /data" succeeded. The
	// flags are now locked; a tmpfs the container mounts itself is the
	// control (its remount succeeds, so the capability is there).
	t.Run("f11-userns-locked-flags", func(t *testing.T) {
		id := hookUniqueID("f11")
		script := `mount -o remount,bind,dev,suid,exec /data && echo REMOUNTED; mount -o remount,bind,rw /data && echo RW;
grep ' /data ' /proc/self/mountinfo; cat /data/hello.txt;
mount -t tmpfs -o nosuid,nodev,noexec ctl /mnt && mount -o remount,bind,dev,suid,exec /mnt && echo CONTROL-OK`
		b := w.bundle(id, bundleOpts{userNS: true, args: []string{"/bin/sh", "-c", script}, annotations: annFor("sq", "/data")})
		out, err := w.runcRun(id, b)
		if err != nil {
			t.Fatalf("runc run: %v\n%s\n%s", err, out, w.logText())
		}
		if strings.Contains(out, "REMOUNTED") || strings.Contains(out, "RW\n") {
			t.Errorf("the container cleared the hook's mount flags:\n%s", out)
		}
		if !strings.Contains(out, " ro,nosuid,nodev") || !strings.Contains(out, "hello from the image") || !strings.Contains(out, "CONTROL-OK") {
			t.Errorf("output:\n%s", out)
		}
		w.assertClean()
	})

	// Finding 12: messages.
	t.Run("f12-messages", func(t *testing.T) {
		insecure := filepath.Join(w.images, "f12-insecure.sqfs")
		data, _ := os.ReadFile(filepath.Join(w.images, "sq.sqfs"))
		os.WriteFile(insecure, data, 0o666)
		os.Chmod(insecure, 0o666)
		rwImage := filepath.Join(w.images, "f12-rw.ext4")
		hookRun(t, "cp", filepath.Join(w.images, "x.ext4"), rwImage)
		os.Chmod(rwImage, 0o644)
		cfg := w.withConfig("f12", "allow_rw = true", fmt.Sprintf("[images.insecure]\npath = %q\nfstype = \"squashfs\"\n\n[images.rwx]\npath = %q\nfstype = \"ext4\"\nallow_rw = true\n", insecure, rwImage))
		for _, tc := range []struct {
			name string
			ann  map[string]string
			exit int
			want string
		}{
			{"path-max", annFor("sq", "/data/"+strings.Repeat("a", 4090)), 2, "destination longer than 4095 bytes (PATH_MAX)"},
			{"insecure-image", annFor("insecure", "/data"), 3, "insecure image file " + insecure + ": group- or world-writable (mode 0666)"},
			{"missing-dest", annFor("sq", "/data/none"), 3, "destination /data/none does not exist in the container"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				id := hookUniqueID("f12")
				b := w.bundle(id, bundleOpts{args: []string{"/bin/true"}, annotations: tc.ann, setupArgs: setupWith(cfg)})
				out, err := w.runcRun(id, b)
				failsWith(t, out, err, tc.exit, tc.want)
				if strings.Contains(out, "no such file or directory") && strings.Contains(out, "oci-loop-hook") {
					t.Errorf("raw ENOENT text in the hook's message:\n%s", out)
				}
				w.assertClean()
			})
		}
		t.Run("ro-blocked-by-rw", func(t *testing.T) {
			writer := hookUniqueID("f12w")
			bw := w.bundle(writer, bundleOpts{args: []string{"/bin/sleep", "600"}, setupArgs: setupWith(cfg),
				annotations: map[string]string{"org.ociloop.image": "rwx", "org.ociloop.dest": "/data", "org.ociloop.rw": "true"}})
			if err := w.runcDetached(writer, bw); err != nil {
				t.Fatalf("%v\n%s", err, w.logText())
			}
			dev := recordLoops(w.record(writer))
			reader := hookUniqueID("f12r")
			br := w.bundle(reader, bundleOpts{args: []string{"/bin/true"}, annotations: annFor("rwx", "/data"), setupArgs: setupWith(cfg)})
			out, err := w.runcRun(reader, br)
			failsWith(t, out, err, 3, fmt.Sprintf(`is held read-write by /dev/%s`, strings.Join(dev, "")))
			w.runcStop(writer)
			w.assertClean()
		})
	})

	// Finding 13: no environment input. LOOPKIT_LOOP_DIRECT_IO in the hook's
	// environment changes nothing; the direct_io key decides.
	t.Run("f13-direct-io-key", func(t *testing.T) {
		for _, tc := range []struct {
			key, env, want string
		}{
			{"", "LOOPKIT_LOOP_DIRECT_IO=0", "1"},
			{"direct_io = false", "LOOPKIT_LOOP_DIRECT_IO=1", "0"},
		} {
			cfg := w.withConfig("f13-"+tc.want, tc.key, "")
			id := hookUniqueID("f13")
			b := w.bundle(id, bundleOpts{args: []string{"/bin/sleep", "600"}, annotations: annFor("ext4", "/data"), setupArgs: setupWith(cfg),
				setupEnv: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", tc.env}})
			if err := w.runcDetached(id, b); err != nil {
				t.Fatalf("%v\n%s", err, w.logText())
			}
			loops := recordLoops(w.record(id))
			if len(loops) != 1 {
				t.Fatalf("record loops %v", loops)
			}
			dio, _ := os.ReadFile("/sys/block/" + loops[0] + "/loop/dio")
			if got := strings.TrimSpace(string(dio)); got != tc.want {
				t.Errorf("config %q, env %s: dio = %s, want %s", tc.key, tc.env, got, tc.want)
			}
			w.runcStop(id)
		}
		w.assertClean()
	})
}

// hookInHungFUSENamespace runs fn on a thread in a private mount namespace
// where a FUSE filesystem whose daemon never answers is mounted over dir
// (the fusectl connection directory of it is passed to fn). Processes fn
// starts inherit the namespace. Afterwards the connection is aborted by
// closing /dev/fuse, which fails every waiter, and the namespace dies with
// the thread. Nothing of it is visible outside.
func hookInHungFUSENamespace(t *testing.T, dir string, fn func(connDir string) error) error {
	t.Helper()
	work := func() error {
		if err := unix.Unshare(unix.CLONE_FS | unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("unshare: %w", err)
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("make private: %w", err)
		}
		fuse, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open /dev/fuse: %w", err)
		}
		defer unix.Close(fuse) // aborts the connection
		opts := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0", fuse)
		if err := unix.Mount("loopkit-hung", dir, "fuse", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
			return fmt.Errorf("mount fuse: %w", err)
		}
		// Its connection id is its anonymous device number; a stat of dir
		// would itself hang, so read it from this thread's mountinfo.
		f, err := os.Open("/proc/thread-self/mountinfo")
		if err != nil {
			return err
		}
		mi, err := mountinfo.GetMountsFromReader(f, mountinfo.SingleEntryFilter(dir))
		f.Close()
		if err != nil || len(mi) != 1 {
			return fmt.Errorf("find the fuse mount: %v %d", err, len(mi))
		}
		ctl := "/sys/fs/fuse/connections"
		if err := unix.Mount("fusectl", ctl, "fusectl", 0, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount fusectl: %w", err)
		}
		return fn(filepath.Join(ctl, strconv.Itoa(int(unix.Mkdev(uint32(mi[0].Major), uint32(mi[0].Minor))))))
	}
	return nsthread.Run(work)
}

// TestHookPodmanMountsAnnotation: the JSON "mounts" annotation through
// podman works only when the --annotation value is CSV-quoted (podman parses
// the flag as CSV and refuses the JSON's bare quotes); the quoted form is
// the documented one.
func TestHookPodmanMountsAnnotation(t *testing.T) {
	testutil.RequireBinaries(t, "podman")
	w := newHookWorld(t, "")
	hooksDir := w.podmanHooksDir()
	mounts := `[{"image":"sq","dest":"/data"},{"image":"erofs","dest":"/mnt"}]`
	quoted := `"org.ociloop.mounts=` + strings.ReplaceAll(mounts, `"`, `""`) + `"`
	name := hookUniqueID("pmjson")
	out, err := w.podman(hooksDir, "--name", name, "--annotation", quoted, "--rootfs", w.rootfs,
		"/bin/sh", "-c", "cat /data/hello.txt /mnt/hello.txt")
	if err != nil || strings.Count(out, "hello from the image") != 2 {
		t.Fatalf("podman run with the CSV-quoted mounts annotation: %v\n%s\n%s", err, out, w.logText())
	}
	w.assertClean()
	// Unquoted, podman refuses the flag: nothing runs, nothing is mounted.
	name = hookUniqueID("pmjsonbad")
	out, err = w.podman(hooksDir, "--name", name, "--annotation", "org.ociloop.mounts="+mounts, "--rootfs", w.rootfs, "/bin/true")
	if err == nil || !strings.Contains(out, `for "--annotation" flag`) || !strings.Contains(out, "non-quoted-field") {
		t.Errorf("podman run with the unquoted annotation: %v\n%s", err, out)
	}
	w.assertClean()
	raw, _ := os.ReadFile(filepath.Join(criRepoRoot(t), "contrib", "hooks.d", "README.md"))
	if !strings.Contains(string(raw), "--annotation '"+quoted+"'") {
		t.Errorf("contrib/hooks.d/README.md lacks the working example --annotation '%s'", quoted)
	}
}
