package snapshot

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/snapadmin"
)

// lrecords is what the metadata says exists in a layered root.
type lrecords struct {
	kind  map[string]snapshots.Kind // by id
	key   map[string]string         // id to key or name
	owner map[string]bool           // ids that own a u/<id> directory
}

func (s *snapshotter) lrecords(ctx context.Context) (lrecords, error) {
	r := lrecords{kind: map[string]snapshots.Kind{}, key: map[string]string{}, owner: map[string]bool{}}
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if errdefs.IsNotFound(err) {
			return nil // fresh database: no buckets yet
		}
		if err != nil {
			return err
		}
		for id, key := range ids {
			r.key[id] = key
			sn, err := storage.GetSnapshot(ctx, key)
			if errdefs.IsFailedPrecondition(err) {
				r.kind[id] = snapshots.KindCommitted
				continue
			}
			if err != nil {
				return err
			}
			r.kind[id] = sn.Kind
			r.owner[id] = sn.Kind == snapshots.KindActive || len(sn.ParentIDs) == 0
		}
		return nil
	})
	return r, err
}

// needed says whether a device of ours backs something a record owns.
func (r lrecords) needed(k devKey) bool {
	switch k.role {
	case roleLayer:
		return r.kind[k.id] == snapshots.KindCommitted
	case roleUpper:
		return r.kind[k.id] == snapshots.KindActive
	}
	return false
}

// layeredKey names the device backed by rel (a path under root).
func layeredKey(rel string, readOnly bool) devKey {
	parts := strings.Split(rel, "/")
	switch {
	case len(parts) == 2 && parts[0] == "layers" && strings.HasSuffix(parts[1], ".erofs") && readOnly:
		return devKey{strings.TrimSuffix(parts[1], ".erofs"), roleLayer}
	case len(parts) == 3 && parts[0] == "u" && parts[2] == "image" && !readOnly:
		return devKey{parts[1], roleUpper}
	}
	return devKey{}
}

// lreconcile runs at startup, before serving: staging leftovers go to
// trash, a frozen upper (a crash inside Commit) is thawed, mounts and
// devices under root that no record needs are unmounted and detached, the
// others adopted; with attach_on_start = "eager" what live snapshots need
// is mounted now rather than at their next Mounts.
func (s *snapshotter) lreconcile(ctx context.Context) error {
	staging := filepath.Join(s.root, "staging")
	entries, err := os.ReadDir(staging)
	if err != nil {
		return err
	}
	for _, e := range entries {
		p := filepath.Join(staging, e.Name())
		unmountUnder(p)
		if err := s.toTrash(p, "staging"); err != nil {
			return err
		}
	}
	recs, err := s.lrecords(ctx)
	if err != nil {
		return err
	}
	for id := range recs.kind {
		if up := s.upperOf(id); up.image != "" {
			thaw(up.mnt)
		}
	}
	if err := s.sweep(ctx, false); err != nil {
		return err
	}
	if s.cfg.AttachOnStart == "eager" {
		for id, kind := range recs.kind {
			if kind == snapshots.KindCommitted {
				continue
			}
			if _, err := s.lmounts(ctx, recs.key[id]); err != nil {
				log.G(ctx).WithError(err).WithField("key", recs.key[id]).Warn("mount on start")
			}
		}
	}
	return nil
}

// thaw ends a freeze left by a process killed inside Commit; EINVAL (not
// frozen) is the common answer.
func thaw(mnt string) {
	if mounted, _ := mountinfo.Mounted(mnt); !mounted {
		return
	}
	if f, err := os.Open(mnt); err == nil {
		unix.IoctlSetInt(int(f.Fd()), ioctlFITHAW, 0)
		f.Close()
	}
}

// unmountUnder unmounts every mount at or below dir, deepest first.
func unmountUnder(dir string) {
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return
	}
	sort.Slice(ms, func(i, j int) bool { return len(ms[i].Mountpoint) > len(ms[j].Mountpoint) })
	for _, m := range ms {
		unmountPath(m.Mountpoint)
	}
}

