package snapshot

import (
	"context"
	"os"
	"path/filepath"
	"sort"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"

	"github.com/loopkit/loopkit/internal/snapadmin"
)

// Status lists every snapshot with its size limit, usage and device, and
// the devices under root that no live snapshot needs (orphans).
func (s *snapshotter) Status(ctx context.Context) (snapadmin.Status, error) {
	if s.layered() {
		return s.lstatus(ctx)
	}
	st, entries, own, byKey, err := s.statusStart(ctx)
	if err != nil {
		return snapadmin.Status{}, err
	}
	mounts := mountPoints()
	needed := map[devKey]bool{}
	for _, e := range entries {
		ss := snapadmin.SnapshotStatus{Key: e.info.Name, ID: e.id, Kind: e.info.Kind.String(), Parent: e.info.Parent, Usage: e.usage.Size}
		imgID := e.id
		if e.info.Kind != snapshots.KindCommitted {
			k := deviceFor(e.sn)
			needed[k] = true
			imgID = k.id
			if d, ok := byKey[k]; ok {
				ss.Device, ss.DiskSeq = d.info.Path, d.info.DiskSeq
			}
			if e.info.Kind == snapshots.KindActive || k.id == e.id {
				parent := ""
				if len(e.sn.ParentIDs) > 0 {
					parent = s.imagePath(e.sn.ParentIDs[0])
				}
				mnt := ""
				if d, ok := byKey[k]; ok {
					mnt = mounts[d.info.Devnum]
				}
				if u, err := imageUsage(s.imagePath(e.id), parent, mnt); err == nil {
					ss.Usage = u.Size
				}
			} else {
				ss.Usage = 0
			}
		}
		if fi, err := os.Stat(s.imagePath(imgID)); err == nil {
			ss.SizeLimit = fi.Size()
		}
		st.Snapshots = append(st.Snapshots, ss)
	}
	for _, d := range own {
		if (d.key.id != "" && needed[d.key]) || d.detachPending() {
			continue
		}
		st.Orphans = append(st.Orphans, snapadmin.DeviceStatus{Device: d.info.Path, DiskSeq: d.info.DiskSeq, BackingFile: d.info.BackingFile, ReadOnly: d.info.ReadOnly})
	}
	sort.Slice(st.Snapshots, func(i, j int) bool { return st.Snapshots[i].Key < st.Snapshots[j].Key })
	s.statusTail(&st)
	return st, nil
}

// statusEntry is one snapshot's record; sn only for active ones and views.
type statusEntry struct {
	id    string
	info  snapshots.Info
	usage snapshots.Usage
	sn    storage.Snapshot
}

func (s *snapshotter) statusEntries(ctx context.Context) ([]statusEntry, error) {
	var entries []statusEntry
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			id, _, usage, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			e := statusEntry{id: id, info: info, usage: usage}
			if info.Kind != snapshots.KindCommitted {
				if e.sn, err = storage.GetSnapshot(ctx, info.Name); err != nil {
					return err
				}
			}
			entries = append(entries, e)
			return nil
		})
		if errdefs.IsNotFound(err) {
			return nil
		}
		return err
	})
	return entries, err
}

// statusStart reads what Status starts from in both modes: every
// snapshot's entry and the devices backed by files under root, all of
// them and those of a known snapshot by key; st is the status head.
func (s *snapshotter) statusStart(ctx context.Context) (st snapadmin.Status, entries []statusEntry, own []ownDevice, byKey map[devKey]ownDevice, err error) {
	if entries, err = s.statusEntries(ctx); err != nil {
		return st, nil, nil, nil, err
	}
	if own, err = s.ownDevices(); err != nil {
		return st, nil, nil, nil, err
	}
	byKey = map[devKey]ownDevice{}
	for _, d := range own {
		if d.key.id != "" {
			byKey[d.key] = d
		}
	}
	st = s.statusHead()
	st.Devices = len(own)
	return st, entries, own, byKey, nil
}

func (s *snapshotter) statusHead() snapadmin.Status {
	st := snapadmin.Status{Root: s.root, Mode: s.mode, Snapshots: []snapadmin.SnapshotStatus{}, Orphans: []snapadmin.DeviceStatus{}}
	if s.layered() {
		st.LayerBacking = s.backing
	}
	return st
}

// statusTail counts the trash and staging entries.
func (s *snapshotter) statusTail(st *snapadmin.Status) {
	if es, err := os.ReadDir(filepath.Join(s.root, "trash")); err == nil {
		st.Trash = len(es)
	}
	if es, err := os.ReadDir(filepath.Join(s.root, "staging")); err == nil {
		st.Staging = len(es)
	}
}
