package snapshot

import (
	"context"
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
)

// metrics are the snapshotter's counters, per instance (no global state).
// They are written in the Prometheus text format by WriteMetrics.
type metrics struct {
	cloneReflink, cloneSparse atomic.Uint64
	grows, shrinks            atomic.Uint64
	journalReplays            atomic.Uint64
	lazyDetaches              atomic.Uint64
	orphansDetached           atomic.Uint64
}

// rpcStats is a latency histogram and error count per RPC method, fed by
// the server's interceptor through ObserveRPC.
type rpcStats struct {
	mu      sync.Mutex
	methods map[string]*rpcHist
}

type rpcHist struct {
	buckets []uint64 // counts per upper bound in rpcBounds, then +Inf
	sum     float64
	count   uint64
	errors  uint64
}

var rpcBounds = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

// ObserveRPC records one call of method that took d and failed if err.
func (s *Snapshotter) ObserveRPC(method string, d time.Duration, err error) {
	s.rpc.mu.Lock()
	defer s.rpc.mu.Unlock()
	if s.rpc.methods == nil {
		s.rpc.methods = map[string]*rpcHist{}
	}
	h := s.rpc.methods[method]
	if h == nil {
		h = &rpcHist{buckets: make([]uint64, len(rpcBounds)+1)}
		s.rpc.methods[method] = h
	}
	sec := d.Seconds()
	i := sort.SearchFloat64s(rpcBounds, sec)
	h.buckets[i]++
	h.sum += sec
	h.count++
	if err != nil {
		h.errors++
	}
}

// WriteMetrics writes every series in the Prometheus text exposition
// format: snapshots by kind, attached devices, clone paths, resizes, journal
// replays, lazy detaches, orphans detached, allocated bytes, and per-RPC
// latency histograms and error counts.
func (s *Snapshotter) WriteMetrics(ctx context.Context, w io.Writer) error {
	kinds := map[string]int{}
	var allocatedBytes int64
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			kinds[info.Kind.String()]++
			return nil
		})
	})
	if err != nil {
		kinds = nil
	}
	own, err := s.ownDevices()
	if err != nil {
		return err
	}
	if st, err := s.Status(ctx); err == nil {
		for _, sn := range st.Snapshots {
			allocatedBytes += sn.Usage
		}
	}
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("# HELP loop_snapshotter_snapshots Snapshots by kind.\n# TYPE loop_snapshotter_snapshots gauge\n")
	for _, k := range []string{"Active", "View", "Committed"} {
		p("loop_snapshotter_snapshots{kind=%q} %d\n", k, kinds[k])
	}
	p("# HELP loop_snapshotter_devices Loop devices backed by files under root.\n# TYPE loop_snapshotter_devices gauge\n")
	p("loop_snapshotter_devices %d\n", len(own))
	p("# HELP loop_snapshotter_allocated_bytes Sum of snapshot usage (allocated bytes over the parent).\n# TYPE loop_snapshotter_allocated_bytes gauge\n")
	p("loop_snapshotter_allocated_bytes %d\n", allocatedBytes)
	p("# HELP loop_snapshotter_clones_total Images cloned, by method.\n# TYPE loop_snapshotter_clones_total counter\n")
	p("loop_snapshotter_clones_total{method=\"reflink\"} %d\n", s.m.cloneReflink.Load())
	p("loop_snapshotter_clones_total{method=\"sparse\"} %d\n", s.m.cloneSparse.Load())
	p("# HELP loop_snapshotter_resizes_total Images resized with resize2fs, by direction.\n# TYPE loop_snapshotter_resizes_total counter\n")
	p("loop_snapshotter_resizes_total{direction=\"grow\"} %d\n", s.m.grows.Load())
	p("loop_snapshotter_resizes_total{direction=\"shrink\"} %d\n", s.m.shrinks.Load())
	for _, c := range []struct {
		name, help string
		v          uint64
	}{
		{"journal_replays_total", "Dirty journals replayed at Commit.", s.m.journalReplays.Load()},
		{"lazy_detaches_total", "Detaches deferred by the kernel to the device's last close.", s.m.lazyDetaches.Load()},
		{"orphans_detached_total", "Orphan devices detached at startup or by Cleanup.", s.m.orphansDetached.Load()},
	} {
		p("# HELP loop_snapshotter_%s %s\n# TYPE loop_snapshotter_%s counter\nloop_snapshotter_%s %d\n", c.name, c.help, c.name, c.name, c.v)
	}
	s.rpc.mu.Lock()
	defer s.rpc.mu.Unlock()
	names := make([]string, 0, len(s.rpc.methods))
	for m := range s.rpc.methods {
		names = append(names, m)
	}
	sort.Strings(names)
	p("# HELP loop_snapshotter_rpc_duration_seconds Snapshots API call latency.\n# TYPE loop_snapshotter_rpc_duration_seconds histogram\n")
	for _, m := range names {
		h := s.rpc.methods[m]
		var cum uint64
		for i, b := range rpcBounds {
			cum += h.buckets[i]
			p("loop_snapshotter_rpc_duration_seconds_bucket{method=%q,le=\"%g\"} %d\n", m, b, cum)
		}
		p("loop_snapshotter_rpc_duration_seconds_bucket{method=%q,le=\"+Inf\"} %d\n", m, h.count)
		p("loop_snapshotter_rpc_duration_seconds_sum{method=%q} %g\n", m, h.sum)
		p("loop_snapshotter_rpc_duration_seconds_count{method=%q} %d\n", m, h.count)
	}
	p("# HELP loop_snapshotter_rpc_errors_total Snapshots API calls that returned an error.\n# TYPE loop_snapshotter_rpc_errors_total counter\n")
	for _, m := range names {
		p("loop_snapshotter_rpc_errors_total{method=%q} %d\n", m, s.rpc.methods[m].errors)
	}
	return nil
}
