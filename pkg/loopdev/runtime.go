package loopdev

import (
	"context"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Sync flushes the device (fsync of the main fd).
func (d *Device) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.errClosedLocked(); err != nil {
		return err
	}
	if err := d.file.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", d.path, err)
	}
	return nil
}

// Relinquish gives up ownership: Close only syncs and closes, Detach returns
// ErrNotOwned, and the kernel's autoclear detaches after the last user.
func (d *Device) Relinquish() {
	d.mu.Lock()
	d.owned = false
	d.mu.Unlock()
}

// Unrelinquish takes ownership of a bound loop device, so Detach clears it.
func (d *Device) Unrelinquish() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.errClosedLocked(); err != nil {
		return err
	}
	if d.nr < 0 {
		return fmt.Errorf("take ownership of %s: %w", d.path, ErrForeign)
	}
	if err := d.checkAlive(); err != nil {
		return err
	}
	d.owned = true
	d.created = true
	return nil
}

// SetAutoclear sets or clears LO_FLAGS_AUTOCLEAR. It is a no-op on handles
// that are not owned (opened or relinquished): Unrelinquish first.
func (d *Device) SetAutoclear(on bool) (changed bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.nr < 0 || !d.owned {
		return false, nil
	}
	return d.patchStatusLocked(func(info *unix.LoopInfo64) bool {
		if (info.Flags&unix.LO_FLAGS_AUTOCLEAR != 0) == on {
			return false
		}
		info.Flags ^= unix.LO_FLAGS_AUTOCLEAR
		return true
	})
}

// SetFilename sets the free-form lo_file_name tag (63 bytes at most; empty
// clears it). udev links it as /dev/disk/by-loop-ref/<name>.
func (d *Device) SetFilename(name string) (changed bool, err error) {
	if len(name) >= unix.LO_NAME_SIZE {
		return false, fmt.Errorf("set file name of %s: %q: %w", d.path, name, unix.ENOBUFS)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.patchStatusLocked(func(info *unix.LoopInfo64) bool {
		var want [unix.LO_NAME_SIZE]byte
		copy(want[:], name)
		if info.File_name == want {
			return false
		}
		info.File_name = want
		return true
	})
}

// RefreshSize changes offset and size limit; Unchanged leaves a value. It
// issues no ioctl when nothing changes (a needless SET_STATUS64 flushes and
// can fail with EAGAIN).
func (d *Device) RefreshSize(ctx context.Context, offset, size uint64) (changed bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.errClosedLocked(); err != nil {
		return false, err
	}
	if d.nr < 0 {
		return d.resizePartition(offset, size)
	}
	if err := d.checkAlive(); err != nil {
		return false, err
	}
	fd := int(d.file.Fd())
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return false, fmt.Errorf("LOOP_GET_STATUS64 %s: %w", d.path, err)
	}
	if (offset == Unchanged || offset == info.Offset) && (size == Unchanged || size == info.Sizelimit) {
		return false, nil
	}
	if offset != Unchanged {
		info.Offset = offset
	}
	if size != Unchanged {
		info.Sizelimit = size
	}
	info.Flags &= unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_PARTSCAN
	if err := setStatusRetry(ctx, fd, info); err != nil {
		return false, fmt.Errorf("LOOP_SET_STATUS64 %s: %w", d.path, err)
	}
	if offset != Unchanged {
		d.offset = offset
	}
	if s, err := unix.IoctlGetUint64(fd, unix.BLKGETSIZE64); err == nil {
		d.size = s
	}
	return true, nil
}

// patchStatusLocked is a read-modify-write of loop_info64, with d.mu held.
func (d *Device) patchStatusLocked(patch func(*unix.LoopInfo64) bool) (bool, error) {
	if err := d.errClosedLocked(); err != nil {
		return false, err
	}
	if err := d.checkAlive(); err != nil {
		return false, err
	}
	fd := int(d.file.Fd())
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return false, fmt.Errorf("LOOP_GET_STATUS64 %s: %w", d.path, err)
	}
	if !patch(info) {
		return false, nil
	}
	// SET_STATUS64 can only set AUTOCLEAR/PARTSCAN; keep the others out.
	info.Flags &= unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_PARTSCAN
	if err := unix.IoctlLoopSetStatus64(fd, info); err != nil {
		return false, fmt.Errorf("LOOP_SET_STATUS64 %s: %w", d.path, err)
	}
	return true, nil
}

// Flock changes the caller's BSD lock on the device. LockNone closes the lock
// fd (the only way to unlock); otherwise a read-only lock OFD is created on
// first use. Converting shared<->exclusive is not atomic (flock may drop the
// old lock first). With nonBlocking a held lock gives EWOULDBLOCK.
func (d *Device) Flock(ctx context.Context, state LockState, nonBlocking bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.errClosedLocked(); err != nil {
		return err
	}
	if state == LockNone {
		if d.lock != nil {
			d.lock.Close()
			d.lock = nil
		}
		return nil
	}
	fresh := d.lock == nil
	if fresh {
		l, err := reopenOFD(d.file, openBase|unix.O_RDONLY)
		if err != nil {
			return err
		}
		d.lock = l
	}
	if err := flockPoll(ctx, int(d.lock.Fd()), lockHow(state), nonBlocking); err != nil {
		if fresh {
			// A lock fd that never got its lock must not stay open: it is
			// an opener, which turns the owner's next LOOP_CLR_FD lazy.
			d.lock.Close()
			d.lock = nil
		}
		return fmt.Errorf("lock %s: %w", d.path, err)
	}
	return nil
}

// resizePartition refreshes the size of a foreign handle that wraps a
// partition: BLKPG_RESIZE_PARTITION on the parent disk. The kernel
// cannot move a partition's start; asking for another offset gives EINVAL.
func (d *Device) resizePartition(offset, size uint64) (bool, error) {
	dir := d.devnum.SysfsDir()
	pno, err := readAttrUint(dir + "/partition")
	if err != nil {
		return false, fmt.Errorf("refresh size of %s: not a loop device or partition: %w", d.path, unix.ENOTTY)
	}
	start, err := readAttrUint(dir + "/start")
	if err != nil {
		return false, fmt.Errorf("refresh size of %s: %w", d.path, err)
	}
	parent, err := readSysfsDevnum(dir + "/../dev")
	if err != nil {
		return false, fmt.Errorf("refresh size of %s: parent disk: %w", d.path, err)
	}
	cur, err := unix.IoctlGetUint64(int(d.file.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return false, fmt.Errorf("BLKGETSIZE64 %s: %w", d.path, err)
	}
	start *= 512
	if (offset == Unchanged || offset == start) && (size == Unchanged || size == cur) {
		return false, nil
	}
	if offset == Unchanged {
		offset = start
	}
	if size == Unchanged {
		size = cur
	}
	real, err := filepath.EvalSymlinks(parent.SysfsDir())
	if err != nil {
		return false, fmt.Errorf("refresh size of %s: %w", d.path, err)
	}
	disk, err := openVerified("/dev/"+filepath.Base(real), parent, 0, unix.O_RDWR, true)
	if err != nil {
		return false, fmt.Errorf("refresh size of %s: open parent: %w", d.path, err)
	}
	defer disk.Close()
	p := unix.BlkpgPartition{Pno: int32(pno), Start: int64(offset), Length: int64(size)}
	if err := blkpg(disk, unix.BLKPG_RESIZE_PARTITION, &p); err != nil {
		return false, fmt.Errorf("BLKPG_RESIZE_PARTITION %s: %w", d.path, err)
	}
	d.size = size
	return true, nil
}