// sweep unmounts the mounts under l/ and u/ and detaches the devices under
// root that no record needs, each under its key's lock with the records
// read again there (a Prepare may have just made it). With files set it
// also trashes the upper directories and layer images nobody owns.
func (s *snapshotter) sweep(ctx context.Context, files bool) error {
	var errs []error
	type orphan struct {
		k    devKey
		path string
	}
	var cands []orphan
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(s.root))
	if err != nil {
		return err
	}
	for _, m := range ms {
		rel, err := filepath.Rel(s.root, m.Mountpoint)
		if err != nil {
			continue
		}
		parts := strings.Split(rel, "/")
		switch {
		case len(parts) == 2 && parts[0] == "l":
			cands = append(cands, orphan{devKey{parts[1], roleLayer}, m.Mountpoint})
		case len(parts) == 3 && parts[0] == "u" && parts[2] == "m":
			cands = append(cands, orphan{devKey{parts[1], roleUpper}, m.Mountpoint})
		}
	}
	if files {
		if es, err := os.ReadDir(filepath.Join(s.root, "u")); err == nil {
			for _, e := range es {
				cands = append(cands, orphan{devKey{e.Name(), roleUpper}, ""})
			}
		}
		if es, err := os.ReadDir(filepath.Join(s.root, "layers")); err == nil {
			for _, e := range es {
				if id, ok := strings.CutSuffix(e.Name(), ".erofs"); ok {
					cands = append(cands, orphan{devKey{id, roleLayer}, ""})
				}
			}
		}
	}
	// Read once; only what looks orphaned is checked again under its lock,
	// so a sweep costs one scan of the metadata, not one per candidate.
	recs0, err := s.lrecords(ctx)
	if err != nil {
		return err
	}
	keep := func(r lrecords, k devKey) bool {
		return k.role == roleLayer && r.kind[k.id] == snapshots.KindCommitted || k.role == roleUpper && r.owner[k.id]
	}
	for _, c := range cands {
		if keep(recs0, c.k) {
			continue
		}
		// A layer image is written by its snapshot's Commit, which holds
		// the upper's lock: take it first (the order Mounts takes them in).
		unlockUpper := func() {}
		if c.k.role == roleLayer {
			unlockUpper = s.devs.lock(devKey{c.k.id, roleUpper})
		}
		unlockKey := s.devs.lock(c.k)
		unlock := func() { unlockKey(); unlockUpper() }
		recs, err := s.lrecords(ctx)
		if err != nil {
			unlock()
			return err
		}
		switch {
		case keep(recs, c.k):
		case c.path != "":
			log.G(ctx).WithFields(log.Fields{"path": c.path, "id": c.k.id}).Info("unmounting orphan mount")
			if err := unmountPath(c.path); err != nil {
				errs = append(errs, err)
			}
		case c.k.role == roleUpper:
			s.releaseUpperLocked(ctx, c.k.id, "")
		case c.k.role == roleLayer:
			// No record, or a still active one: a Commit that crashed
			// before recording (its retry builds the image again).
			unmountPath(s.layerDir(c.k.id))
			os.Remove(s.layerDir(c.k.id))
			if err := s.devs.detachImage(ctx, s.layerImage(c.k.id), c.k); err != nil {
				errs = append(errs, err)
			}
			if err := s.toTrash(s.layerImage(c.k.id), c.k.id); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		unlock()
	}

	own, err := s.ownDevices()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, d := range own {
		if d.key.id != "" && recs0.needed(d.key) && !d.info.Autoclear {
			continue
		}
		if d.key.id != "" {
			unlock := s.devs.lock(d.key)
			recs, err := s.lrecords(ctx)
			if err != nil {
				unlock()
				return err
			}
			if recs.needed(d.key) {
				if d.info.Autoclear {
					if err := clearAutoclear(ctx, d.info.Record()); err != nil {
						log.G(ctx).WithError(err).WithField("device", d.info.Path).Warn("adopt device: clear autoclear")
					}
				}
				unlock()
				continue
			}
			s.devs.forget(d.key)
			err = s.detachOrphanDevice(ctx, d)
			unlock()
			if err != nil {
				errs = append(errs, err)
			}
			continue
		}
		if err := s.detachOrphanDevice(ctx, d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// lcleanup deletes what Remove and crashes left: orphan mounts, devices,
// upper directories and layer images, staging entries older than
// cleanup_grace, and the trash.
func (s *snapshotter) lcleanup(ctx context.Context) error {
	var errs []error
	s.cleanupMu.Lock()
	if err := s.sweep(ctx, true); err != nil {
		errs = append(errs, err)
	}
	grace := time.Duration(s.cfg.CleanupGrace)
	entries, _ := os.ReadDir(filepath.Join(s.root, "staging"))
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) >= grace {
			p := filepath.Join(s.root, "staging", e.Name())
			unmountUnder(p)
			if err := s.toTrash(p, "staging"); err != nil {
				errs = append(errs, err)
			}
		}
	}
	s.cleanupMu.Unlock()
	entries, _ = os.ReadDir(filepath.Join(s.root, "trash"))
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(s.root, "trash", e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// lusage: a layer reports its erofs image's allocated bytes and inode
// count (stored at Commit); an active snapshot the used bytes and inodes
// of its mounted upper filesystem (statfs, current while the container
// runs), else of its upper directory; a view owns nothing.
func (s *snapshotter) lusage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, err
	}
	switch info.Kind {
	case snapshots.KindCommitted:
		return usage, nil
	case snapshots.KindView:
		return snapshots.Usage{}, nil
	}
	return s.upperUsage(ctx, id)
}

func (s *snapshotter) upperUsage(ctx context.Context, id string) (snapshots.Usage, error) {
	up := s.upperOf(id)
	if up.image == "" {
		du, err := fs.DiskUsage(ctx, up.upper)
		return snapshots.Usage{Size: du.Size, Inodes: du.Inodes}, err
	}
	if mounted, _ := mountinfo.Mounted(up.mnt); mounted {
		var st unix.Statfs_t
		if err := unix.Statfs(up.mnt, &st); err != nil {
			return snapshots.Usage{}, &os.PathError{Op: "statfs", Path: up.mnt, Err: err}
		}
		return snapshots.Usage{
			Size:   int64(st.Blocks-st.Bfree) * st.Bsize,
			Inodes: int64(st.Files - st.Ffree),
		}, nil
	}
	return imageUsage(up.image, "", "")
}

// lstatus is Status in layered mode.
func (s *snapshotter) lstatus(ctx context.Context) (snapadmin.Status, error) {
	st, entries, own, byKey, err := s.statusStart(ctx)
	if err != nil {
		return snapadmin.Status{}, err
	}
	recs, err := s.lrecords(ctx)
	if err != nil {
		return snapadmin.Status{}, err
	}
	for _, e := range entries {
		ss := snapadmin.SnapshotStatus{Key: e.info.Name, ID: e.id, Kind: e.info.Kind.String(), Parent: e.info.Parent, Usage: e.usage.Size}
		k := devKey{e.id, roleLayer}
		switch e.info.Kind {
		case snapshots.KindActive:
			k.role = roleUpper
			if u, err := s.upperUsage(ctx, e.id); err == nil {
				ss.Usage = u.Size
			}
			if fi, err := os.Stat(s.upperOf(e.id).image); err == nil {
				ss.SizeLimit = fi.Size()
			}
		case snapshots.KindView:
			ss.Usage = 0
		case snapshots.KindCommitted:
			ss.Mounted, _ = mountinfo.Mounted(s.layerDir(e.id))
		}
		if d, ok := byKey[k]; ok {
			ss.Device, ss.DiskSeq = d.info.Path, d.info.DiskSeq
		}
		st.Snapshots = append(st.Snapshots, ss)
	}
	for _, d := range own {
		if (d.key.id != "" && recs.needed(d.key)) || d.detachPending() {
			continue
		}
		st.Orphans = append(st.Orphans, snapadmin.DeviceStatus{Device: d.info.Path, DiskSeq: d.info.DiskSeq, BackingFile: d.info.BackingFile, ReadOnly: d.info.ReadOnly})
	}
	sort.Slice(st.Snapshots, func(i, j int) bool { return st.Snapshots[i].Key < st.Snapshots[j].Key })
	s.statusTail(&st)
	return st, nil
}
