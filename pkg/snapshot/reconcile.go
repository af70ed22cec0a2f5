package snapshot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// ownDevice is a loop device whose backing file lies under root.
type ownDevice struct {
	info  loopdev.Info
	image string // backing path under root, " (deleted)" stripped
	key   devKey // zero unless the backing is snapshots/<id>/image
	gone  bool   // backing file deleted
}

// detachPending reports a device already cleared (ours never have
// autoclear set otherwise: they are attached to outlive the process) that
// unbinds at its last close: not an orphan, nothing left to detach. sysfs
// lists it until then, an open would fail.
func (d ownDevice) detachPending() bool { return d.info.Autoclear }

// ownDevices lists the loop devices backed by files under root. sysfs
// backing_file is the path at attach time as renamed since; the device is
// ours only if that path is under root. loopdev.List reads sysfs only:
// status and metrics scrapes open no device (an open of another owner's
// device would turn its detach lazy).
func (s *snapshotter) ownDevices() ([]ownDevice, error) {
	under := func(p string) (string, bool) {
		rel, err := filepath.Rel(s.root, p)
		return rel, err == nil && rel != "." && !strings.HasPrefix(rel, "..")
	}
	infos, err := loopdev.List(func(i loopdev.Info) (skip, stop bool) {
		_, ok := under(i.BackingFile)
		return !ok, false
	})
	if err != nil {
		return nil, fmt.Errorf("list loop devices: %w", err)
	}
	out := make([]ownDevice, 0, len(infos))
	for _, info := range infos {
		rel, _ := under(info.BackingFile)
		d := ownDevice{info: info, image: info.BackingFile, gone: info.Deleted}
		if parts := strings.Split(rel, "/"); len(parts) == 3 && parts[0] == "snapshots" && parts[2] == "image" && !info.Deleted {
			r := roleRW
			if info.ReadOnly {
				r = roleRO
			}
			d.key = devKey{parts[1], r}
		} else if !info.Deleted && s.layered() {
			d.key = layeredKey(rel, info.ReadOnly)
		}
		out = append(out, d)
	}
	return out, nil
}

// reconcile runs at startup, before serving: staging leftovers of a crash
// go to trash (nothing is in flight yet), devices of live snapshots are
// adopted (autoclear cleared), the others are detached, and with
// attach_on_start = "eager" missing devices are attached.
func (s *snapshotter) reconcile(ctx context.Context) error {
	if s.layered() {
		return s.lreconcile(ctx)
	}
	staging := filepath.Join(s.root, "staging")
	entries, err := os.ReadDir(staging)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := s.toTrash(filepath.Join(staging, e.Name()), "staging"); err != nil {
			return err
		}
	}
	needed, _, err := s.liveDevices(ctx)
	if err != nil {
		return err
	}
	own, err := s.ownDevices()
	if err != nil {
		return err
	}
	adopted := map[devKey]bool{}
	for _, d := range own {
		rec := d.info.Record()
		if d.key.id != "" && needed[d.key] && !adopted[d.key] && d.info.Offset == 0 {
			if d.info.Autoclear {
				if err := clearAutoclear(ctx, rec); err != nil {
					log.G(ctx).WithError(err).WithField("device", d.info.Path).Warn("adopt device: clear autoclear")
					continue
				}
			}
			adopted[d.key] = true
			s.devs.remember(d.key, rec)
			log.G(ctx).WithFields(deviceFields(d.info.Record(), d.image)).Info("adopted device")
			continue
		}
		// Not needed, or a second binding of a needed image: nothing is
		// served yet, so no snapshot can claim it meanwhile.
		if err := s.detachOrphanDevice(ctx, d); err != nil {
			log.G(ctx).WithError(err).WithField("device", d.info.Path).Warn("detach orphan device")
		}
	}
	if s.cfg.AttachOnStart == "eager" {
		for k := range needed {
			if adopted[k] {
				continue
			}
			if _, err := s.devs.ensure(ctx, k, s.imagePath(k.id)); err != nil {
				log.G(ctx).WithError(err).WithField("id", k.id).Warn("attach on start")
			}
		}
	}
	return nil
}

