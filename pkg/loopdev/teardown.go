package loopdev

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/mountinfo"
	"golang.org/x/sys/unix"
)

// DetachOptions select the variants of a teardown, for DetachWith and
// DetachRecord. The zero value is the plain full teardown.
type DetachOptions struct {
	// Wait, after a deferred detach (a mount or another opener still holds
	// the device), polls sysfs until the kernel has unbound it or ctx ends.
	// The error then names the holders.
	Wait bool
	// Exclusive opens the device O_EXCL first: while a filesystem is mounted
	// from it (a mount claims the block device) the detach fails with
	// ErrInUse and touches nothing. The clear is issued on that exclusive fd,
	// so nothing can mount the device in between.
	Exclusive bool
	// RemoveDevice deletes /dev/loopN with LOOP_CTL_REMOVE after the clear,
	// as systemd does. A device attached with Options.RemoveDevice is removed
	// either way.
	RemoveDevice bool
	// Logger receives debug records of the teardown; nil uses the logger the
	// handle was made with (none by default).
	Logger *slog.Logger
}

// Detach is the full teardown of an owned device: flush, lock, delete
// partitions, LOOP_CLR_FD, and LOOP_CTL_REMOVE if the device was attached
// with Options.RemoveDevice. It returns nil when the device was cleared, an
// error matching ErrDetachDeferred when a mount or another opener still
// holds it (the kernel unbinds it at the last close), and ErrNotOwned for a
// handle that is not owned (opened or relinquished: see Unrelinquish). On
// the block-device shortcut it equals Close. Every wait ends with ctx. The
// handle is unusable afterwards, whatever the result.
func (d *Device) Detach(ctx context.Context) error {
	return d.DetachWith(ctx, DetachOptions{})
}

// DetachWith is Detach with the variants of opts. With opts.Exclusive, an
// ErrInUse result leaves the handle open and usable.
func (d *Device) DetachWith(ctx context.Context, opts DetachOptions) error {
	err := d.detach(ctx, opts)
	if opts.Wait && errors.Is(err, ErrDetachDeferred) {
		return d.awaitUnbind(ctx)
	}
	return err
}

func (d *Device) detach(ctx context.Context, opts DetachOptions) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("detach %s: %w", d.path, os.ErrClosed)
	}
	if d.shortcut {
		return d.closeLocked()
	}
	if !d.owned {
		// Not ours to clear, but the handle is released all the same: its
		// fds would make the owner's detach lazy, and its lock keeps udev out.
		return errors.Join(fmt.Errorf("detach %s: %w", d.path, ErrNotOwned), d.closeLocked())
	}
	if opts.Logger != nil {
		d.log = opts.Logger
	}
	d.remove = d.remove || opts.RemoveDevice
	if opts.Exclusive {
		// A new OFD opened O_EXCL: EBUSY means a mount (or another exclusive
		// opener) claims the device. Our own non-exclusive fds do not count.
		ex, err := reopen(d.file, openBase|unix.O_RDONLY|unix.O_EXCL)
		if err != nil {
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("detach %s: %w", d.path, ErrInUse)
			}
			return fmt.Errorf("detach %s: %w", d.path, err)
		}
		// The exclusive fd becomes the main fd and the clear is issued on
		// it, so nothing can mount the device in between. fsync flushes the
		// device's page cache whichever fd it is issued on.
		d.file.Close()
		d.file = ex
	}
	return d.teardownLocked(ctx)
}

