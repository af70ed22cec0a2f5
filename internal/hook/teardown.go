package hook

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// Teardown releases what setup recorded for the container in st (oci-hook-spec
// section 7.8). It is idempotent: no record, a device already gone or reused
// by somebody else are all success. Only an unreadable or corrupt record is
// an error (ErrInvalid), and it is left in place for inspection.
func (h *Hook) Teardown(ctx context.Context, st *State) error {
	start := time.Now()
	log := h.entry(st, "teardown")
	if st.Status != StatusStopped {
		log.WithField("status", st.Status).Info("teardown called with a status other than stopped")
	}
	store, err := OpenStore(h.cfg.StateDir)
	if err != nil {
		return err
	}
	defer store.Close()
	name := StateName(st.ID)
	lock, err := store.Lock(ctx, name)
	if err != nil {
		return err
	}
	defer lock.Unlock()
	if err := h.teardownLocked(ctx, store, name, st.ID, log); err != nil {
		return err
	}
	log.WithField("duration", time.Since(start).String()).Info("teardown done")
	return nil
}

// teardownLocked does the guarded detach of every device in the record of
// name and removes the record; the caller holds the container lock.
func (h *Hook) teardownLocked(ctx context.Context, store *Store, name, id string, log *logrus.Entry) error {
	rec, err := store.Read(name)
	if err != nil {
		return err
	}
	if rec == nil {
		log.Debug("no state: nothing to do")
		return nil
	}
	if rec.ID != id && id != "" {
		return invalidf("state file %s/%s.json belongs to container %s", store.Dir(), name, DisplayID(rec.ID))
	}
	for _, m := range rec.Mounts {
		h.releaseMount(ctx, m, log)
	}
	if err := store.Remove(name); err != nil {
		return err
	}
	log.WithField("mounts", len(rec.Mounts)).Info("state removed")
	return nil
}

// releaseMount detaches one recorded device only if it is still the binding
// we made: pkg/loopdev opens it by name, compares devnum and diskseq (and
// the backing identity), and clears it on that same fd.
func (h *Hook) releaseMount(ctx context.Context, m MountRecord, log *logrus.Entry) {
	rec := m.LoopRecord()
	l := log.WithFields(logrus.Fields{
		"device": rec.Path, "devnum": rec.Devnum.String(), "diskseq": rec.DiskSeq,
		"backing_file": m.ImagePath, "dest": m.Dest,
	})
	err := loopdev.DetachRecord(ctx, rec, loopdev.DetachOptions{})
	switch {
	case err == nil:
		l.Info("detached")
	case errors.Is(err, loopdev.ErrGone):
		l.Info("already detached")
	case errors.Is(err, loopdev.ErrReused):
		l.Info("reused: left alone")
	case errors.Is(err, loopdev.ErrDetachDeferred):
		l.Info("detach deferred: still in use, autoclear will release it")
	default:
		l.WithError(err).Warn("detach failed; autoclear will release the device when its holders go")
	}
}

// GCResult lists what gc did.
type GCResult struct {
	Removed []string // names whose records were torn down
	Live    []string // records of containers still running
	Busy    []string // records locked by a running setup/teardown
	Corrupt []string // unreadable records, left in place
}

// GC tears down the records of containers whose init process is gone (or
// whose pid now belongs to a process with another start time). Records held
// by a running hook and records of live containers are left alone.
func (h *Hook) GC(ctx context.Context) (GCResult, error) {
	var res GCResult
	log := h.log.WithField("step", "gc")
	store, err := OpenStore(h.cfg.StateDir)
	if err != nil {
		return res, err
	}
	defer store.Close()
	names, err := store.Names()
	if err != nil {
		return res, err
	}
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		lock, ok, err := store.TryLock(name)
		if err != nil {
			return res, err
		}
		if !ok {
			res.Busy = append(res.Busy, name)
			continue
		}
		func() {
			defer lock.Unlock()
			rec, err := store.Read(name)
			if err != nil {
				log.WithError(err).Warn("corrupt record left in place")
				res.Corrupt = append(res.Corrupt, name)
				return
			}
			if rec == nil {
				return
			}
			if alive(rec) {
				res.Live = append(res.Live, name)
				return
			}
			l := log.WithField("container_id", rec.ID)
			if err := h.teardownLocked(ctx, store, name, rec.ID, l); err != nil {
				l.WithError(err).Warn("gc teardown")
				res.Corrupt = append(res.Corrupt, name)
				return
			}
			res.Removed = append(res.Removed, name)
		}()
	}
	return res, nil
}

// alive reports whether the record's init process still exists with the
// recorded start time.
func alive(rec *Record) bool {
	if rec.InitPid <= 0 {
		return false
	}
	start, err := ProcessStartTime(rec.InitPid)
	if err != nil {
		return !errors.Is(err, os.ErrNotExist)
	}
	return start == rec.InitStartTime
}
