package hook

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// fd-based resolution against a rootfs with hostile symlinks; no root needed.
func TestResolveDestHostileSymlinks(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	for _, d := range []string{"data", "etc", "real", "inner/deep"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	links := map[string]string{
		"abs":      "/etc",
		"climb":    "../../../../../../../../" + outside,
		"rel":      "real",
		"loop":     "loop",
		"procself": "/proc/self/root",
		"file":     "etc/passwd",
	}
	if err := os.WriteFile(filepath.Join(root, "etc/passwd"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	rootfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rootfd)
	resolved := func(fd int) string {
		p, err := os.Readlink("/proc/self/fd/" + itoa(fd))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	cases := []struct {
		dest   string
		inRoot bool
		want   string // resolved path, or "" for a refusal
		code   int
	}{
		{"/data", false, root + "/data", 0},
		{"/../../../../data", false, root + "/data", 0},
		{"/abs", false, "", 3},
		{"/abs", true, root + "/etc", 0},
		{"/climb", false, "", 3},
		{"/climb", true, root + outside, 0},
		{"/rel", true, root + "/real", 0},
		{"/inner/../abs", true, root + "/etc", 0},
		{"/loop", true, "", 3},
		{"/procself", true, "", 3},
		{"/file", true, "", 3},
		{"/missing", false, "", 3},
	}
	if err := os.MkdirAll(root+outside, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		fd, err := resolveDest(rootfd, Placement{Dest: tc.dest, InRoot: tc.inRoot})
		if tc.want == "" {
			if ExitCode(err) != tc.code {
				t.Errorf("%s (in-root %t): %v, want exit %d", tc.dest, tc.inRoot, err, tc.code)
			}
			if err == nil {
				unix.Close(fd)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s (in-root %t): %v", tc.dest, tc.inRoot, err)
			continue
		}
		if got := resolved(fd); got != tc.want {
			t.Errorf("%s (in-root %t) resolved to %s, want %s", tc.dest, tc.inRoot, got, tc.want)
		}
		unix.Close(fd)
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("outside directory touched: %v", entries)
	}

	// create_dest makes missing components in-root, never through a symlink
	// that leaves the root.
	fd, err := resolveDest(rootfd, Placement{Dest: "/abs/new/sub", InRoot: true, CreateDest: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := resolved(fd); got != root+"/etc/new/sub" {
		t.Errorf("created at %s", got)
	}
	unix.Close(fd)
	if _, err := resolveDest(rootfd, Placement{Dest: "/abs/x", CreateDest: true}); ExitCode(err) != 3 {
		t.Errorf("create through a refused symlink: %v", err)
	}
}

func TestMountInfoShared(t *testing.T) {
	info := []byte(`22 27 0:21 / /proc rw,relatime shared:5 - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 27 0:27 / /x rw master:3 shared:9 - tmpfs tmpfs rw
31 27 0:27 / /y rw master:3 - tmpfs tmpfs rw
`)
	for id, want := range map[int][2]bool{22: {true, true}, 27: {true, false}, 30: {true, true}, 31: {true, false}, 99: {false, false}} {
		found, shared, err := mountShared(bytes.NewReader(info), id)
		if err != nil || found != want[0] || shared != want[1] {
			t.Errorf("id %d: found %t shared %t", id, found, shared)
		}
	}
}

func TestParseStartTime(t *testing.T) {
	stat := []byte("1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100")
	got, err := parseStartTime(stat)
	if err != nil || got != 98765 {
		t.Fatalf("%d %v", got, err)
	}
	if _, err := parseStartTime([]byte("1 (x) S 1")); err == nil {
		t.Fatal("short stat accepted")
	}
	if _, err := ProcessStartTime(os.Getpid()); err != nil {
		t.Fatal(err)
	}
}