// teardownLocked clears the device with d.mu held. It takes no control lock
// while it waits for the device lock: a prober holding LOCK_SH on the device
// would otherwise stall every cooperating Attach on the host, and an
// allocator that holds a device lock while it waits for the control lock
// would deadlock against it. The device lock, held on the main fd until the
// close, is what protects the clear: an allocator handed this number by
// LOOP_CTL_GET_FREE blocks on it and then re-checks that the device is
// unbound. Only LOOP_CTL_REMOVE needs the control lock, taken after the
// close (as systemd's loop_device_free removes after closing).
func (d *Device) teardownLocked(ctx context.Context) error {
	if d.lock != nil {
		// The lock OFD goes first: LOOP_CLR_FD must not see it as an
		// extra opener, or the clear degrades into a lazy autoclear.
		d.lock.Close()
		d.lock = nil
	}
	d.uevents.Close()
	d.closed = true
	f := d.file
	log := d.logger()
	var errs []error
	// In-flight I/O at LOOP_CLR_FD can be lost: sync first, always.
	if err := d.flush(); err != nil {
		errs = append(errs, err)
	}
	d.ioStat.Close()
	// Lock the main fd itself, not a new OFD: the lock lasts through the
	// clear without adding an opener.
	if err := flockPoll(ctx, int(f.Fd()), unix.LOCK_EX, false); err != nil {
		errs = append(errs, fmt.Errorf("lock: %w", err))
	}
	if d.mayHavePartitions() {
		if _, err := deletePartitions(f, d.sysfsDir(), d.kernelName()); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete partitions: %w", err))
		}
	}
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && err != unix.ENXIO {
		errs = append(errs, fmt.Errorf("LOOP_CLR_FD: %w", err))
		f.Close()
		return fmt.Errorf("detach %s: %w", d.path, errors.Join(errs...))
	}
	f.Close()
	// From 6.11 LOOP_CLR_FD only marks autoclear; the unbind happens at the
	// last close. Still bound with our identity now means someone holds it.
	if d.stillBound() {
		log.LogAttrs(ctx, slog.LevelDebug, "loop detach deferred: device still open",
			slog.String("device", d.path), slog.Uint64("diskseq", d.diskseq))
		errs = append(errs, ErrDetachDeferred)
		return fmt.Errorf("detach %s: %w", d.path, errors.Join(errs...))
	}
	if d.remove {
		if err := removeDevice(ctx, d.nr, d.devnum); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("detach %s: %w", d.path, errors.Join(errs...))
	}
	log.LogAttrs(ctx, slog.LevelDebug, "loop device detached", slog.String("device", d.path), slog.Uint64("diskseq", d.diskseq))
	return nil
}

// stillBound reports whether the device still carries this attachment,
// from sysfs alone (an open would itself hold the device). With diskseq the
// answer is exact. Without it (before 5.15) any binding is not ours: only
// one with our backing path and offset counts, the best sysfs can tell.
func (d *Device) stillBound() bool {
	dir := d.sysfsDir()
	bf, err := readAttr(dir + "/loop/backing_file")
	if err != nil {
		return false
	}
	if d.diskseq != 0 {
		seq, err := readAttrUint(dir + "/diskseq")
		return err == nil && seq == d.diskseq
	}
	if p, _ := splitDeleted(bf); d.backingPath == "" || p != d.backingPath {
		return false
	}
	off, err := readAttrUint(dir + "/loop/offset")
	return err == nil && off == d.offset
}

// removeDevice deletes /dev/loopN after the clear under the control lock,
// retrying EBUSY (udev or blkid may still hold it): 39 calls, 38 sleeps of
// 5 ms doubling after every 5th, 5.09 s in all (systemd's loop_device_free).
func removeDevice(ctx context.Context, nr int, devnum Devnum) error {
	ctl, err := openControl(ctx)
	if err != nil {
		return fmt.Errorf("LOOP_CTL_REMOVE loop%d: %w", nr, err)
	}
	defer ctl.Close()
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
		if err := sleepCtx(ctx, delay); err != nil {
			return fmt.Errorf("LOOP_CTL_REMOVE loop%d: %w", nr, err)
		}
		if i%5 == 0 {
			delay *= 2
		}
	}
}

// Close releases the handle without detaching: flush (fsync unless nothing
// was written), close every
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
	// flush skips the fsync (a disk cache flush of the backing, most of an
	// unwritten device's close) when the I/O counters show no write since
	// the attach.
	if err := d.flush(); err != nil && !errors.Is(err, unix.EINVAL) {
		errs = append(errs, err)
	}
	d.ioStat.Close()
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

// awaitUnbind polls sysfs (no open: an open would itself hold the device)
// until d's attachment is unbound, after a deferred detach.
func (d *Device) awaitUnbind(ctx context.Context) error {
	for d.stillBound() {
		if err := sleepCtx(ctx, 5*time.Millisecond); err != nil {
			return fmt.Errorf("detach %s: still held by %v: %w", d.path, holders(d.devnum), errors.Join(ErrDetachDeferred, err))
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
	if ms, err := mountinfo.Self(); err == nil {
		for _, m := range ms {
			if m.Devnum == devnum.String() {
				out = append(out, "mount "+m.MountPoint)
			}
		}
	}
	return out
}
