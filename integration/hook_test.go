//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/testutil"
)

// TestHookRunc drives oci-loop-hook through runc 1.1 bundles (createRuntime
// and poststop entries in config.json), as a runc user wires it.
func TestHookRunc(t *testing.T) {
	w := newHookWorld(t, "")

	// Checks 1, 2 and 25 (no child process): each fstype is readable at the
	// destination, mounted ro,nosuid,nodev, on a read-only loop device,
	// invisible on the host; after runc run returns nothing is left.
	for _, image := range []string{"sq", "erofs", "ext4"} {
		t.Run("foreground/"+image, func(t *testing.T) {
			id := hookUniqueID("fg-" + image)
			b := w.bundle(id, bundleOpts{
				args:        []string{"/bin/sh", "-c", "grep ' /data ' /proc/self/mountinfo; cat /data/hello.txt"},
				annotations: annFor(image, "/data"),
			})
			out, err := w.runcRun(id, b)
			if err != nil {
				t.Fatalf("runc run: %v\n%s\n%s", err, out, w.logText())
			}
			if !strings.Contains(out, "hello from the image") {
				t.Errorf("image content missing:\n%s", out)
			}
			var line string
			for _, l := range strings.Split(out, "\n") {
				if strings.Contains(l, " /data ") {
					line = l
				}
			}
			if f := strings.Fields(line); len(f) < 6 || !strings.HasPrefix(f[5], "ro,nosuid,nodev") {
				t.Errorf("mountinfo line %q lacks ro,nosuid,nodev", line)
			}
			w.assertClean()
		})
	}

	// Check 1 (while running) and 2 (after delete of a detached container):
	// blockdev --getro = 1, no loop mount on the host; after delete nothing.
	t.Run("detached", func(t *testing.T) {
		id := hookUniqueID("det")
		b := w.bundle(id, bundleOpts{args: []string{"/bin/sleep", "600"}, annotations: annFor("sq", "/data")})
		if err := w.runcDetached(id, b); err != nil {
			t.Fatalf("%v\n%s", err, w.logText())
		}
		loops := recordLoops(w.record(id))
		if len(loops) != 1 {
			t.Fatalf("record loops %v", loops)
		}
		if got := strings.TrimSpace(hookRun(t, "blockdev", "--getro", "/dev/"+loops[0])); got != "1" {
			t.Errorf("blockdev --getro = %s", got)
		}
		host, _ := os.ReadFile("/proc/self/mountinfo")
		if strings.Contains(string(host), "/dev/"+loops[0]+" ") {
			t.Errorf("host mountinfo shows /dev/%s", loops[0])
		}
		out, err := w.runcExec(id, "cat", "/data/hello.txt")
		if err != nil || !strings.Contains(out, "hello from the image") {
			t.Errorf("exec cat: %v %s", err, out)
		}
		w.runcStop(id)
		w.assertClean()
		// Check 3: teardown again (no state) exits 0.
		st := hookState(id, "stopped", 0, b, nil)
		for range 2 {
			if code, errs := runHookBin(t, w.bin, st, nil, "/", "--config", w.config, "teardown"); code != 0 {
				t.Fatalf("second teardown: %d %s", code, errs)
			}
		}
	})

	// Check 4: setup failures make runc run fail with the hook's reason; no
	// loop, no state; the poststop runc then runs exits 0.
	corrupt := filepath.Join(w.images, "corrupt.sqfs")
	data, _ := os.ReadFile(filepath.Join(w.images, "sq.sqfs"))
	bad := append([]byte{}, data[:4]...)
	bad = append(bad, make([]byte, len(data)-4)...)
	os.WriteFile(corrupt, bad, 0o644)
	cfg2 := filepath.Join(w.dir, "config-fail.toml")
	os.WriteFile(cfg2, []byte(w.cfgBody+fmt.Sprintf("\n[images.corrupt]\npath = %q\nfstype = \"squashfs\"\n\n[images.wrongtype]\npath = %q\nfstype = \"squashfs\"\n",
		corrupt, filepath.Join(w.images, "e.erofs"))), 0o644)
	for _, tc := range []struct{ name, image, dest, reason string }{
		{"corrupt", "corrupt", "/data", "mount image"},
		{"wrong-fstype", "wrongtype", "/data", "magic does not match"},
		{"missing-dest", "sq", "/data/missing", "does not exist in the container"},
		{"not-in-catalog", "nope", "/data", "not in the catalog"},
	} {
		t.Run("setup-fails/"+tc.name, func(t *testing.T) {
			id := hookUniqueID("fail-" + tc.name)
			b := w.bundle(id, bundleOpts{
				args: []string{"/bin/true"}, annotations: annFor(tc.image, tc.dest),
				setupArgs: []string{"--config", cfg2, "--log", "debug", "setup"},
			})
			out, err := w.runcRun(id, b)
			if err == nil {
				t.Fatalf("runc run succeeded:\n%s", out)
			}
			if !strings.Contains(out, "oci-loop-hook: setup: "+id+": ") || !strings.Contains(out, tc.reason) {
				t.Errorf("runc output lacks the hook's reason %q:\n%s", tc.reason, out)
			}
			logs := w.logText()
			if !strings.Contains(logs, "container_id="+id+" step=teardown") {
				t.Errorf("poststop did not run for %s:\n%s", id, logs)
			}
			if strings.Contains(logs, "level=error msg=failed container_id="+id+" step=teardown") {
				t.Errorf("poststop failed")
			}
			w.assertClean()
		})
	}

	// Check 13: 16 containers in parallel with the same ro image, running at
	// the same time: all succeed on distinct loop devices, all cleaned up.
	t.Run("concurrent-16", func(t *testing.T) {
		const n = 16
		ids := make([]string, n)
		bundles := make([]string, n)
		for i := range n {
			ids[i] = hookUniqueID(fmt.Sprintf("par%d", i))
			bundles[i] = w.bundle(ids[i], bundleOpts{args: []string{"/bin/sleep", "600"}, annotations: annFor("sq", "/data")})
		}
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() { defer wg.Done(); errs[i] = w.runcDetached(ids[i], bundles[i]) }()
		}
		wg.Wait()
		seen := map[string]bool{}
		for i := range n {
			if errs[i] != nil {
				t.Errorf("container %d: %v", i, errs[i])
				continue
			}
			for _, l := range recordLoops(w.record(ids[i])) {
				if seen[l] {
					t.Errorf("loop device %s used twice", l)
				}
				seen[l] = true
			}
		}
		if len(seen) != n {
			t.Errorf("%d distinct devices, want %d", len(seen), n)
		}
		for i := range n {
			wg.Add(1)
			go func() { defer wg.Done(); w.runcStop(ids[i]) }()
		}
		wg.Wait()
		w.assertClean()
	})

	// Check 17: a destination on a shared bind mount is refused with exit 3;
	// with rootfsPropagation rshared (runc 1.1 keeps the rootfs itself
	// private) the mount, if allowed, must not appear on the host.
	t.Run("shared-bind-mount", func(t *testing.T) {
		id := hookUniqueID("sharedbind")
		src := filepath.Join(w.dir, "shared-src-"+id)
		os.MkdirAll(src, 0o755)
		b := w.bundle(id, bundleOpts{args: []string{"/bin/true"}, annotations: annFor("sq", "/data"),
			extraMounts: []map[string]any{{"destination": "/data", "type": "bind", "source": src, "options": []string{"rbind", "rshared"}}}})
		before := hookHostMountsUnder(w.dir, "/etc")
		out, err := w.runcRun(id, b)
		if err == nil || !strings.Contains(out, "shared mount") || !strings.Contains(out, "exit status 3") {
			t.Fatalf("runc run: %v\n%s", err, out)
		}
		after := hookHostMountsUnder(w.dir, "/etc")
		if before != after {
			t.Errorf("host mountinfo changed")
		}
		w.assertClean()
	})
	t.Run("rootfs-rshared", func(t *testing.T) {
		id := hookUniqueID("rshared")
		b := w.bundle(id, bundleOpts{args: []string{"/bin/cat", "/data/hello.txt"}, annotations: annFor("sq", "/data"), propagation: "rshared"})
		before := hookHostMountsUnder(w.dir, "/etc")
		out, err := w.runcRun(id, b)
		if err != nil && !strings.Contains(out, "exit status 3") {
			t.Fatalf("runc run: %v\n%s", err, out)
		}
		after := hookHostMountsUnder(w.dir, "/etc")
		if before != after {
			t.Errorf("host mountinfo changed")
		}
		w.assertClean()
	})

	// Check 16: no mount namespace in the config → exit 4 (or runc refuses
	// the config itself); nothing is mounted on the host either way.
	t.Run("no-mount-namespace", func(t *testing.T) {
		id := hookUniqueID("nomnt")
		b := w.bundle(id, bundleOpts{args: []string{"/bin/true"}, annotations: annFor("sq", "/data"), noMountNS: true,
			prepare: func(string) {}})
		before := hookHostMountsUnder(w.dir, "/etc")
		out, err := w.runcRun(id, b)
		if err == nil {
			t.Fatalf("runc run without a mount namespace succeeded:\n%s", out)
		}
		if !strings.Contains(out, "exit status 4") || !strings.Contains(out, "no mount namespace of its own") {
			t.Errorf("hook did not refuse with exit 4:\n%s", out)
		}
		t.Logf("runc: %s", strings.TrimSpace(out))
		// Without a mount namespace runc bind-mounts the rootfs on the host
		// itself and leaves it there; that mount is runc's, not the hook's.
		for unix.Unmount(filepath.Join(b, "rootfs"), unix.MNT_DETACH) == nil {
		}
		after := hookHostMountsUnder(w.dir, "/etc")
		if before != after {
			t.Errorf("host mountinfo changed")
		}
		w.assertClean()
	})

	// Check 18: hostile environment (LD_PRELOAD, odd PATH, empty env) gives
	// identical behaviour; the binary is static and reads no variables.
	t.Run("hostile-env", func(t *testing.T) {
		for name, env := range map[string][]string{
			"ld_preload": {"LD_PRELOAD=/nonexistent/evil.so", "PATH=/nonexistent:/tmp", "LD_LIBRARY_PATH=/tmp"},
			"empty":      {},
		} {
			id := hookUniqueID("env-" + name)
			b := w.bundle(id, bundleOpts{args: []string{"/bin/cat", "/data/hello.txt"}, annotations: annFor("sq", "/data"), setupEnv: env})
			out, err := w.runcRun(id, b)
			if err != nil || !strings.Contains(out, "hello from the image") {
				t.Errorf("%s: %v\n%s", name, err, out)
			}
		}
		w.assertClean()
		// Teardown from an unrelated cwd with no environment (podman's
		// poststop): exit 0.
		code, errs := runHookBin(t, w.bin, hookState("x", "stopped", 0, "/nonexistent", nil), []string{}, os.TempDir(), "--config", w.config, "poststop")
		if code != 0 {
			t.Errorf("teardown with empty env: %d %s", code, errs)
		}
	})

	// Check 21: kill -9 of the container process, then delete: clean.
	t.Run("kill-container", func(t *testing.T) {
		id := hookUniqueID("kill")
		b := w.bundle(id, bundleOpts{args: []string{"/bin/sleep", "600"}, annotations: annFor("ext4", "/data")})
		if err := w.runcDetached(id, b); err != nil {
			t.Fatal(err)
		}
		if err := w.runc("kill", id, "KILL").Run(); err != nil {
			t.Fatal(err)
		}
		w.runcStop(id)
		w.assertClean()
	})

	// Check 22: two consecutive runs with the same id: fresh record each
	// time, no leak from the previous run.
	t.Run("restart-same-id", func(t *testing.T) {
		id := hookUniqueID("again")
		b := w.bundle(id, bundleOpts{args: []string{"/bin/sleep", "600"}, annotations: annFor("sq", "/data")})
		var seqs []any
		for range 2 {
			if err := w.runcDetached(id, b); err != nil {
				t.Fatal(err)
			}
			rec := w.record(id)
			if rec == nil {
				t.Fatal("no record")
			}
			seqs = append(seqs, rec["mounts"].([]any)[0].(map[string]any)["diskseq"])
			w.runcStop(id)
			w.assertClean()
		}
		if seqs[0] == seqs[1] {
			t.Errorf("same diskseq twice: %v", seqs)
		}
	})

	// Check 21 (gc) at the command level: a stale record is removed, another
	// container's live record stays.
	t.Run("gc", func(t *testing.T) {
		live := hookUniqueID("gclive")
		b := w.bundle(live, bundleOpts{args: []string{"/bin/sleep", "600"}, annotations: annFor("sq", "/data")})
		if err := w.runcDetached(live, b); err != nil {
			t.Fatal(err)
		}
		stale := `{"tool_version":"x","id":"gc-stale","bundle":"/b","init_pid":1,"init_start_time":99999999999,"mnt_ns_inode":1,"created":"2026-01-01T00:00:00Z","mounts":[{"name":"sq","image_path":"/x","image_dev":1,"image_ino":2,"image_size":3,"fstype":"squashfs","mode":"ro","dest":"/data","device":"/dev/loop999998","devnum":"7:999998","diskseq":1,"phase":"mounted"}]}`
		if err := os.WriteFile(filepath.Join(w.state, "gc-stale.json"), []byte(stale), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(w.bin, "--config", w.config, "gc")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "removed gc-stale\n") {
			t.Fatalf("gc: %v %s", err, out)
		}
		if w.record(live) == nil {
			t.Error("gc removed a live container's record")
		}
		w.runcStop(live)
		w.assertClean()
	})
}

