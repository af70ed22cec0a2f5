package config

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"strings"
	"time"
)

// Snapshotter defaults: the root in containerd's naming for a snapshotter's
// state, the socket the contrib configs point containerd at, the config file.
const (
	DefaultSnapshotterRoot    = "/var/lib/containerd/io.containerd.snapshotter.v1.loop"
	DefaultSnapshotterAddress = "/run/loop-snapshotter/loop-snapshotter.sock"
	DefaultSnapshotterConfig  = "/etc/loop-snapshotter/config.toml"
)

// Duration is a time.Duration written as a Go duration string ("10m").
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%w: duration %q: %v", ErrInvalid, b, err)
	}
	*d = Duration(v)
	return nil
}

// MarshalText prints the duration as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) {
	return []byte(time.Duration(d).String()), nil
}

// Snapshotter is the loop-snapshotter configuration file
// (/etc/loop-snapshotter/config.toml).
type Snapshotter struct {
	Root           string   `toml:"root"`
	Address        string   `toml:"address"`
	LogLevel       string   `toml:"log_level"`
	Mode           string   `toml:"mode"`
	LayerBacking   string   `toml:"layer_backing"`
	MountMode      string   `toml:"mount_mode"`
	FSType         string   `toml:"fs_type"`
	DefaultSize    ByteSize `toml:"default_size"`
	MaxSize        ByteSize `toml:"max_size"`
	MountOptions   []string `toml:"mount_options"`
	DirectIO       string   `toml:"direct_io"`
	AttachOnStart  string   `toml:"attach_on_start"`
	CleanupGrace   Duration `toml:"cleanup_grace"`
	MetricsAddress string   `toml:"metrics_address"`
}

// Storage modes. An empty Mode means: the mode recorded in the root, or
// ModeLayered for a new root.
const (
	// ModeLayered stores committed layers as erofs images shared by every
	// snapshot above them; an active snapshot is an overlay whose upper lives
	// on its own size-limited ext4 image.
	ModeLayered = "layered"
	// ModeFlat stores one cumulative ext4 image per snapshot, one loop device
	// per container.
	ModeFlat = "flat"
)

// MinSnapshotSize is the smallest filesystem a snapshot may have: the
// template carries a 16 MiB journal.
const MinSnapshotSize = 32 << 20

// DefaultSnapshotter returns the built-in defaults.
func DefaultSnapshotter() Snapshotter {
	return Snapshotter{
		Root:          DefaultSnapshotterRoot,
		Address:       DefaultSnapshotterAddress,
		LogLevel:      "info",
		Mode:          "",
		LayerBacking:  "auto",
		MountMode:     "device",
		FSType:        "ext4",
		DefaultSize:   10 << 30,
		MaxSize:       16 << 40,
		MountOptions:  []string{},
		DirectIO:      "auto",
		AttachOnStart: "lazy",
		CleanupGrace:  Duration(10 * time.Minute),
	}
}

// LoadSnapshotter reads path over the defaults. A missing file is not an
// error unless explicit is set (the user named it with --config); loaded
// reports whether a file was read.
func LoadSnapshotter(path string, explicit bool) (cfg Snapshotter, loaded bool, err error) {
	cfg = DefaultSnapshotter()
	if path == "" {
		return cfg, false, cfg.Validate()
	}
	if err := LoadFile(path, &cfg); err != nil {
		if errors.Is(err, fs.ErrNotExist) && !explicit {
			return cfg, false, cfg.Validate()
		}
		return cfg, false, err
	}
	return cfg, true, cfg.Validate()
}

// mountOptions1_6 are the options containerd 1.6.20's mount code and ext4
// both understand; anything else (direct-io, X-containerd.*) reaches
// mount(2) as data and fails there.
var mountOptions1_6 = map[string]bool{
	"discard": true, "nodiscard": true, "noatime": true, "relatime": true,
	"strictatime": true, "nodiratime": true, "lazytime": true, "nolazytime": true,
	"nosuid": true, "nodev": true, "noexec": true, "sync": true, "dirsync": true,
	"barrier": true, "nobarrier": true, "data=ordered": true, "data=writeback": true,
	"data=journal": true, "user_xattr": true, "acl": true, "noacl": true,
	"errors=remount-ro": true, "errors=continue": true, "errors=panic": true,
	"nodelalloc": true, "delalloc": true, "journal_checksum": true,
}

// Validate checks every value and returns an error matching ErrInvalid that
// names the offending key.
func (c *Snapshotter) Validate() error {
	bad := func(key, format string, a ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrInvalid, key, fmt.Sprintf(format, a...))
	}
	if !strings.HasPrefix(c.Root, "/") {
		return bad("root", "%q is not an absolute path", c.Root)
	}
	if !strings.HasPrefix(c.Address, "/") {
		return bad("address", "%q is not an absolute path", c.Address)
	}
	// sun_path holds 108 bytes including the terminating NUL.
	if len(c.Address) > 107 {
		return bad("address", "%q is longer than 107 bytes (unix socket limit)", c.Address)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "warning", "error":
	default:
		return bad("log_level", "%q is not one of debug, info, warn, error", c.LogLevel)
	}
	switch c.Mode {
	case "", ModeLayered, ModeFlat:
	default:
		return bad("mode", "%q is not one of layered, flat", c.Mode)
	}
	switch c.LayerBacking {
	case "auto", "loop", "file":
	default:
		return bad("layer_backing", "%q is not one of auto, loop, file", c.LayerBacking)
	}
	switch c.MountMode {
	case "device":
	case "loop-option":
		return bad("mount_mode", `"loop-option" is not implemented yet; use "device"`)
	default:
		return bad("mount_mode", "%q is not one of device, loop-option", c.MountMode)
	}
	if c.FSType != "ext4" {
		return bad("fs_type", "%q is not supported (only ext4)", c.FSType)
	}
	if c.DefaultSize < MinSnapshotSize {
		return bad("default_size", "%d is below the minimum %d", c.DefaultSize, MinSnapshotSize)
	}
	if c.MaxSize < c.DefaultSize {
		return bad("max_size", "%d is below default_size %d", c.MaxSize, c.DefaultSize)
	}
	for _, o := range c.MountOptions {
		if o == "rw" || o == "ro" {
			return bad("mount_options", "%q is set by the snapshotter per mount", o)
		}
		if !mountOptions1_6[o] {
			return bad("mount_options", "%q is not in the set containerd 1.6 passes safely to ext4", o)
		}
	}
	switch c.DirectIO {
	case "auto", "on", "off":
	default:
		return bad("direct_io", "%q is not one of auto, on, off", c.DirectIO)
	}
	switch c.AttachOnStart {
	case "lazy", "eager":
	default:
		return bad("attach_on_start", "%q is not one of lazy, eager", c.AttachOnStart)
	}
	if c.CleanupGrace < 0 {
		return bad("cleanup_grace", "negative")
	}
	if c.MetricsAddress != "" {
		if _, port, err := net.SplitHostPort(c.MetricsAddress); err != nil || port == "" {
			return bad("metrics_address", "%q is not host:port", c.MetricsAddress)
		}
	}
	return nil
}
