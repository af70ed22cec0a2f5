package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// role says how a snapshot image is attached: read-write for an active
// snapshot, read-only for a committed image under views. Overlay mode will
// add more roles (spec §3).
type role string

const (
	roleRW role = "rw"
	roleRO role = "ro"
)

// devKey names one device of one snapshot image.
type devKey struct {
	id   string
	role role
}

// devices tracks the loop devices attached to snapshot images. The kernel
// (sysfs and the backing dev/ino) is the source of truth; recs only caches
// what Mounts returned last, re-verified by diskseq on every use.
type devices struct {
	tagPrefix  string
	directIO   *bool
	requireDIO bool
	m          *metrics

	mu    sync.Mutex
	locks map[devKey]*keyLock
	recs  map[devKey]loopdev.Record
}

type keyLock struct {
	mu   sync.Mutex
	refs int
}

func newDevices(root string, directIO *bool, m *metrics) *devices {
	sum := sha256.Sum256([]byte(root))
	return &devices{
		m:          m,
		requireDIO: directIO != nil && *directIO,
		// lo_file_name holds 63 bytes: "loopsnap:<8 hex>:" + id + ":" + role.
		tagPrefix: "loopsnap:" + hex.EncodeToString(sum[:4]) + ":",
		directIO:  directIO,
		locks:     map[devKey]*keyLock{},
		recs:      map[devKey]loopdev.Record{},
	}
}

func (d *devices) tag(k devKey) string {
	return d.tagPrefix + k.id + ":" + string(k.role)
}

// lock serialises attach, detach and the liveness checks around them for
// one device key. Lock order: device key, then a metadata transaction.
func (d *devices) lock(k devKey) func() {
	d.mu.Lock()
	l := d.locks[k]
	if l == nil {
		l = &keyLock{}
		d.locks[k] = l
	}
	l.refs++
	d.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		d.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(d.locks, k)
		}
		d.mu.Unlock()
	}
}

