package hook

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// Teardown releases what setup recorded for the container in st. It is
// idempotent: no record, a device already gone or reused by somebody else
// are all success. Only an unreadable or corrupt record is an error
// (ErrInvalid), and it is left in place for inspection.
func (h *Hook) Teardown(ctx context.Context, st *State) error {
	start := time.Now()
	log := h.entry(st, "teardown")
	ctx = withLog(ctx, log)
	if st.Status != StatusStopped {
		log.WithField("status", st.Status).Info("teardown called with a status other than stopped")
	}
	sess, err := h.lockContainer(ctx, st)
	if err != nil {
		return err
	}
	defer sess.unlock(log)
	if err := h.teardownLocked(ctx, sess, st.ID, log); err != nil {
		return err
	}
	log.WithField("duration", time.Since(start).String()).Info("teardown done")
	return nil
}

// session is the state directory with one container's lock held.
type session struct {
	store *Store
	lock  *Lock
	name  string
}

// lockContainer opens the state directory and takes the lock of the
// container's key (id and bundle), as setup and teardown both start.
func (h *Hook) lockContainer(ctx context.Context, st *State) (*session, error) {
	store, err := OpenStore(h.cfg.StateDir)
	if err != nil {
		return nil, err
	}
	name := StateName(st.ID, st.Bundle)
	lock, err := store.Lock(ctx, name)
	if err != nil {
		store.Close()
		return nil, err
	}
	return &session{store: store, lock: lock, name: name}, nil
}

// unlock releases the lock (removing the lock file when no record is left)
// and closes the state directory.
func (s *session) unlock(log *logrus.Entry) {
	if err := s.lock.Unlock(); err != nil {
		log.WithError(err).Warn("unlock state")
	}
	s.store.Close()
}

// teardownLocked does the guarded detach of every device in the record of
// the session's key and removes the record; the caller holds the lock.
func (h *Hook) teardownLocked(ctx context.Context, sess *session, id string, log *logrus.Entry) error {
	rec, err := sess.store.Read(sess.name)
	if err != nil {
		return err
	}
	if rec == nil {
		log.Debug("no state: nothing to do")
		return nil
	}
	if rec.ID != id && id != "" {
		return invalidf("state file %s/%s.json belongs to container %s", sess.store.Dir(), sess.name, DisplayID(rec.ID))
	}
	for _, m := range rec.Mounts {
		h.releaseMount(ctx, m, log)
	}
	if err := sess.store.Remove(sess.name); err != nil {
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
	err := loopdev.DetachRecord(ctx, rec, loopdev.DetachOptions{Logger: slogFrom(withLog(ctx, l))})
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
	ctx = withLog(ctx, log)
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
		sess := &session{store: store, lock: lock, name: name}
		func() {
			defer func() {
				if err := lock.Unlock(); err != nil {
					log.WithError(err).Warn("unlock state")
				}
			}()
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
			if err := h.teardownLocked(ctx, sess, rec.ID, l); err != nil {
				l.WithError(err).Warn("gc teardown")
				res.Corrupt = append(res.Corrupt, name)
				return
			}
			res.Removed = append(res.Removed, name)
		}()
	}
	// Lock files without a record (left by a hook killed between lock and
	// unlock, or by an older version that never removed them): Unlock of a
	// free lock removes the file.
	locks, err := store.LockNames()
	if err != nil {
		return res, err
	}
	for _, name := range locks {
		if store.hasRecord(name) {
			continue
		}
		lock, ok, err := store.TryLock(name)
		if err != nil {
			return res, err
		}
		if ok {
			if err := lock.Unlock(); err != nil {
				log.WithError(err).Warn("remove stale lock")
			}
		}
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
