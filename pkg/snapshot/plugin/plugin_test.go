package plugin

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"
	toml "github.com/pelletier/go-toml/v2"

	"github.com/loopkit/loopkit/internal/snapadmin"
	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
)

// Overlay mounts from containerd's mount code run on locked threads; see
// pkg/snapshot's suite_test.go for why the main goroutine keeps its own.
func init() { runtime.LockOSThread() }

// registration finds the loop snapshotter among the registry's plugins, as
// containerd's server does when it starts.
func registration(t *testing.T) plugin.Registration {
	t.Helper()
	for _, r := range registry.Graph(func(*plugin.Registration) bool { return false }) {
		if r.Type == plugins.SnapshotPlugin && r.ID == ID {
			return r
		}
	}
	t.Fatalf("no %s.%s in the plugin registry", plugins.SnapshotPlugin, ID)
	return plugin.Registration{}
}

// TestPluginInit initialises the plugin through its registration's InitFn,
// with containerd's root property, in both storage modes, and runs a
// Prepare (written to through its mounts), Commit, View (read back) and
// Remove on a real root.
func TestPluginInit(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "mkfs.ext4", "resize2fs", "e2fsck", "tune2fs", "mkfs.erofs", "fsck.erofs")
	reg := registration(t)
	if _, ok := reg.Config.(*Config); !ok {
		t.Fatalf("registered config %T, want *Config", reg.Config)
	}
	for _, mode := range []string{config.ModeLayered, config.ModeFlat} {
		t.Run(mode, func(t *testing.T) {
			work := t.TempDir()
			testutil.NoLeaks(t, work)
			root := filepath.Join(work, plugins.SnapshotPlugin.String()+"."+ID)
			ctx := context.Background()
			ic := plugin.NewContext(ctx, plugin.NewPluginSet(), map[string]string{plugins.PropertyRootDir: root})
			cfg := *reg.Config.(*Config) // what containerd decodes its table over
			cfg.Mode = mode
			cfg.DefaultSize = 64 << 20
			ic.Config = &cfg
			p := reg.Init(ic)
			inst, err := p.Instance()
			if err != nil {
				t.Fatalf("init: %v", err)
			}
			sn, ok := inst.(snapshots.Snapshotter)
			if !ok {
				t.Fatalf("instance %T is not a snapshots.Snapshotter", inst)
			}
			adm, err := snapadmin.From(sn, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := errors.Join(adm.Purge(ctx), sn.Close()); err != nil {
					t.Error(err)
				}
			})
			if got := p.Meta.Exports[plugins.SnapshotterRootDir]; got != root {
				t.Errorf("exported root %q, want %q", got, root)
			}
			if len(p.Meta.Platforms) == 0 {
				t.Error("no platform declared")
			}
			if st, err := adm.Status(ctx); err != nil || st.Mode != mode {
				t.Fatalf("status: mode %q, %v; want %q", st.Mode, err, mode)
			}

			ms, err := sn.Prepare(ctx, "active", "")
			if err != nil {
				t.Fatalf("prepare: %v", err)
			}
			withMounted(t, ms, filepath.Join(work, "rw"), func(dir string) {
				if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("loop"), 0o644); err != nil {
					t.Fatal(err)
				}
			})
			if err := sn.Commit(ctx, "layer", "active"); err != nil {
				t.Fatalf("commit: %v", err)
			}
			if ms, err = sn.View(ctx, "view", "layer"); err != nil {
				t.Fatalf("view: %v", err)
			}
			withMounted(t, ms, filepath.Join(work, "ro"), func(dir string) {
				if b, err := os.ReadFile(filepath.Join(dir, "hello")); err != nil || string(b) != "loop" {
					t.Errorf("view reads %q, %v; want the committed file", b, err)
				}
			})
			for _, k := range []string{"view", "layer"} {
				if err := sn.Remove(ctx, k); err != nil {
					t.Fatalf("remove %s: %v", k, err)
				}
			}
			n := 0
			if err := sn.Walk(ctx, func(context.Context, snapshots.Info) error { n++; return nil }); err != nil || n != 0 {
				t.Errorf("walk after remove: %d snapshots, %v; want none", n, err)
			}
		})
	}
}

// A configuration that is not the plugin's is refused, not a panic.
func TestPluginInitWrongConfig(t *testing.T) {
	ic := plugin.NewContext(context.Background(), plugin.NewPluginSet(), nil)
	ic.Config = &struct{}{}
	if _, err := registration(t).Init(ic).Instance(); err == nil {
		t.Fatal("init with a foreign config succeeded")
	}
}

// Config.Snapshotter keeps root_path over containerd's directory, and a
// table containerd left empty gives loop-snapshotter's defaults.
func TestConfigSnapshotter(t *testing.T) {
	c := DefaultConfig()
	got := c.Snapshotter("/var/lib/containerd/x")
	want := config.DefaultSnapshotter()
	want.Root = "/var/lib/containerd/x"
	if got.Root != want.Root || got.DefaultSize != want.DefaultSize || got.LayerBacking != want.LayerBacking || got.CleanupGrace != want.CleanupGrace {
		t.Errorf("default table gives %+v, want %+v", got, want)
	}
	c.RootPath = "/srv/loop"
	if got := c.Snapshotter("/var/lib/containerd/x"); got.Root != "/srv/loop" {
		t.Errorf("root %q, want root_path", got.Root)
	}
}

// containerd decodes the plugin's table with go-toml over the registered
// defaults: the keys keep their loop-snapshotter spelling and units, and
// what the table leaves out stays at the default.
func TestConfigDecodes(t *testing.T) {
	c := DefaultConfig()
	table := "root_path = \"/srv/loop\"\ndefault_size = \"10GiB\"\nmode = \"flat\"\n"
	if err := toml.Unmarshal([]byte(table), c); err != nil {
		t.Fatal(err)
	}
	if c.RootPath != "/srv/loop" || c.DefaultSize != 10<<30 || c.Mode != config.ModeFlat {
		t.Errorf("decoded %+v", c)
	}
	if d := config.DefaultSnapshotter(); c.MaxSize != d.MaxSize || c.CleanupGrace != d.CleanupGrace {
		t.Errorf("unset keys lost their defaults: %+v", c)
	}
}

// withMounted mounts ms on dir, runs fn on it and unmounts.
func withMounted(t *testing.T, ms []mount.Mount, dir string, fn func(dir string)) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mount.All(ms, dir); err != nil {
		t.Fatalf("mount %v on %s: %v", ms, dir, err)
	}
	defer func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	}()
	fn(dir)
}
