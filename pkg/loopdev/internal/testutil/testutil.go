// Package testutil holds the helpers the privileged tests of pkg/loopdev use: gates that
// skip with a reason, and a leak check that fails a test which leaves a loop
// device, partition or mount behind.
package testutil

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// RequireRoot skips unless the test runs as root on a host with loop devices.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root and /dev/loop-control")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skip("needs root and /dev/loop-control")
	}
}

// RequireBinaries skips unless every named program is on PATH.
func RequireBinaries(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			t.Skipf("needs %s", n)
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
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return out
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 10 {
			continue
		}
		mp := unescape(fields[4])
		src := ""
		for i, fld := range fields {
			if fld == "-" && i+2 < len(fields) {
				src = unescape(fields[i+2])
				break
			}
		}
		if under(mp, dirs) || devs[src] {
			out[fmt.Sprintf("mount %s on %s", src, mp)] = true
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

// unescape undoes mountinfo's octal escapes (\040 for space and friends).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
