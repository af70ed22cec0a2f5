package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSnapshotterDefaultsValid(t *testing.T) {
	c := DefaultSnapshotter()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Root != DefaultSnapshotterRoot || c.Address != DefaultSnapshotterAddress || c.DefaultSize != 10<<30 ||
		time.Duration(c.CleanupGrace) != 10*time.Minute || c.Mode != "" || c.LayerBacking != "auto" || c.MountMode != "device" {
		t.Errorf("defaults: %+v", c)
	}
}

func writeSnapshotterConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadSnapshotter(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the file checks require root-owned files")
	}
	cfg, loaded, err := LoadSnapshotter(writeSnapshotterConfig(t, `
root = "/srv/loop"
default_size = "1GiB"
mount_options = ["noatime", "discard"]
cleanup_grace = "90s"
attach_on_start = "eager"
`), true)
	if err != nil || !loaded {
		t.Fatalf("load: %v loaded=%v", err, loaded)
	}
	if cfg.Root != "/srv/loop" || cfg.DefaultSize != 1<<30 || len(cfg.MountOptions) != 2 ||
		time.Duration(cfg.CleanupGrace) != 90*time.Second || cfg.AttachOnStart != "eager" ||
		cfg.Address != DefaultSnapshotterAddress {
		t.Errorf("loaded %+v", cfg)
	}

	missing := filepath.Join(t.TempDir(), "absent.toml")
	if _, loaded, err := LoadSnapshotter(missing, false); err != nil || loaded {
		t.Errorf("missing default file: %v loaded=%v, want defaults", err, loaded)
	}
	if _, _, err := LoadSnapshotter(missing, true); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing explicit file: %v, want ErrNotExist", err)
	}

	for _, tc := range []struct{ body, key string }{
		{`bogus = 1`, "bogus"},
		{`mode = "overlay"`, "mode"},
		{`layer_backing = "nbd"`, "layer_backing"},
		{`mount_mode = "loop-option"`, "mount_mode"},
		{`fs_type = "xfs"`, "fs_type"},
		{`default_size = "1MiB"`, "default_size"},
		{`default_size = "ten"`, "default_size"},
		{`mount_options = ["direct-io"]`, "mount_options"},
		{`mount_options = ["X-containerd.mkfs.fs=ext4"]`, "mount_options"},
		{`mount_options = ["ro"]`, "mount_options"},
		{`direct_io = "maybe"`, "direct_io"},
		{`attach_on_start = "now"`, "attach_on_start"},
		{`cleanup_grace = "soon"`, "cleanup_grace"},
		{`root = "relative"`, "root"},
		{`address = "/` + strings.Repeat("x", 120) + `"`, "address"},
		{`metrics_address = "localhost"`, "metrics_address"},
		{"root = \"/a\"\nroot = \"/b\"", "root"},
	} {
		_, _, err := LoadSnapshotter(writeSnapshotterConfig(t, tc.body), true)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%s: %v, want ErrInvalid naming %s", tc.body, err, tc.key)
		}
	}
}
