package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: config files must be root-owned")
	}
}

func TestDecodeStrictUnknownKeys(t *testing.T) {
	for name, body := range map[string]string{
		"top level":      "version = 1\nbogus = true\n",
		"inside image":   "[images.ds]\npath = \"/a\"\nfstype = \"squashfs\"\nsize = 3\n",
		"wrong type":     "max_mounts = \"4\"\n",
		"duplicate key":  "version = 1\nversion = 1\n",
		"invalid toml":   "version = \n",
		"duplicate tbl":  "[images.a]\npath=\"/a\"\n[images.a]\npath=\"/b\"\n",
		"array not list": "allowed_fs_types = \"ext4\"\n",
	} {
		cfg := DefaultHook()
		err := DecodeStrict(strings.NewReader(body), &cfg)
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	cfg := DefaultHook()
	err := DecodeStrict(strings.NewReader("[images.ds]\npath = \"/a\"\nfstype = \"squashfs\"\nsize = 3\n"), &cfg)
	if err == nil || !strings.Contains(err.Error(), "images.ds.size") {
		t.Errorf("error does not name the key path: %v", err)
	}
}

func TestHookDefaultsAndValidate(t *testing.T) {
	d := DefaultHook()
	if err := d.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(d.Images) != 0 || len(d.AllowedImageDirs) != 0 || d.AllowRW || d.DestSymlinks != "refuse" {
		t.Fatalf("defaults allow something: %+v", d)
	}
	bad := map[string]func(h *Hook){
		"version":       func(h *Hook) { h.Version = 2 },
		"dest_symlinks": func(h *Hook) { h.DestSymlinks = "follow" },
		"fstype":        func(h *Hook) { h.AllowedFSTypes = []string{"vfat"} },
		"image fstype": func(h *Hook) {
			h.AllowedFSTypes = []string{"ext4"}
			h.Images["a"] = HookImage{Path: "/a", FSType: "squashfs"}
		},
		"image relative": func(h *Hook) { h.Images["a"] = HookImage{Path: "a", FSType: "ext4"} },
		"image unclean":  func(h *Hook) { h.Images["a"] = HookImage{Path: "/x/../a", FSType: "ext4"} },
		"catalog name":   func(h *Hook) { h.Images["a b"] = HookImage{Path: "/a", FSType: "ext4"} },
		"raw dir":        func(h *Hook) { h.AllowedImageDirs = []string{"srv"} },
		"prefix root":    func(h *Hook) { h.DestAllowedPrefixes = []string{"/"} },
		"prefix proc":    func(h *Hook) { h.DestAllowedPrefixes = []string{"/proc/x"} },
		"prefix dev":     func(h *Hook) { h.DestAllowedPrefixes = []string{"/dev"} },
		"max_mounts":     func(h *Hook) { h.MaxMounts = 0 },
		"timeout":        func(h *Hook) { h.TimeoutSeconds = 0 },
		"log":            func(h *Hook) { h.Log = "file:rel" },
		"state_dir":      func(h *Hook) { h.StateDir = "run" },
	}
	for name, mut := range bad {
		h := DefaultHook()
		mut(&h)
		if err := h.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

// Check 23: config hardening.
func TestLoadHookFileChecks(t *testing.T) {
	requireRoot(t)
	good := "version = 1\nallowed_fs_types = [\"ext4\"]\n[images.ds]\npath = \"/srv/ds.ext4\"\nfstype = \"ext4\"\n"
	p := writeConfig(t, good)
	cfg, fromFile, err := LoadHook(p, true)
	if err != nil || !fromFile || cfg.Images["ds"].FSType != "ext4" || cfg.MaxMounts != 4 {
		t.Fatalf("%+v %t %v", cfg, fromFile, err)
	}

	ww := writeConfig(t, good)
	os.Chmod(ww, 0o666)
	gw := writeConfig(t, good)
	os.Chmod(gw, 0o620)
	nr := writeConfig(t, good)
	os.Chown(nr, 1000, 1000)
	dirww := writeConfig(t, good)
	os.Chmod(filepath.Dir(dirww), 0o777)
	link := filepath.Join(t.TempDir(), "link.toml")
	os.Symlink(p, link)
	fifo := filepath.Join(t.TempDir(), "fifo.toml")
	if err := mkfifo(fifo); err != nil {
		t.Fatal(err)
	}
	for name, path := range map[string]string{
		"world-writable": ww, "group-writable": gw, "not root": nr, "dir world-writable": dirww,
		"symlink": link, "fifo": fifo,
	} {
		if _, _, err := LoadHook(path, true); !errors.Is(err, ErrInsecure) {
			t.Errorf("%s: %v, want ErrInsecure", name, err)
		}
	}
	for name, body := range map[string]string{
		"unknown top": "version = 1\nfoo = 1\n", "unknown image key": good + "allow_rx = true\n",
		"invalid value": "dest_symlinks = \"follow\"\n",
	} {
		if _, _, err := LoadHook(writeConfig(t, body), false); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	missing := filepath.Join(t.TempDir(), "none.toml")
	if _, _, err := LoadHook(missing, true); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("explicit missing file: %v", err)
	}
	cfg, fromFile, err = LoadHook(missing, false)
	if err != nil || fromFile || len(cfg.Images) != 0 {
		t.Errorf("default path missing: %+v %t %v", cfg, fromFile, err)
	}
}
