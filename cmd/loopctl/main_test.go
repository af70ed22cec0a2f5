package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestSizeFlag(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		bad  bool
	}{
		{in: "0", want: 0},
		{in: "4096", want: 4096},
		{in: "1K", want: 1 << 10},
		{in: "64M", want: 64 << 20},
		{in: "64MB", want: 64 << 20},
		{in: "64MiB", want: 64 << 20},
		{in: "2g", want: 2 << 30},
		{in: "1T", want: 1 << 40},
		{in: "16777216T", bad: true},
		{in: "", bad: true},
		{in: "-1", bad: true},
		{in: "1.5M", bad: true},
		{in: "M", bad: true},
	} {
		var f sizeFlag
		err := f.Set(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("Set(%q) = %d, want an error", tc.in, f)
			}
			continue
		}
		if err != nil || uint64(f) != tc.want {
			t.Errorf("Set(%q) = %d, %v; want %d", tc.in, f, err, tc.want)
		}
	}
}

func TestTriFlag(t *testing.T) {
	var f triFlag
	if f.String() != "auto" {
		t.Fatalf("zero value prints %q", f.String())
	}
	for in, want := range map[string]string{"on": "on", "off": "off", "auto": "auto", "true": "on", "0": "off"} {
		if err := f.Set(in); err != nil || f.String() != want {
			t.Errorf("Set(%q): %v, prints %q, want %q", in, err, f.String(), want)
		}
	}
	if err := f.Set("maybe"); err == nil {
		t.Error(`Set("maybe") accepted`)
	}
}

func TestHumanSize(t *testing.T) {
	for in, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 64 << 20: "64.0 MiB", 3 << 30: "3.0 GiB"} {
		if got := humanSize(in); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", in, got, want)
		}
	}
}

// TestUsageErrors checks exit statuses and messages of command-line
// mistakes; none of them touches a loop device.
func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{name: "no command", args: nil, code: 2, msg: "usage: loopctl"},
		{name: "unknown command", args: []string{"frob"}, code: 2, msg: `unknown command "frob"`},
		{name: "bad log level", args: []string{"--log-level", "loud", "list"}, code: 2, msg: "--log-level"},
		{name: "attach without file", args: []string{"attach"}, code: 2, msg: "want 1 argument(s), got 0"},
		{name: "attach bad size", args: []string{"attach", "--size", "lots", "f"}, code: 2, msg: "want a byte count"},
		{name: "detach two devices", args: []string{"detach", "/dev/loop1", "/dev/loop2"}, code: 2, msg: "want 1 argument(s), got 2"},
		{name: "info bad flag", args: []string{"info", "--frob", "/dev/loop1"}, code: 2, msg: "flag provided but not defined"},
		{name: "help", args: []string{"--help"}, code: 0, msg: "Commands:"},
		{name: "command help", args: []string{"attach", "--help"}, code: 0, msg: "-partscan"},
		{name: "version", args: []string{"version"}, code: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), tc.args, &stdout, &stderr)
			if code != tc.code {
				t.Errorf("exit status %d, want %d; stderr:\n%s", code, tc.code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.msg) {
				t.Errorf("stderr does not contain %q:\n%s", tc.msg, stderr.String())
			}
		})
	}
}

func TestVersionOutput(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"version"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	want := "loopctl " + version + " (commit " + commit + ")\n"
	if stdout.String() != want {
		t.Errorf("got %q, want %q", stdout.String(), want)
	}
}
