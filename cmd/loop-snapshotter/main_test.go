package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/loopkit/loopkit/pkg/config"
)

func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if err := run([]string{"--version"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "loop-snapshotter ") || !strings.Contains(out.String(), "commit") {
		t.Errorf("--version printed %q", out.String())
	}
}

// TestHelp: --help lists every flag and every configuration key with its
// default, on stdout, and exits 0.
func TestHelp(t *testing.T) {
	var out bytes.Buffer
	if err := run([]string{"--help"}, &out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"-root", "-address", "-config", "-log-level", "-version", "default_size = ", "attach_on_start = ", "metrics_address = ", "Examples:"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("--help lacks %q", want)
		}
	}
}

// TestConfigPrecedence: flag > file > default, an explicit missing file is
// an error, overlay mode is refused.
func TestConfigPrecedence(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("pkg/config accepts only root-owned files")
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(cfg, []byte("root = \"/from/file\"\nlog_level = \"debug\"\ndefault_size = \"1GiB\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := run([]string{"config", "--config", cfg, "--root", "/from/flag"}, &out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"root = '/from/flag'", "log_level = 'debug'", "default_size = '1073741824'",
		"address = '" + config.DefaultSnapshotterAddress + "'"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("effective config lacks %s:\n%s", want, out.String())
		}
	}
	if err := run([]string{"--config", filepath.Join(dir, "absent.toml")}, &out); err == nil {
		t.Error("explicit missing --config accepted")
	}
	if err := os.WriteFile(cfg, []byte("mode = \"overlay\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := run([]string{"--config", cfg}, &out); err == nil || !strings.Contains(err.Error(), "overlay") {
		t.Errorf("overlay mode: %v", err)
	}
	if err := os.WriteFile(cfg, []byte("log_level = \"info\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := run([]string{"--config", cfg, "--log-level", "loud"}, &out); err == nil || !strings.Contains(err.Error(), "log_level") {
		t.Error("bad --log-level accepted")
	}
}

func TestDefaultsWithoutConfigFile(t *testing.T) {
	if _, err := os.Stat(config.DefaultSnapshotterConfig); err == nil {
		t.Skip(config.DefaultSnapshotterConfig + " exists on this host")
	}
	var out bytes.Buffer
	if err := run([]string{"config"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "root = '"+config.DefaultSnapshotterRoot+"'") {
		t.Errorf("defaults:\n%s", out.String())
	}
}

// TestExitCodesAndMessages pins the exit status and the exact one-line
// error of the main failure paths: 0 success (help included), 1 runtime
// failure, 2 usage or configuration error; no context said twice.
func TestExitCodesAndMessages(t *testing.T) {
	dir := t.TempDir()
	badSize := filepath.Join(dir, "size.toml")
	if err := os.WriteFile(badSize, []byte("default_size = \"12 parsecs\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	absent := filepath.Join(dir, "absent.toml")
	sock := filepath.Join(dir, "none.sock")
	for _, tc := range []struct {
		args []string
		code int
		want string // the error text; "" for success
		root bool   // pkg/config reads only root-owned files
	}{
		{[]string{"--help"}, 0, "", false},
		{[]string{"status", "--help"}, 0, "", false},
		{[]string{"config", "--help"}, 0, "", false},
		{[]string{"--bogus"}, 2, "flag provided but not defined: -bogus", false},
		{[]string{"status", "extra"}, 2, `unexpected argument "extra"`, false},
		{[]string{"--config", absent}, 2, "open " + absent + ": file does not exist", false},
		{[]string{"config", "--config", badSize}, 2, badSize + `: invalid configuration: key default_size (line 1 column 16): size "12 parsecs": unknown unit`, true},
		{[]string{"config", "--log-level", "loud"}, 2, `invalid configuration: log_level: "loud" is not one of debug, info, warn, error`, false},
		{[]string{"status", "--address", sock}, 1, "query " + sock + `: connection error: desc = "transport: Error while dialing: dial unix ` + sock + `: connect: no such file or directory"`, false},
	} {
		if tc.root && os.Geteuid() != 0 {
			continue
		}
		var out bytes.Buffer
		err := run(tc.args, &out)
		got := ""
		if err != nil {
			got = err.Error()
		}
		if code := exitCode(err); code != tc.code || got != tc.want {
			t.Errorf("%v: exit %d %q, want exit %d %q", tc.args, code, got, tc.code, tc.want)
		}
		if tc.code == 0 && (!strings.Contains(out.String(), "Exit status: 0 success") || strings.Contains(out.String(), "help requested")) {
			t.Errorf("%v: help text:\n%s", tc.args, out.String())
		}
	}
}