// TestHookKilledMidSetup (check 21): the hook is killed while it holds a
// freshly attached loop device (as runc's timeout would); closing its fds
// lets autoclear free the device, and no record was written.
func TestHookKilledMidSetup(t *testing.T) {
	w := newHookWorld(t, "")
	hookRequireUnshare(t)
	pause := filepath.Join(w.dir, "paused")
	bin := hookBuild(t, filepath.Join(w.dir, "bin"), "oci-loop-hook-pause", "-X github.com/loopkit/loopkit/internal/hookcli.forcePauseFile="+pause)
	id := hookUniqueID("midsetup")
	b := w.bundle(id, bundleOpts{args: []string{"/bin/true"}})
	ctr := exec.Command("unshare", "--mount", "--propagation", "private", "sleep", "600")
	if err := ctr.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { ctr.Process.Kill(); ctr.Wait() }()
	waitComm(t, ctr.Process.Pid, "sleep")
	hook := exec.Command(bin, "--config", w.config, "setup")
	hook.Stdin = strings.NewReader(hookState(id, "creating", ctr.Process.Pid, b, annFor("sq", "/data")))
	if err := hook.Start(); err != nil {
		t.Fatal(err)
	}
	waitFile(t, pause)
	dev, _ := os.ReadFile(pause)
	if len(testutil.BoundTo(filepath.Join(w.images, "sq.sqfs"))) != 1 {
		t.Fatalf("paused hook has no device bound (%s)", dev)
	}
	hook.Process.Kill()
	hook.Wait()
	if p := hookProcesses(bin); len(p) > 0 {
		t.Errorf("hook processes left: %v", p)
	}
	// A hook killed while it held the container lock cannot unlink the
	// lock file; no record was written, and gc prunes the file.
	if out, err := exec.Command(w.bin, "--config", w.config, "gc").CombinedOutput(); err != nil {
		t.Fatalf("gc: %v %s", err, out)
	}
	w.assertClean()

	// The same through runc's hook timeout: runc SIGKILLs the paused hook
	// after 1 s and fails the container; nothing leaks.
	os.Remove(pause)
	id2 := hookUniqueID("timeout")
	b2 := w.bundle(id2, bundleOpts{args: []string{"/bin/true"}, annotations: annFor("sq", "/data"), hookPath: bin, hookTimeout: 1})
	out, err := w.runcRun(id2, b2)
	if err == nil || !strings.Contains(out, "timeout") {
		t.Fatalf("runc run with a stuck hook: %v\n%s", err, out)
	}
	if _, err := os.Stat(pause); err != nil {
		t.Fatalf("the hook never reached the attach: %v", err)
	}
	if p := hookProcesses(bin); len(p) > 0 {
		t.Errorf("hook processes left: %v", p)
	}
	w.assertClean()
}
