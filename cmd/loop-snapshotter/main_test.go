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
