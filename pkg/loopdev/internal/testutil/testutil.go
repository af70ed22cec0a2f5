// Package testutil holds the helpers the privileged tests of pkg/loopdev use: gates that
// skip with a reason, and a leak check that fails a test which leaves a loop
// device, partition or mount behind.
package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/mountinfo"
)

// RequireEnv, set to 1 (make test sets it), makes a test whose
// prerequisite is missing fail, naming the tool and its package, instead of
// skipping: a CI run cannot pass by testing nothing. `make test-unit` and
// plain `go test` leave it unset and skip. (The main module's
// internal/testutil reads the same variable; this module cannot import it.)
const RequireEnv = "LOOPKIT_TEST_REQUIRE"

// installHints says where each tool the loopdev tests use comes from.
var installHints = map[string]string{
	"mkfs.ext4":  "apt-get install e2fsprogs",
	"mksquashfs": "apt-get install squashfs-tools",
	"sfdisk":     "apt-get install fdisk",
	"losetup":    "apt-get install util-linux",
	"flock":      "apt-get install util-linux",
	"udevadm":    "apt-get install udev",
}

// Required reports whether RequireEnv turns missing prerequisites into
// failures.
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// Missing skips (or, under RequireEnv, fails) a test that needs what, with
// how to get it (from installHints when how is empty).
func Missing(t testing.TB, what, how string) {
	t.Helper()
	if how == "" {
		how = installHints[what]
	}
	msg := "needs " + what
	if how != "" {
		msg += " (" + how + ")"
	}
	if Required() {
		t.Fatalf("%s; %s=1 (make test) turns missing tools into failures", msg, RequireEnv)
	}
	t.Skip(msg)
}

// RequireRoot skips unless the test runs as root on a host with loop
// devices (fails under RequireEnv).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "root and /dev/loop-control", "run as root")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		Missing(t, "root and /dev/loop-control", "modprobe loop")
	}
}

// RequireBinaries skips unless every named program is on PATH (fails under
// RequireEnv, naming the program and its package).
func RequireBinaries(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			Missing(t, n, "")
		}
	}
}

// NoLeaks records the loop devices whose backing file lies under one of dirs
// (their partitions included) and the mounts below dirs or from those
// devices, and fails the test at cleanup if any that were not there before
// remain. Call it first, before anything that registers its own cleanup, so
// it runs last.
func NoLeaks(t testing.TB, dirs ...string) {
	t.Helper()
	abs := make([]string, 0, len(dirs))
	for _, d := range dirs {
		a, err := filepath.Abs(d)
		if err != nil {
			t.Fatalf("NoLeaks: %v", err)
		}
		if r, err := filepath.EvalSymlinks(a); err == nil {
			a = r
		}
		abs = append(abs, a)
	}
	before := Snapshot(abs...)
	t.Cleanup(func() {
		// A detach that another opener (udev, another loop user's probe)
		// made lazy completes at that opener's close: allow it a moment, so
		// only what stays bound counts as a leak.
		var leaked []string
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			leaked = leaked[:0]
			for k := range Snapshot(abs...) {
				if !before[k] {
					leaked = append(leaked, k)
				}
			}
			if len(leaked) == 0 || time.Now().After(deadline) {
				break
			}
		}
		if len(leaked) > 0 {
			sort.Strings(leaked)
			t.Errorf("leaked after test:\n  %s", strings.Join(leaked, "\n  "))
		}
	})
}

// Snapshot lists, as printable strings, the loop devices backed by files
// under dirs, their partitions, and the mounts below dirs or from those
// devices.
func Snapshot(dirs ...string) map[string]bool {
	out := map[string]bool{}
	devs := map[string]bool{}
	entries, _ := filepath.Glob("/sys/block/loop*")
	for _, e := range entries {
		name := filepath.Base(e)
		b, err := os.ReadFile(filepath.Join(e, "loop", "backing_file"))
		if err != nil {
			continue
		}
		backing := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), " (deleted)")
		if !under(backing, dirs) {
			continue
		}
		devs["/dev/"+name] = true
		out["loop device /dev/"+name+" backed by "+backing] = true
		parts, _ := filepath.Glob(filepath.Join(e, name+"p*"))
		for _, p := range parts {
			out["partition /dev/"+filepath.Base(p)] = true
			devs["/dev/"+filepath.Base(p)] = true
		}
	}
	ms, _ := mountinfo.Self()
	for _, m := range ms {
		if under(m.MountPoint, dirs) || devs[m.Source] {
			out[fmt.Sprintf("mount %s on %s", m.Source, m.MountPoint)] = true
		}
	}
	return out
}

func under(p string, dirs []string) bool {
	for _, d := range dirs {
		if p == d || strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}
