package loopdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// defaultTeardownTimeout bounds Detach and Close, which take no context.
const defaultTeardownTimeout = 60 * time.Second

// Detach is the full locked teardown of an owned device (spec 8.1). It
// returns nil when the device was cleared and removed, an error matching
// ErrDetachDeferred when a mount or another opener still holds it (the
// kernel unbinds it at the last close), and ErrNotOwned for a handle that is
// not owned (opened or relinquished: see Unrelinquish). On the
// block-device shortcut it equals Close. The handle is
// unusable afterwards, whatever the result.
func (d *Device) Detach() error {
	ctx, cancel := context.WithTimeout(context.Background(), defaultTeardownTimeout)
	defer cancel()
	return d.DetachContext(ctx)
}

// DetachContext is Detach with a caller's deadline.
func (d *Device) DetachContext(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("detach %s: %w", d.path, os.ErrClosed)
	}
	if d.shortcut {
		return d.closeLocked()
	}
	if !d.owned {
		return fmt.Errorf("detach %s: %w", d.path, ErrNotOwned)
	}
	// Lock order: the device lock fd goes first (and LOOP_CLR_FD must not see
	// it as an extra opener), then the control lock.
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
	ctl, err := openControl(ctx)
	if err != nil {
		// Without the control lock we still must not leak: fall back to a
		// plain close, which autoclear turns into a detach.
		return errors.Join(fmt.Errorf("detach %s: %w", d.path, err), d.closeLocked())
	}
	defer ctl.Close()
	return d.teardownLocked(ctx, ctl)
}

// teardownLocked runs spec 8.1 steps 3-8 with the control lock held by ctl.
func (d *Device) teardownLocked(ctx context.Context, ctl *ofd) error {
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
	d.uevents.Close()
	d.closed = true
	f := d.file
	var errs []error
	// In-flight I/O at LOOP_CLR_FD can be lost: sync first, always.
	if err := d.flush(); err != nil {
		errs = append(errs, err)
	}
	// Lock the main fd itself, not a new OFD: the lock lasts through the
	// clear without adding an opener.
	if err := flockPoll(ctx, int(f.Fd()), unix.LOCK_EX, false); err != nil {
		errs = append(errs, fmt.Errorf("lock %s: %w", d.path, err))
	}
	if _, err := deletePartitions(f, d.devnum); err != nil && !errors.Is(err, unix.ENODEV) {
		errs = append(errs, fmt.Errorf("delete partitions: %w", err))
	}
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && err != unix.ENXIO {
		errs = append(errs, fmt.Errorf("LOOP_CLR_FD %s: %w", d.path, err))
		f.Close()
		return fmt.Errorf("detach %s: %w", d.path, errors.Join(errs...))
	}
	f.Close()
	// From 6.11 LOOP_CLR_FD only marks autoclear; the unbind happens at the
	// last close. Still bound with our diskseq now means someone holds it.
	if d.stillBound() {
		log.G(ctx).WithFields(log.Fields{"device": d.path, "diskseq": d.diskseq}).Debug("loop detach deferred: device still open")
		errs = append(errs, ErrDetachDeferred)
		return fmt.Errorf("detach %s: %w", d.path, errors.Join(errs...))
	}
	if d.remove {
		if err := removeDevice(ctx, ctl, d.nr, d.devnum); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("detach %s: %w", d.path, errors.Join(errs...))
	}
	log.G(ctx).WithFields(log.Fields{"device": d.path, "diskseq": d.diskseq}).Debug("loop device detached")
	return nil
}

// stillBound reports whether the device still carries this attachment.
func (d *Device) stillBound() bool {
	if _, err := os.Stat(d.devnum.SysfsDir() + "/loop/backing_file"); err != nil {
		return false
	}
	if d.diskseq == 0 {
		return true
	}
	seq, err := readAttrUint(d.devnum.SysfsDir() + "/diskseq")
	return err == nil && seq == d.diskseq
}

// removeDevice deletes /dev/loopN after the clear, retrying EBUSY (udev or
// blkid may still hold it): 39 calls, 5 ms doubling every 5th (≈5.7 s).
func removeDevice(ctx context.Context, ctl *ofd, nr int, devnum Devnum) error {
	delay := 5 * time.Millisecond
	for i := 1; ; i++ {
		err := unix.IoctlSetInt(int(ctl.Fd()), unix.LOOP_CTL_REMOVE, nr)
		if err == nil || err == unix.ENODEV {
			return nil
		}
		if err != unix.EBUSY {
			return fmt.Errorf("LOOP_CTL_REMOVE loop%d: %w", nr, err)
		}
		// A non-cooperating tool bound the free number again: not ours to remove.
		if _, serr := os.Stat(devnum.SysfsDir() + "/loop/backing_file"); serr == nil {
			return nil
		}
		if i >= 39 {
			return fmt.Errorf("LOOP_CTL_REMOVE loop%d: %w", nr, ErrRemoveBusy)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("LOOP_CTL_REMOVE loop%d: %w", nr, ctx.Err())
		case <-t.C:
		}
		if i%5 == 0 {
			delay *= 2
		}
	}
}

// Close releases the handle without detaching (spec 8.2): fsync, close every
// fd. With AUTOCLEAR set and no other opener the kernel unbinds now; with a
// mount it unbinds at unmount; a kept device stays bound.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	return d.closeLocked()
}

func (d *Device) closeLocked() error {
	d.closed = true
	var errs []error
	if err := d.file.Sync(); err != nil && !errors.Is(err, unix.EINVAL) {
		errs = append(errs, fmt.Errorf("fsync %s: %w", d.path, err))
	}
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
	d.uevents.Close()
	if err := d.file.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close %s: %w", d.path, err))
	}
	return errors.Join(errs...)
}

// DetachAndWait detaches and, if the kernel deferred the unbind, polls until
// the device is unbound or ctx is done; then it names the holders.
func (d *Device) DetachAndWait(ctx context.Context) error {
	rec := d.Record()
	err := d.DetachContext(ctx)
	if !errors.Is(err, ErrDetachDeferred) {
		return err
	}
	return awaitUnbind(ctx, rec)
}

// awaitUnbind polls sysfs (no open: an open would itself hold the device)
// until the attachment rec names is unbound, after a deferred detach.
func awaitUnbind(ctx context.Context, rec Record) error {
	for (&Device{devnum: rec.Devnum, diskseq: rec.DiskSeq}).stillBound() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("detach %s: still held by %v: %w", rec.Path, holders(rec.Devnum), errors.Join(ErrDetachDeferred, ctx.Err()))
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

// holders lists who pins a device: mounts of it and sysfs holders.
func holders(devnum Devnum) []string {
	var out []string
	if ents, err := os.ReadDir(devnum.SysfsDir() + "/holders"); err == nil {
		for _, e := range ents {
			out = append(out, e.Name())
		}
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && f[2] == devnum.String() {
				out = append(out, "mount "+f[4])
			}
		}
	}
	return out
}
