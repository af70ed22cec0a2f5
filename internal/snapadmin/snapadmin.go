// Package snapadmin is the daemon's side of pkg/snapshot: what
// loop-snapshotter (its status service, its metrics endpoint, its
// crash-safety tests) needs beyond containerd's snapshots.Snapshotter.
//
// pkg/snapshot follows containerd's rule for a snapshotter package: its
// constructor returns snapshots.Snapshotter and the concrete type is
// unexported, so an embedder (containerd itself, through pkg/snapshot/plugin)
// sees only containerd's interfaces. The extra capabilities live here, in
// an internal package, rather than as exported optional interfaces in
// pkg/snapshot: only this module calls them, and their types (Status is the
// status service's wire message) would otherwise become a public API that
// no embedder can use. The daemon type-asserts the snapshotter it built to
// Snapshotter, the way containerd asserts snapshots.Cleaner.
package snapadmin

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// Snapshotter is a loop snapshotter as the daemon serves it.
type Snapshotter interface {
	snapshots.Snapshotter
	snapshots.Cleaner
	prometheus.Collector
	// Status lists every snapshot with its size limit, usage and device,
	// and the devices under root that no live snapshot needs (orphans).
	Status(ctx context.Context) (Status, error)
	// Purge detaches every loop device backed by a file under root (and,
	// in layered mode, unmounts the layers). Tests and benchmarks call it
	// before Close so that they leave no device behind; the daemon never
	// does (running containers keep their devices).
	Purge(ctx context.Context) error
}

// From takes what snapshot.NewSnapshotter returned and gives its daemon
// side: From(snapshot.NewSnapshotter(ctx, cfg)). A snapshotter that is not
// a loop snapshotter is closed and refused.
func From(sn snapshots.Snapshotter, err error) (Snapshotter, error) {
	if err != nil {
		return nil, err
	}
	a, ok := sn.(Snapshotter)
	if !ok {
		return nil, errors.Join(fmt.Errorf("snapshotter %T has no status, purge or metrics", sn), sn.Close())
	}
	return a, nil
}

// Status is what `loop-snapshotter status` prints, and the status
// service's message.
type Status struct {
	Root string `json:"root"`
	// Mode is the storage mode of the root; LayerBacking, in layered mode,
	// how layers are mounted ("file" or "loop").
	Mode         string           `json:"mode"`
	LayerBacking string           `json:"layer_backing,omitempty"`
	Snapshots    []SnapshotStatus `json:"snapshots"`
	Orphans      []DeviceStatus   `json:"orphans"`
	Trash        int              `json:"trash_entries"`
	Staging      int              `json:"staging_entries"`
	// Devices counts the loop devices backed under root, for the metrics;
	// it is not part of the message.
	Devices int `json:"-"`
}

// SnapshotStatus describes one snapshot and its device, if attached.
type SnapshotStatus struct {
	Key       string `json:"key"`
	ID        string `json:"id"`
	Kind      string `json:"kind"`
	Parent    string `json:"parent,omitempty"`
	SizeLimit int64  `json:"size_limit"`
	Usage     int64  `json:"usage"`
	Device    string `json:"device,omitempty"`
	DiskSeq   uint64 `json:"diskseq,omitempty"`
	// Mounted: a layer's erofs image is mounted (layered mode).
	Mounted bool `json:"mounted,omitempty"`
}

// DeviceStatus describes a loop device backed by a file under root.
type DeviceStatus struct {
	Device      string `json:"device"`
	DiskSeq     uint64 `json:"diskseq"`
	BackingFile string `json:"backing_file"`
	ReadOnly    bool   `json:"read_only"`
}

type faultKey struct{}

// WithFaultHook returns a context that makes the snapshotter built with it
// (snapshot.NewSnapshotter reads it once) call fn at each named step of
// Prepare, Mounts, Commit and Remove: crash-safety tests kill the process
// there, race tests run another call there. A context value rather than an
// Opt keeps this test seam off pkg/snapshot's public surface.
func WithFaultHook(ctx context.Context, fn func(step string)) context.Context {
	return context.WithValue(ctx, faultKey{}, fn)
}

// FaultHook returns the hook WithFaultHook put in ctx, or nil.
func FaultHook(ctx context.Context) func(step string) {
	fn, _ := ctx.Value(faultKey{}).(func(step string))
	return fn
}

// KillAt returns a fault hook that kills the process with SIGKILL at step:
// a crash there leaves what a power cut would, without deferred cleanup.
func KillAt(ctx context.Context, step string) func(string) {
	return func(s string) {
		if s == step {
			log.G(ctx).WithField("step", s).Warn("test fault hook: killing myself")
			unix.Kill(os.Getpid(), unix.SIGKILL)
			select {} // the signal is asynchronous: go no further
		}
	}
}
