// Package plugin registers the loop snapshotter in containerd 2.x's plugin
// registry as io.containerd.snapshotter.v1 "loop", the way containerd's own
// plugins/snapshots/*/plugin packages do. Link it into a containerd build
// with a blank import:
//
//	import _ "github.com/loopkit/loopkit/pkg/snapshot/plugin"
//
// and configure it in containerd's config.toml:
//
//	[plugins."io.containerd.snapshotter.v1.loop"]
//	  default_size = "10GiB"
//
// In-process, containerd needs no proxy_plugins entry and no
// loop-snapshotter daemon. The two must not share a root: each holds the
// root's lock.
package plugin

import (
	"errors"

	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/platforms"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/snapshot"
)

// ID is the plugin's id: containerd's snapshotter name "loop".
const ID = "loop"

// Config is the plugin's table in containerd's configuration. Its keys are
// loop-snapshotter's (see config.Snapshotter, same names, same defaults)
// without the daemon's own (address, log_level, metrics_address: containerd
// serves and logs), and with root_path, as containerd's snapshotters spell
// it; empty means containerd's directory for the plugin
// (<containerd root>/io.containerd.snapshotter.v1.loop).
type Config struct {
	RootPath      string          `toml:"root_path"`
	Mode          string          `toml:"mode"`
	LayerBacking  string          `toml:"layer_backing"`
	MountMode     string          `toml:"mount_mode"`
	FSType        string          `toml:"fs_type"`
	DefaultSize   config.ByteSize `toml:"default_size"`
	MaxSize       config.ByteSize `toml:"max_size"`
	MountOptions  []string        `toml:"mount_options"`
	DirectIO      string          `toml:"direct_io"`
	AttachOnStart string          `toml:"attach_on_start"`
	CleanupGrace  config.Duration `toml:"cleanup_grace"`
}

// DefaultConfig returns loop-snapshotter's built-in defaults; containerd
// decodes the plugin's table over them.
func DefaultConfig() *Config {
	d := config.DefaultSnapshotter()
	return &Config{
		Mode: d.Mode, LayerBacking: d.LayerBacking, MountMode: d.MountMode, FSType: d.FSType,
		DefaultSize: d.DefaultSize, MaxSize: d.MaxSize, MountOptions: d.MountOptions,
		DirectIO: d.DirectIO, AttachOnStart: d.AttachOnStart, CleanupGrace: d.CleanupGrace,
	}
}

// Snapshotter returns the snapshotter configuration c describes, rooted at
// root when c has no root_path.
func (c *Config) Snapshotter(root string) config.Snapshotter {
	s := config.DefaultSnapshotter()
	s.Root = root
	if c.RootPath != "" {
		s.Root = c.RootPath
	}
	s.Mode, s.LayerBacking, s.MountMode, s.FSType = c.Mode, c.LayerBacking, c.MountMode, c.FSType
	s.DefaultSize, s.MaxSize, s.MountOptions = c.DefaultSize, c.MaxSize, c.MountOptions
	s.DirectIO, s.AttachOnStart, s.CleanupGrace = c.DirectIO, c.AttachOnStart, c.CleanupGrace
	return s
}

func init() {
	registry.Register(&plugin.Registration{
		Type:   plugins.SnapshotPlugin,
		ID:     ID,
		Config: DefaultConfig(),
		InitFn: initFn,
	})
}

func initFn(ic *plugin.InitContext) (any, error) {
	c, ok := ic.Config.(*Config)
	if !ok {
		return nil, errors.New("loop snapshotter: invalid plugin configuration")
	}
	cfg := c.Snapshotter(ic.Properties[plugins.PropertyRootDir])
	// Images and erofs layers hold files of the host's architecture.
	ic.Meta.Platforms = append(ic.Meta.Platforms, platforms.DefaultSpec())
	ic.Meta.Exports[plugins.SnapshotterRootDir] = cfg.Root
	return snapshot.NewSnapshotter(ic.Context, cfg)
}
