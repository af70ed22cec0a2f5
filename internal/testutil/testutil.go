// Package testutil holds the helpers every privileged test uses: gates that
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

	"github.com/moby/sys/mountinfo"
)

// RequireEnv names the switch `make test` sets: with it, a test whose
// prerequisite is missing fails (naming the tool and how to install it)
// instead of skipping, so a CI run cannot pass by testing nothing.
// `make test-unit` and plain `go test` leave it unset and skip.
const RequireEnv = "LOOPKIT_TEST_REQUIRE"

// installHints says how to get each tool the tests use.
var installHints = map[string]string{
	"containerd":              "apt-get install containerd",
	"containerd-shim-runc-v2": "apt-get install containerd",
	"ctr":                     "apt-get install containerd",
	"runc":                    "apt-get install runc",
	"podman":                  "apt-get install podman",
	"busybox":                 "apt-get install busybox-static",
	"mkfs.ext4":               "apt-get install e2fsprogs",
	"e2fsck":                  "apt-get install e2fsprogs",
	"resize2fs":               "apt-get install e2fsprogs",
	"mkfs.xfs":                "apt-get install xfsprogs",
	"mkfs.erofs":              "apt-get install erofs-utils",
	"fsck.erofs":              "apt-get install erofs-utils",
	"mkfs.btrfs":              "apt-get install btrfs-progs",
	"systemd-analyze":         "apt-get install systemd",
	"cmp":                     "apt-get install diffutils",
	"mksquashfs":              "apt-get install squashfs-tools",
	"mkfs.vfat":               "apt-get install dosfstools",
	"sfdisk":                  "apt-get install fdisk",
	"losetup":                 "apt-get install mount",
	"jq":                      "apt-get install jq",
	"crictl":                  "make tools (builds bin/tools/crictl)",
	"staticcheck":             "make tools (builds bin/tools/staticcheck)",
	"go":                      "install Go 1.26 from go.dev into /usr/local/go",
}

// Required reports whether missing prerequisites fail rather than skip.
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// Missing ends the test for a missing prerequisite: a skip with the reason,
// or under `make test` (RequireEnv=1) a failure naming the tool and how to
// install it. how may be empty for tools listed in installHints.
func Missing(t testing.TB, tool, how string) {
	t.Helper()
	if how == "" {
		how = installHints[tool]
	}
	msg := "needs " + tool
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
		after := Snapshot(abs...)
		var leaked []string
		for k := range after {
			if !before[k] {
				leaked = append(leaked, k)
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
	// moby/sys/mountinfo undoes the octal escapes (\040 for a space).
	mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return !under(m.Mountpoint, dirs) && !devs[m.Source], false
	})
	if err != nil {
		return out
	}
	for _, m := range mounts {
		out[fmt.Sprintf("mount %s on %s", m.Source, m.Mountpoint)] = true
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

// BoundTo lists the loop devices (loopN) whose backing file, as sysfs shows
// it, is path. Read from sysfs only: no device is opened.
func BoundTo(path string) []string {
	var out []string
	entries, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, e := range entries {
		b, err := os.ReadFile(e)
		if err != nil {
			continue
		}
		if strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)") == path {
			out = append(out, filepath.Base(filepath.Dir(filepath.Dir(e))))
		}
	}
	return out
}
