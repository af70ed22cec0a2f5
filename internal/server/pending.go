package server

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/loopkit/loopkit/internal/snapadmin"
	"github.com/loopkit/loopkit/internal/snapservice"
)

// errNotServing answers requests that arrive after the snapshotter failed
// to start (the daemon is about to exit).
var errNotServing = fmt.Errorf("snapshotter is not serving: %w", errdefs.ErrUnavailable)

// pending stands in for the snapshotter while it reconciles on a socket
// that systemd passed: the gRPC server already answers, so containerd's
// connection (whose handshake containerd 2.x bounds to one second) stays
// up, and each request waits until the snapshotter is ready or the
// request's context ends.
type pending struct {
	ready chan struct{}
	sn    snapadmin.Snapshotter // set before ready is closed
}

func newPending() *pending { return &pending{ready: make(chan struct{})} }

// set publishes sn (nil: startup failed) and releases the waiting requests.
func (p *pending) set(sn snapadmin.Snapshotter) {
	p.sn = sn
	close(p.ready)
}

func (p *pending) get(ctx context.Context) (snapadmin.Snapshotter, error) {
	select {
	case <-p.ready:
		if p.sn == nil {
			return nil, errNotServing
		}
		return p.sn, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// now returns the snapshotter if it is ready, without waiting.
func (p *pending) now() snapadmin.Snapshotter {
	select {
	case <-p.ready:
		return p.sn
	default:
		return nil
	}
}

// lazySnapshotter is the snapshots.Snapshotter the gRPC service is built
// on: every call waits for pending.
type lazySnapshotter struct{ p *pending }

var (
	_ snapservice.Snapshotter = lazySnapshotter{}
	_ snapshots.Cleaner       = lazySnapshotter{}
	_ statusServer            = lazySnapshotter{}
)

func (l lazySnapshotter) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	sn, err := l.p.get(ctx)
	if err != nil {
		return snapshots.Info{}, err
	}
	return sn.Stat(ctx, key)
}

func (l lazySnapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	sn, err := l.p.get(ctx)
	if err != nil {
		return snapshots.Info{}, err
	}
	return sn.Update(ctx, info, fieldpaths...)
}

func (l lazySnapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	sn, err := l.p.get(ctx)
	if err != nil {
		return snapshots.Usage{}, err
	}
	return sn.Usage(ctx, key)
}

func (l lazySnapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	sn, err := l.p.get(ctx)
	if err != nil {
		return nil, err
	}
	return sn.Mounts(ctx, key)
}

func (l lazySnapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	sn, err := l.p.get(ctx)
	if err != nil {
		return nil, err
	}
	return sn.Prepare(ctx, key, parent, opts...)
}

func (l lazySnapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	sn, err := l.p.get(ctx)
	if err != nil {
		return nil, err
	}
	return sn.View(ctx, key, parent, opts...)
}

func (l lazySnapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	sn, err := l.p.get(ctx)
	if err != nil {
		return err
	}
	return sn.Commit(ctx, name, key, opts...)
}

func (l lazySnapshotter) Remove(ctx context.Context, key string) error {
	sn, err := l.p.get(ctx)
	if err != nil {
		return err
	}
	return sn.Remove(ctx, key)
}

func (l lazySnapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	sn, err := l.p.get(ctx)
	if err != nil {
		return err
	}
	return sn.Walk(ctx, fn, filters...)
}

func (l lazySnapshotter) Cleanup(ctx context.Context) error {
	sn, err := l.p.get(ctx)
	if err != nil {
		return err
	}
	return sn.Cleanup(ctx)
}

// Close is the daemon's business (Run closes the snapshotter), not a
// client's.
func (l lazySnapshotter) Close() error { return nil }

// Describe and Collect serve the snapshotter's own metrics once it exists
// (the metrics endpoint is only served after that).
func (l lazySnapshotter) Describe(ch chan<- *prometheus.Desc) {
	if sn := l.p.now(); sn != nil {
		sn.Describe(ch)
	}
}

func (l lazySnapshotter) Collect(ch chan<- prometheus.Metric) {
	if sn := l.p.now(); sn != nil {
		sn.Collect(ch)
	}
}

// Status serves the status service through pending.
func (l lazySnapshotter) Status(ctx context.Context) (snapadmin.Status, error) {
	sn, err := l.p.get(ctx)
	if err != nil {
		return snapadmin.Status{}, err
	}
	return sn.Status(ctx)
}
