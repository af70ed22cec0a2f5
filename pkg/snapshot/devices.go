package snapshot

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// role says how a snapshot image is attached: read-write for an active
// snapshot, read-only for a committed image under views (layered mode adds
// its own roles for uppers and layers).
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

// deviceFields are the log fields naming a device (docs/operations.md).
func deviceFields(rec loopdev.Record, image string) log.Fields {
	return log.Fields{"device": rec.Path, "devnum": rec.Devnum.String(), "diskseq": rec.DiskSeq, "backing_file": image}
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
		return loopdev.Record{}, err // names the image
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
		log.G(ctx).WithFields(deviceFields(rec, image)).Debug("adopted device")
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
		return loopdev.Record{}, err
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
	log.G(ctx).WithFields(deviceFields(rec, image)).Debug("attached device")
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
// not an error: the kernel unbinds it when the holder lets go.
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
		return err // names the image
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
	fields := deviceFields(rec, image)
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
		// The clear may have succeeded and only the flush before it
		// failed (EIO on a full backing filesystem): the device is gone,
		// the data loss is Commit's to report.
		if verr := loopdev.Verify(rec); errors.Is(verr, loopdev.ErrGone) || errors.Is(verr, loopdev.ErrReused) {
			log.G(ctx).WithFields(fields).WithError(err).Warn("device detached; its flush failed")
			return nil
		}
		return err
	}
}

// detachForCommit detaches the read-write device(s) of an active image
// after proving that nothing has a filesystem mounted from them: pkg/loopdev's
// exclusive detach opens the device O_EXCL (a mount, in any mount namespace,
// claims the block device; udev and blkid do not), clears it on that fd, so
// nothing can mount it in between, and waits until the kernel has unbound
// it, so the image is checked and fsynced with no device left on it.
//
// Unpack snapshots could skip that wait: once O_EXCL proved the filesystem
// gone, its writes are in the image file and a cleared device takes no new
// opener, so udev's read-only probe cannot change the image. Measured with
// udevd running (TestCommitUnderUdev) the wait is a few milliseconds, so
// one path serves every snapshot; the exclusivity itself costs microseconds
// and is the only proof that no mount copy still writes the image.
func (d *devices) detachForCommit(ctx context.Context, k devKey, image string) error {
	d.forget(k)
	id, err := backingOf(image)
	if err != nil {
		return err
	}
	infos, err := loopdev.FindByBacking(image, id)
	if err != nil {
		return err // names the image
	}
	for _, info := range infos {
		err := detachUnmounted(ctx, info.Record())
		if err != nil && !errors.Is(err, loopdev.ErrGone) && !errors.Is(err, loopdev.ErrReused) {
			return err
		}
	}
	return nil
}

// mountedGrace is how long Commit retries a device that is still mounted
// somewhere before it reports the holder: long enough for a mount
// namespace that a container start copied while the snapshot was mounted
// (runc init, before it pivots away and drops the copy) to let go, short
// enough not to hold containerd's metadata transaction for seconds
// (containerd 1.6 keeps its bolt write transaction open across the
// backend's Commit, so every other write waits meanwhile; the old 3 s
// retry stalled a concurrent label update 2.7 s).
const mountedGrace = time.Second

// openerGrace bounds the wait for the kernel to unbind a cleared device
// that another opener still holds. The usual opener is udev's probe after
// the applier's unmount, done within well under 100 ms; a longer holder is
// reported instead of waited for.
const openerGrace = time.Second

// settleGrace bounds the retries of a device that is claimed although no
// mount namespace in /proc has it mounted: the kernel is still tearing
// down the last superblock (slow when its final writes fail, on a full
// backing filesystem).
const settleGrace = 5 * time.Second

// detachUnmounted is the exclusive, waiting detach. A device still mounted
// in some mount namespace after mountedGrace, or still open after
// openerGrace, fails with errdefs.ErrFailedPrecondition naming the holder
// found in /proc. Only the unbind wait is bounded by openerGrace; waiting
// for the host-wide loop-control lock is ctx's.
func detachUnmounted(ctx context.Context, rec loopdev.Record) error {
	start := time.Now()
	scanned := false
	for {
		err := loopdev.DetachRecord(ctx, rec, loopdev.DetachOptions{Exclusive: true})
		if errors.Is(err, loopdev.ErrDetachDeferred) {
			return awaitUnbind(ctx, rec)
		}
		if !errors.Is(err, loopdev.ErrInUse) {
			return err
		}
		// One /proc scan after mountedGrace: a mount found is reported at
		// once; none found means a teardown in progress, retried until
		// settleGrace.
		if waited := time.Since(start); waited >= settleGrace || (!scanned && waited >= mountedGrace) {
			scanned = true
			if holders := findHolders(rec.Devnum, "", false); len(holders) > 0 || waited >= settleGrace {
				return fmt.Errorf("snapshot device %s is still mounted (%s): %w", rec.Path, describeHolders(holders), errdefs.ErrFailedPrecondition)
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// awaitUnbind waits, reading sysfs only (an open would delay the unbind),
// until the cleared device rec is unbound or carries another attachment.
func awaitUnbind(ctx context.Context, rec loopdev.Record) error {
	deadline := time.Now().Add(openerGrace)
	dir := rec.Devnum.SysfsDir()
	for {
		_, berr := os.Stat(dir + "/loop/backing_file")
		seq, serr := os.ReadFile(dir + "/diskseq")
		if errors.Is(berr, os.ErrNotExist) || (serr == nil && rec.DiskSeq != 0 && strings.TrimSpace(string(seq)) != strconv.FormatUint(rec.DiskSeq, 10)) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("snapshot device %s is still open after %v (%s): %w", rec.Path, openerGrace,
				describeHolders(findHolders(rec.Devnum, rec.Path, true)), errdefs.ErrFailedPrecondition)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}