// Cleanup deletes what Remove and crashes left: images in trash, staging
// directories older than cleanup_grace, snapshot directories with no
// record, and loop devices on images under root that no live snapshot
// needs.
func (s *snapshotter) Cleanup(ctx context.Context) error {
	if s.layered() {
		return s.lcleanup(ctx)
	}
	var errs []error
	s.cleanupMu.Lock()
	needed, ids, err := s.liveDevices(ctx)
	if err != nil {
		s.cleanupMu.Unlock()
		return err
	}
	entries, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
	if err != nil {
		errs = append(errs, err)
	}
	for _, e := range entries {
		if _, ok := ids[e.Name()]; !ok {
			if err := s.toTrash(filepath.Join(s.root, "snapshots", e.Name()), e.Name()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	grace := time.Duration(s.cfg.CleanupGrace)
	entries, _ = os.ReadDir(filepath.Join(s.root, "staging"))
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) >= grace {
			if err := s.toTrash(filepath.Join(s.root, "staging", e.Name()), "staging"); err != nil {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, s.pruneTemplates())
	s.cleanupMu.Unlock()

	own, err := s.ownDevices()
	if err != nil {
		errs = append(errs, err)
	}
	for _, d := range own {
		if (d.key.id != "" && needed[d.key]) || d.detachPending() {
			continue
		}
		if err := s.detachOrphan(ctx, d); err != nil {
			errs = append(errs, err)
		}
	}

	entries, _ = os.ReadDir(filepath.Join(s.root, "trash"))
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(s.root, "trash", e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// pruneTemplates removes the empty-image templates (flat images, layered
// uppers) of sizes other than default_size: there is one per distinct size
// a Prepare asked for. The caller holds cleanupMu, so no clone reads a template meanwhile;
// the default_size one keeps the next plain Prepare from running mkfs.
func (s *snapshotter) pruneTemplates() error {
	s.tmplMu.Lock()
	defer s.tmplMu.Unlock()
	dir := filepath.Join(s.root, "templates")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, prefix := range []string{"ext4-", "upper-"} {
		keep[filepath.Base(s.templatePath(prefix, int64(s.cfg.DefaultSize)))] = true
	}
	var errs []error
	for _, e := range entries {
		if keep[e.Name()] {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// detachOrphan detaches d unless, under its device lock, a snapshot created
// meanwhile turns out to need it.
func (s *snapshotter) detachOrphan(ctx context.Context, d ownDevice) error {
	if d.key.id != "" {
		unlock := s.devs.lock(d.key)
		defer unlock()
		needed, _, err := s.liveDevices(ctx)
		if err != nil {
			return err
		}
		if needed[d.key] {
			return nil
		}
		s.devs.forget(d.key)
	}
	return s.detachOrphanDevice(ctx, d)
}

func (s *snapshotter) detachOrphanDevice(ctx context.Context, d ownDevice) error {
	log.G(ctx).WithFields(deviceFields(d.info.Record(), d.info.BackingFile)).Info("detaching orphan device")
	if err := s.devs.detachRecord(ctx, d.info.Record(), d.image); err != nil {
		return err
	}
	s.m.orphansDetached.Add(1)
	return nil
}

// Purge detaches every loop device backed by a file under root. Tests call
// it before Close so that a conformance-suite run leaves no device behind;
// the daemon never does (running containers keep their devices).
func (s *snapshotter) Purge(ctx context.Context) error {
	if s.layered() {
		// Uppers first: their overlays' lowers are the layer mounts.
		unmountUnder(filepath.Join(s.root, "u"))
		unmountUnder(filepath.Join(s.root, "l"))
	}
	own, err := s.ownDevices()
	if err != nil {
		return err
	}
	// Bounded: a holder that never lets go must not hang the caller.
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var errs []error
	for _, d := range own {
		if d.key.id != "" {
			s.devs.forget(d.key)
		}
		// Wait: a lister (or a leftover mount) may hold it; callers see the
		// device gone when Purge returns (or ctx ends).
		err := loopdev.DetachRecord(ctx, d.info.Record(), loopdev.DetachOptions{Wait: true})
		if err != nil && !errors.Is(err, loopdev.ErrGone) && !errors.Is(err, loopdev.ErrReused) {
			errs = append(errs, err) // loopdev names the device
		}
	}
	return errors.Join(errs...)
}