func backingOf(path string) (loopdev.BackingID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return loopdev.BackingID{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return loopdev.BackingID{Dev: st.Dev, Ino: st.Ino}, nil
}

// ensure returns a device for image attached in k's role: the cached one if
// the kernel still has that exact attachment, else an existing binding of
// the image (adopted after a restart), else a new attachment.
func (d *devices) ensure(ctx context.Context, k devKey, image string) (loopdev.Record, error) {
	unlock := d.lock(k)
	defer unlock()
	return d.ensureLocked(ctx, k, image)
}

func (d *devices) ensureLocked(ctx context.Context, k devKey, image string) (loopdev.Record, error) {
	if rec, ok := d.cached(k); ok {
		if err := loopdev.Verify(rec); err == nil {
			return rec, nil
		}
		d.forget(k)
	}
	id, err := backingOf(image)
	if err != nil {
		return loopdev.Record{}, err
	}
	infos, err := loopdev.FindByBacking(image, id)
	if err != nil {
		return loopdev.Record{}, fmt.Errorf("find devices of %s: %w", image, err)
	}
	for _, info := range infos {
		if info.Offset != 0 || info.ReadOnly != (k.role.readOnly()) {
			continue
		}
		rec := info.Record()
		if info.Autoclear {
			if err := clearAutoclear(ctx, rec); err != nil {
				log.G(ctx).WithError(err).WithField("device", info.Path).Warn("adopt device: clear autoclear")
				continue
			}
		}
		d.remember(k, rec)
		log.G(ctx).WithFields(log.Fields{"device": rec.Path, "diskseq": rec.DiskSeq, "backing_file": image}).Debug("adopted device")
		return rec, nil
	}
	access := loopdev.AccessReadWrite
	if k.role.readOnly() {
		access = loopdev.AccessReadOnly
	}
	dev, err := loopdev.Attach(ctx, image, loopdev.Options{
		Access:     access,
		SectorSize: blockSize,
		DirectIO:   d.directIO,
		Keep:       true, // no autoclear: the device must outlive our process
		// Skip the queue-freezing SET_STATUS64 (~20 ms per attach); a crash
		// inside Attach leaves a tagged device that reconciliation sweeps.
		KeepFromStart: true,
		FileName:      d.tag(k),
	})
	if err != nil {
		return loopdev.Record{}, fmt.Errorf("attach %s: %w", image, err)
	}
	rec := dev.Record()
	if d.requireDIO && !dev.DirectIO() {
		// direct_io = "on": the backing filesystem refused O_DIRECT and
		// pkg/loopdev fell back to buffered I/O.
		dev.Close()
		derr := d.detachRecord(ctx, rec, image)
		return loopdev.Record{}, errors.Join(fmt.Errorf("attach %s: direct I/O unavailable on the backing filesystem (direct_io = \"on\"): %w", image, errdefs.ErrFailedPrecondition), derr)
	}
	if err := dev.Close(); err != nil {
		log.G(ctx).WithError(err).WithField("device", rec.Path).Warn("close attached device")
	}
	d.remember(k, rec)
	log.G(ctx).WithFields(log.Fields{"device": rec.Path, "diskseq": rec.DiskSeq, "backing_file": image}).Debug("attached device")
	return rec, nil
}

func clearAutoclear(ctx context.Context, rec loopdev.Record) error {
	dev, err := loopdev.Open(ctx, rec.Path, loopdev.OpenOptions{ExpectDiskSeq: rec.DiskSeq, ExpectBacking: &rec.Backing})
	if err != nil {
		return err
	}
	defer dev.Close()
	// An opened handle is not owned; SetAutoclear is a no-op until we take
	// ownership. Close never detaches, so ownership ends with the handle.
	if err := dev.Unrelinquish(); err != nil {
		return err
	}
	_, err = dev.SetAutoclear(false)
	return err
}

func (d *devices) cached(k devKey) (loopdev.Record, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	rec, ok := d.recs[k]
	return rec, ok
}

func (d *devices) remember(k devKey, rec loopdev.Record) {
	d.mu.Lock()
	d.recs[k] = rec
	d.mu.Unlock()
}

func (d *devices) forget(k devKey) {
	d.mu.Lock()
	delete(d.recs, k)
	d.mu.Unlock()
}

// detachImage detaches every binding of image. A device still held (a
// mount) is cleared lazily and vanishes at its last close; that is logged,
// not an error (spec §8).
func (d *devices) detachImage(ctx context.Context, image string, keys ...devKey) error {
	for _, k := range keys {
		d.forget(k)
	}
	id, err := backingOf(image)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	infos, err := loopdev.FindByBacking(image, id)
	if err != nil {
		return fmt.Errorf("find devices of %s: %w", image, err)
	}
	var errs []error
	for _, info := range infos {
		if err := d.detachRecord(ctx, info.Record(), image); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// detachRecord detaches rec. A device still held is cleared lazily (it
// vanishes at its last close): that is counted and logged, not an error.
func (d *devices) detachRecord(ctx context.Context, rec loopdev.Record, image string) error {
	fields := log.Fields{"device": rec.Path, "diskseq": rec.DiskSeq, "backing_file": image}
	err := loopdev.DetachRecord(ctx, rec, loopdev.DetachOptions{})
	switch {
	case err == nil:
		log.G(ctx).WithFields(fields).Debug("detached device")
		return nil
	case errors.Is(err, loopdev.ErrGone), errors.Is(err, loopdev.ErrReused):
		return nil
	case errors.Is(err, loopdev.ErrDetachDeferred):
		d.m.lazyDetaches.Add(1)
		log.G(ctx).WithFields(fields).Info("device still open: detach deferred to its last close")
		return nil
	default:
		return fmt.Errorf("detach %s: %w", rec.Path, err)
	}
}

// detachForCommit detaches the read-write device(s) of an active image
// after proving that nothing has a filesystem mounted from them: pkg/loopdev's
// exclusive detach opens the device O_EXCL (a mount claims the block device;
// udev and blkid do not), clears it on that fd, and waits until the kernel
// has unbound it, so the image is checked and fsynced with no device page
// cache left.
func (d *devices) detachForCommit(ctx context.Context, k devKey, image string) error {
	d.forget(k)
	id, err := backingOf(image)
	if err != nil {
		return err
	}
	infos, err := loopdev.FindByBacking(image, id)
	if err != nil {
		return fmt.Errorf("find devices of %s: %w", image, err)
	}
	for _, info := range infos {
		err := detachUnmounted(ctx, info.Record())
		if err != nil && !errors.Is(err, loopdev.ErrGone) && !errors.Is(err, loopdev.ErrReused) {
			return err
		}
	}
	return nil
}

// busyGrace bounds how long Commit waits for a device to stop being busy.
// A mount namespace created elsewhere (clone(CLONE_NEWNS) while the
// snapshot was mounted, e.g. a container starting) holds a copy of the
// mount, and so the device, until it pivots away and detaches the copy.
const busyGrace = 3 * time.Second

// unbindGrace bounds the wait for the kernel to unbind a cleared device
// that another opener still holds.
const unbindGrace = 10 * time.Second

// detachUnmounted is the exclusive, waiting detach, retried while the
// device is still mounted somewhere for up to busyGrace.
func detachUnmounted(ctx context.Context, rec loopdev.Record) error {
	deadline := time.Now().Add(busyGrace)
	opts := loopdev.DetachOptions{Exclusive: true, Wait: true}
	for {
		wctx, cancel := context.WithTimeout(ctx, unbindGrace)
		err := loopdev.DetachRecord(wctx, rec, opts)
		cancel()
		if errors.Is(err, loopdev.ErrDetachDeferred) && ctx.Err() == nil {
			return fmt.Errorf("detach %s: still bound after 10s: %v: %w", rec.Path, err, errdefs.ErrUnavailable)
		}
		if !errors.Is(err, loopdev.ErrInUse) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("snapshot device %s is still mounted: %w", rec.Path, errdefs.ErrFailedPrecondition)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
