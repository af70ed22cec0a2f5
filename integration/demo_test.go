//go:build integration

package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/internal/testutil"
)

// TestMakeDemo runs `make demo` (issue 5) as CI does, with the demo's
// directory inside a test directory, and checks that it passes, shows the
// main job (size limit, ENOSPC, the hook's read-only mount) and leaves no
// loop device, mount, process or file behind. Then it injects failures
// while containerd runs a container and after the hook's container, and
// checks that the demo fails and still cleans up.
func TestMakeDemo(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "make", "go", "jq", "containerd", "containerd-shim-runc-v2", "ctr", "runc",
		"busybox", "mkfs.ext4", "mkfs.erofs", "sfdisk", "lsblk", "dpkg-query")

	t.Run("pass", func(t *testing.T) {
		out, err := demoRun(t, "")
		if err != nil {
			t.Fatalf("make demo: %v\n%s", err, out)
		}
		for _, want := range []string{
			"ok 4 committed snapshots",
			"the size label became the filesystem size",
			"No space left on device",
			"hello from a read-only erofs image",
			"Read-only file system",
			"no loop device backed by a file in",
			"no mount below",
			"no process of the demo running",
			"Demo finished in",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("demo output lacks %q:\n%s", want, out)
			}
		}
	})
	// Titles of steps the demo must survive failing at: a container running
	// on the loop snapshotter, and the hook section after its container.
	for _, at := range []string{"On the host", "Checking the hook"} {
		t.Run("fail at "+at, func(t *testing.T) {
			out, err := demoRun(t, at)
			if err == nil {
				t.Fatalf("make demo with DEMO_FAIL_AT=%q passed:\n%s", at, out)
			}
			if !strings.Contains(out, "injected failure at step") || !strings.Contains(out, "cleanup: sweep_work") {
				t.Errorf("demo did not fail where asked or did not clean up:\n%s", out)
			}
		})
	}
}

// demoRun runs `make demo` with the demo directory below a fresh test
// directory and DEMO_FAIL_AT=failAt, and checks that nothing of it is left.
func demoRun(t *testing.T, failAt string) (string, error) {
	t.Helper()
	// A real filesystem, as the demo's image files expect (not tmpfs).
	parent, err := os.MkdirTemp("/var/tmp", "loopkit-demotest.")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(parent) })
	testutil.NoLeaks(t, parent)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		criKillProcessesUnder(t, parent)
		criUnmountUnder(t, parent)
		criDetachUnder(t, parent)
	})

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "make", "--no-print-directory", "-C", criRepoRoot(t), "demo")
	cmd.Env = append(os.Environ(), "DEMO_TMPDIR="+parent, "DEMO_FAIL_AT="+failAt)
	b, runErr := cmd.CombinedOutput()
	out := string(b)
	if ctx.Err() != nil {
		t.Fatalf("make demo did not finish within 5 minutes:\n%s", out)
	}

	if left := criProcessesUnder(parent); len(left) > 0 {
		t.Errorf("processes of the demo left running:\n  %s", strings.Join(left, "\n  "))
	}
	// The demo removes its directory (NoLeaks checks devices and mounts).
	if es, err := os.ReadDir(parent); err != nil || len(es) > 0 {
		var names []string
		for _, e := range es {
			names = append(names, filepath.Join(parent, e.Name()))
		}
		t.Errorf("demo directory not removed (%v): %v", err, names)
	}
	return out, runErr
}
