package snapshot

import (
	"context"
	"sync/atomic"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the snapshotter's counters, per instance (no global state).
type metrics struct {
	cloneReflink, cloneSparse atomic.Uint64
	grows, shrinks            atomic.Uint64
	journalReplays            atomic.Uint64
	lazyDetaches              atomic.Uint64
	orphansDetached           atomic.Uint64
	dataLossRefusals          atomic.Uint64
}

var (
	descSnapshots = prometheus.NewDesc("loop_snapshotter_snapshots", "Snapshots by kind.", []string{"kind"}, nil)
	descDevices   = prometheus.NewDesc("loop_snapshotter_devices", "Loop devices backed by files under root.", nil, nil)
	descAllocated = prometheus.NewDesc("loop_snapshotter_allocated_bytes",
		"Sum of snapshot usage (bytes of each image that no other file shares).", nil, nil)
	descClones  = prometheus.NewDesc("loop_snapshotter_clones_total", "Images cloned, by method.", []string{"method"}, nil)
	descResizes = prometheus.NewDesc("loop_snapshotter_resizes_total", "Images resized with resize2fs, by direction.", []string{"direction"}, nil)
	descReplays = prometheus.NewDesc("loop_snapshotter_journal_replays_total", "Dirty journals replayed at Commit.", nil, nil)
	descLazy    = prometheus.NewDesc("loop_snapshotter_lazy_detaches_total",
		"Detaches deferred by the kernel to the device's last close.", nil, nil)
	descOrphans = prometheus.NewDesc("loop_snapshotter_orphans_detached_total",
		"Orphan devices detached at startup or by Cleanup.", nil, nil)
	descDataLoss = prometheus.NewDesc("loop_snapshotter_data_loss_refusals_total",
		"Commits refused because the image lost data.", nil, nil)
	descMode = prometheus.NewDesc("loop_snapshotter_mode",
		"Always 1: the storage mode of the root and, in layered mode, how layers are mounted.", []string{"mode", "layer_backing"}, nil)
	descLayerMounts = prometheus.NewDesc("loop_snapshotter_layer_mounts",
		"Layered mode: committed layers mounted read-only on the host.", nil, nil)
)

// Describe implements prometheus.Collector.
func (s *snapshotter) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSnapshots, descDevices, descAllocated, descClones, descResizes,
		descReplays, descLazy, descOrphans, descDataLoss, descMode, descLayerMounts} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. One Status per scrape: one
// read transaction, and loop devices found through sysfs only (opening
// other owners' devices would make their detaches lazy).
func (s *snapshotter) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	if st, err := s.Status(context.Background()); err != nil {
		log.L.WithError(err).Warn("metrics: status")
	} else {
		kinds := map[string]int{}
		var allocated int64
		for _, sn := range st.Snapshots {
			kinds[sn.Kind]++
			allocated += sn.Usage
		}
		for _, k := range []string{"Active", "View", "Committed"} {
			gauge(descSnapshots, float64(kinds[k]), k)
		}
		gauge(descDevices, float64(st.Devices))
		gauge(descAllocated, float64(allocated))
		if s.layered() {
			var mounted int
			for _, sn := range st.Snapshots {
				if sn.Mounted {
					mounted++
				}
			}
			gauge(descLayerMounts, float64(mounted))
		}
	}
	gauge(descMode, 1, s.mode, s.backing)
	counter(descClones, s.m.cloneReflink.Load(), "reflink")
	counter(descClones, s.m.cloneSparse.Load(), "sparse")
	counter(descResizes, s.m.grows.Load(), "grow")
	counter(descResizes, s.m.shrinks.Load(), "shrink")
	counter(descReplays, s.m.journalReplays.Load())
	counter(descLazy, s.m.lazyDetaches.Load())
	counter(descOrphans, s.m.orphansDetached.Load())
	counter(descDataLoss, s.m.dataLossRefusals.Load())
}
