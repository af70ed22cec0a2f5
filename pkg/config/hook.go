package config

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"

	"github.com/loopkit/loopkit/internal/hookpolicy"
)

// DefaultHookPath is where oci-loop-hook looks for its configuration.
const DefaultHookPath = "/etc/oci-loop-hook/config.toml"

// Hook is the configuration of oci-loop-hook (docs/operations.md, "The
// hook"); without a file nothing is allowed.
type Hook struct {
	Version             int                  `toml:"version"`
	Enabled             bool                 `toml:"enabled"`
	AnnotationPrefix    string               `toml:"annotation_prefix"`
	Images              map[string]HookImage `toml:"images"`
	AllowedImageDirs    []string             `toml:"allowed_image_dirs"`
	AllowedFSTypes      []string             `toml:"allowed_fs_types"`
	DestAllowedPrefixes []string             `toml:"dest_allowed_prefixes"`
	DestSymlinks        string               `toml:"dest_symlinks"`
	CreateDest          bool                 `toml:"create_dest"`
	MaxMounts           int                  `toml:"max_mounts"`
	AllowRW             bool                 `toml:"allow_rw"`
	RequireDiskseq      bool                 `toml:"require_diskseq"`
	StateDir            string               `toml:"state_dir"`
	Log                 string               `toml:"log"`
	TimeoutSeconds      int                  `toml:"timeout_seconds"`
	Ext4ReadOnlyOptions string               `toml:"ext4_read_only_options"`
	// DirectIO turns direct I/O on the loop devices on (where the backing
	// filesystem supports it). The hook reads no environment variable: this
	// key is the only switch.
	DirectIO bool `toml:"direct_io"`
}

// HookImage is one catalog entry.
type HookImage struct {
	Path    string `toml:"path"`
	FSType  string `toml:"fstype"`
	AllowRW bool   `toml:"allow_rw"`
	Noexec  bool   `toml:"noexec"`
}

// Values of Hook.DestSymlinks.
const (
	DestSymlinksRefuse = "refuse"
	DestSymlinksInRoot = "in-root"
)

// HookFSTypes are the filesystem types the hook knows how to check and mount.
var hookFSTypes = []string{"squashfs", "erofs", "ext4"}

// DefaultHook returns the built-in defaults: an enabled hook with an empty
// catalog and raw paths off, so that every request is refused.
func DefaultHook() Hook {
	return Hook{
		Version:             1,
		Enabled:             true,
		AnnotationPrefix:    "org.ociloop.",
		Images:              map[string]HookImage{},
		AllowedImageDirs:    []string{},
		AllowedFSTypes:      slices.Clone(hookFSTypes),
		DestAllowedPrefixes: []string{"/data", "/mnt"},
		DestSymlinks:        DestSymlinksRefuse,
		MaxMounts:           4,
		RequireDiskseq:      true,
		StateDir:            "/run/oci-loop-hook",
		Log:                 "syslog",
		TimeoutSeconds:      10,
		Ext4ReadOnlyOptions: "noload",
		DirectIO:            true,
	}
}

// LoadHook loads the hook configuration. With explicit false, a missing file
// yields the defaults and fromFile false; with explicit true (the admin named
// the file) a missing file is an error matching fs.ErrNotExist. The result
// is validated.
func LoadHook(path string, explicit bool) (cfg Hook, fromFile bool, err error) {
	cfg = DefaultHook()
	err = LoadFile(path, &cfg)
	switch {
	case err == nil:
		fromFile = true
	case errors.Is(err, fs.ErrNotExist) && !explicit:
		cfg = DefaultHook()
	default:
		return Hook{}, false, err
	}
	if err := cfg.Validate(); err != nil {
		return Hook{}, false, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, fromFile, nil
}

// Validate checks the configuration's rules (absolute clean paths, no
// destination at or below /, /proc, /sys or /dev, valid catalog names, ...);
// errors match ErrInvalid and name the key.
func (h *Hook) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
	}
	if h.Version != 1 {
		return bad("version: must be 1, got %d", h.Version)
	}
	if h.AnnotationPrefix == "" || len(h.AnnotationPrefix) > 200 || strings.ContainsAny(h.AnnotationPrefix, " \t\r\n/\x00") {
		return bad("annotation_prefix: invalid value %q", h.AnnotationPrefix)
	}
	if h.DestSymlinks != DestSymlinksRefuse && h.DestSymlinks != DestSymlinksInRoot {
		return bad("dest_symlinks: must be %q or %q, got %q", DestSymlinksRefuse, DestSymlinksInRoot, h.DestSymlinks)
	}
	for _, t := range h.AllowedFSTypes {
		if !slices.Contains(hookFSTypes, t) {
			return bad("allowed_fs_types: unknown filesystem type %q", t)
		}
	}
	for _, d := range h.AllowedImageDirs {
		if !isAbsClean(d) || d == "/" {
			return bad("allowed_image_dirs: %q is not an absolute clean directory other than /", d)
		}
	}
	if len(h.DestAllowedPrefixes) == 0 {
		return bad("dest_allowed_prefixes: must not be empty")
	}
	for _, p := range h.DestAllowedPrefixes {
		if !isAbsClean(p) {
			return bad("dest_allowed_prefixes: %q is not absolute and clean", p)
		}
		if p == "/" || hookpolicy.IsDeniedDest(p) {
			return bad("dest_allowed_prefixes: %q is always denied", p)
		}
	}
	for name, img := range h.Images {
		if !hookpolicy.IsCatalogName(name) {
			return bad("images.%s: invalid catalog name", name)
		}
		if !isAbsClean(img.Path) {
			return bad("images.%s.path: %q is not absolute and clean", name, img.Path)
		}
		if !slices.Contains(h.AllowedFSTypes, img.FSType) {
			return bad("images.%s.fstype: %q is not in allowed_fs_types", name, img.FSType)
		}
	}
	if h.MaxMounts < 1 || h.MaxMounts > 64 {
		return bad("max_mounts: must be between 1 and 64, got %d", h.MaxMounts)
	}
	if h.TimeoutSeconds < 1 || h.TimeoutSeconds > 3600 {
		return bad("timeout_seconds: must be between 1 and 3600, got %d", h.TimeoutSeconds)
	}
	switch {
	case h.Log == "syslog", h.Log == "stderr":
	case strings.HasPrefix(h.Log, "file:") && isAbsClean(strings.TrimPrefix(h.Log, "file:")):
	default:
		return bad("log: must be syslog, stderr or file:<absolute path>, got %q", h.Log)
	}
	if !isAbsClean(h.StateDir) || h.StateDir == "/" {
		return bad("state_dir: %q is not an absolute clean directory other than /", h.StateDir)
	}
	if strings.ContainsAny(h.Ext4ReadOnlyOptions, " \t\r\n\x00=") {
		return bad("ext4_read_only_options: invalid value %q", h.Ext4ReadOnlyOptions)
	}
	return nil
}

func isAbsClean(p string) bool {
	return filepath.IsAbs(p) && filepath.Clean(p) == p && !strings.ContainsRune(p, 0)
}
