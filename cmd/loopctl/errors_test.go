package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestErrorText pins the exact text of loopctl's main error paths: each
// layer adds only what the one below did not say (the file is named once,
// the operation once), and the exit status is 1 for a failed operation, 2
// for a usage error.
func TestErrorText(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "small.img")
	if err := os.WriteFile(small, make([]byte, 100), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.img")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"attach", missing}, 1, "loopctl: attach " + missing + ": open: no such file or directory\n"},
		{[]string{"attach", dir}, 1, "loopctl: attach " + dir + ": a directory: invalid argument\n"},
		{[]string{"attach", small}, 1, "loopctl: attach " + small + ": 100 bytes, less than one 512-byte sector: invalid argument\n"},
		{[]string{"detach", missing}, 1, "loopctl: detach: open " + missing + ": lstat: no such file or directory\n"},
		{[]string{"detach", small}, 1, "loopctl: detach: open " + small + ": stat: block device required\n"},
		{[]string{"info", small}, 1, "loopctl: info: open " + small + ": stat: block device required\n"},
		{[]string{"frob"}, 2, "loopctl: unknown command \"frob\"\n"},
		{[]string{"--log-level", "loud", "list"}, 2, "loopctl: --log-level: not a valid level: \"loud\" (debug, info, warn, error)\n"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tc.args, &stdout, &stderr)
		got := stderr.String()
		if tc.code == 2 && len(got) > len(tc.want) {
			got = got[:len(tc.want)] // the usage text follows
		}
		if code != tc.code || got != tc.want {
			t.Errorf("loopctl %q: exit %d, stderr %q; want exit %d, %q", tc.args, code, stderr.String(), tc.code, tc.want)
		}
	}
}
