package loopdev

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// configureBroken remembers, process-wide, that LOOP_CONFIGURE (kernel
// commit 3448914e8cc5, 5.8) is missing or misapplied its arguments (5.8
// ignored PARTSCAN and the size limit). Set once, never reset; the package's
// only mutable global besides the control lock's queue.
var configureBroken atomic.Bool

// diskseqWorks remembers that this kernel reports diskseq (5.15+), so the
// uevent seqnum fence, which only matters without diskseq, is not read on
// every attach (a sysfs open and read). Set once, never reset.
var diskseqWorks atomic.Bool

// Attach opens backingPath and attaches it to a free loop device.
func Attach(ctx context.Context, backingPath string, opts Options) (*Device, error) {
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("attach %s: %w", backingPath, err)
	}
	dio := opts.wantDirectIO()
	f, err := openBackingPath(backingPath, opts.Access, dio)
	if err != nil {
		if errors.Is(err, unix.EISDIR) {
			return nil, fmt.Errorf("attach %s: %w", backingPath, invalidf("a directory"))
		}
		if errors.Is(err, unix.ENXIO) {
			// open(2) on a FIFO with O_NONBLOCK|O_RDWR succeeds, but O_RDONLY/O_WRONLY
			// on a socket or FIFO without reader gives ENXIO: a bad argument here.
			return nil, fmt.Errorf("attach %s: %w", backingPath, invalidf("not a regular file or block device"))
		}
		return nil, opError("attach", backingPath, err)
	}
	return attachBacking(ctx, f, opts, dio)
}

// AttachFile attaches an already-open backing file. The file is reopened
// through /proc/self/fd (never dup'ed), so the caller keeps its own fd, flags
// and locks.
func AttachFile(ctx context.Context, backing *os.File, opts Options) (*Device, error) {
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("attach %s: %w", backing.Name(), err)
	}
	dio := opts.wantDirectIO()
	fl, err := unix.FcntlInt(backing.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return nil, fmt.Errorf("attach %s: fcntl: %w", backing.Name(), err)
	}
	if fl&unix.O_PATH != 0 || fl&unix.O_ACCMODE == unix.O_WRONLY {
		return nil, fmt.Errorf("attach %s: backing opened O_PATH or write-only: %w", backing.Name(), unix.EBADFD)
	}
	acc := fl & unix.O_ACCMODE
	if opts.Access == AccessReadOnly {
		acc = unix.O_RDONLY
	}
	// Record the fd's /proc/self/fd link target as the backing path.
	name := backing.Name()
	if p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", backing.Fd())); err == nil {
		name = p
	}
	f, err := reopenNamed(backing, openBase|acc|directFlag(dio), name)
	if err != nil && dio {
		dio = false
		f, err = reopenNamed(backing, openBase|acc, name)
	}
	if err != nil {
		return nil, opError("attach", backing.Name(), err)
	}
	return attachBacking(ctx, f, opts, dio)
}

func attachBacking(ctx context.Context, f *os.File, opts Options, dio bool) (*Device, error) {
	b, err := prepareBacking(f, &opts, &dio)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("attach %s: %w", f.Name(), err)
	}
	defer func() {
		if b.file != nil { // nil when the shortcut took it over
			b.file.Close()
		}
	}()
	b.lock = opts.BackingLock
	if err := b.lockFile(); err != nil {
		return nil, fmt.Errorf("attach %s: %w", b.path, err)
	}
	if b.isBlock {
		if d, ok, err := shortcut(ctx, b, &opts); ok || err != nil {
			if err != nil {
				return nil, fmt.Errorf("attach %s: %w", b.path, err)
			}
			return d, nil
		}
	}
	d, err := allocate(ctx, b, &opts, dio)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", b.path, err)
	}
	return d, nil
}

// allocate runs the allocation loop (get-free, attempt, randomized backoff,
// as systemd's loop_device_make_internal) and the post-loop steps.
func allocate(ctx context.Context, b *backing, opts *Options, dio bool) (*Device, error) {
	var uev *ueventSocket
	if opts.WaitPartitions {
		// Opened before the attach ioctl so no event of this attachment is missed.
		var err error
		if uev, err = openUevents(); err != nil {
			return nil, err
		}
	}
	var lastErr error
	for n := 0; ; n++ {
		ctl, err := openControl(ctx)
		if err != nil {
			uev.Close()
			return nil, err
		}
		nr, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			ctl.Close()
			uev.Close()
			return nil, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		d, err := attempt(ctx, nr, b, opts, dio)
		if err == nil {
			d.uevents = uev
			// The device is bound and locked (LOCK_EX on d.lock): no
			// cooperating allocator can be handed it now, so the control
			// lock, which every attach on the host waits for, is released
			// before the post-attach steps rather than after.
			ctl.Close()
			err = finish(ctx, d, b, opts)
			if err != nil {
				// The device is ours now: the full teardown, after the
				// control lock is released (it waits for the device lock).
				d.mu.Lock()
				_ = d.teardownLocked(ctx)
				d.mu.Unlock()
				return nil, err
			}
			return d, nil
		}
		ctl.Close() // releases the control lock; no device fd is held now
		if !retryable(err) {
			uev.Close()
			return nil, err
		}
		lastErr = err
		if n+1 >= maxAttempts {
			uev.Close()
			return nil, fmt.Errorf("%d attempts, last: %v: %w", maxAttempts, lastErr, ErrBusy)
		}
		if errors.Is(err, unix.ENOANO) && dio {
			// The kernel did not enable DIO: restart buffered from get-free,
			// never keep a half-enabled DIO device (5.10 dm-crypt gave EIO).
			dio = false
			if err := b.dropDirect(); err != nil {
				uev.Close()
				return nil, err
			}
		}
		// uniform[0, 10ms + 240ms*n/64): systemd's randomized backoff.
		limit := 10*time.Millisecond + time.Duration(240*float64(time.Millisecond)*float64(n+1)/maxAttempts)
		sleep := rand.N(limit)
		loggerOr(opts.Logger).LogAttrs(ctx, slog.LevelDebug, "loop attach collided, retrying",
			slog.String("device", "/dev/loop"+strconv.Itoa(nr)), slog.Int("attempt", n+1),
			slog.Duration("backoff", sleep), slog.Any("error", err))
		if opts.onBackoff != nil {
			opts.onBackoff(n+1, sleep)
		}
		if err := sleepCtx(ctx, sleep); err != nil {
			uev.Close()
			return nil, fmt.Errorf("backoff after %v: %w", lastErr, err)
		}
	}
}

// attempt is one pass on loop<nr>: node, open, lock, bound check, stale
// partitions, configure, verify. On success the device is
// bound, owned, and locked exclusively on d.lock.
func attempt(ctx context.Context, nr int, b *backing, opts *Options, dio bool) (_ *Device, retErr error) {
	if err := opts.fault(stepGetFree, nr); err != nil {
		return nil, err
	}
	node := "/dev/loop" + strconv.Itoa(nr)
	// No diskseq check here: the number just came from LOOP_CTL_GET_FREE
	// and the bound check under the lock decides; the diskseq that matters
	// is read after the configure.
	mainFD, devnum, err := openLoopNode(node, nr, accFlags(b.readOnly), true)
	if err != nil {
		return nil, err
	}
	main := os.NewFile(uintptr(mainFD), node)
	d := &Device{file: main, path: node, nr: nr, devnum: devnum, created: true, owned: true,
		backingPath: b.path, offset: opts.Offset, sectorSize: opts.SectorSize, readOnly: b.readOnly,
		remove: opts.RemoveDevice, log: loggerOr(opts.Logger), unpartitioned: !opts.Partscan}
	bound := false
	defer func() {
		if retErr != nil {
			d.abort(bound)
		}
	}()
	lockFD := mainFD
	if opts.Lock != LockNone {
		// The caller keeps a lock: it lives on a separate read-only OFD, which
		// can be closed before LOOP_CLR_FD (an extra opener turns the clear
		// lazy) and which SELinux lets us open where it denies rw. Without
		// one, the main fd carries the allocation lock until finish.
		fd, lockDevnum, err := openLoopNode(node, nr, unix.O_RDONLY, false)
		if err != nil {
			return nil, err
		}
		d.lock = &ofd{fd: fd}
		if lockDevnum != devnum {
			return nil, fmt.Errorf("%s changed from %s to %s while it was opened: %w", node, devnum, lockDevnum, unix.ENXIO)
		}
		lockFD = fd
	}
	if err := flockPoll(ctx, lockFD, unix.LOCK_EX, false); err != nil {
		return nil, fmt.Errorf("lock %s: %w", node, err)
	}
	if err := opts.fault(stepLocked, nr); err != nil {
		return nil, err
	}
	// Bound check under the lock: a non-locking peer (losetup) may have bound it.
	if _, err := unix.IoctlLoopGetStatus64(int(main.Fd())); err == nil {
		return nil, fmt.Errorf("%s bound by another user: %w", node, unix.EBUSY)
	} else if err != unix.ENXIO {
		return nil, fmt.Errorf("LOOP_GET_STATUS64 %s: %w", node, err)
	}
	// One open of the disk's sysfs directory serves the partition listing and
	// the flush's baseline below.
	dir := sysfsDirOf(nr, devnum)
	dirfd, err := openDir(dir)
	if err != nil {
		return nil, fmt.Errorf("delete stale partitions of %s: %w", node, err)
	}
	defer unix.Close(dirfd)
	// An unbound device can still carry partitions (5.8, or a partition held
	// open during clear); they give I/O errors and block LOOP_CTL_REMOVE.
	if n, err := deletePartitionsAt(main, dirfd, dir, "loop"+strconv.Itoa(nr)); err != nil {
		return nil, fmt.Errorf("delete stale partitions of %s: %w", node, err)
	} else if n > 0 {
		return nil, fmt.Errorf("%s had %d stale partitions: %w", node, n, unix.EUCLEAN)
	}
	if opts.forceNoDiskseq || !diskseqWorks.Load() {
		d.fences = readFences()
	} else {
		d.fences = Fences{SeqnumNotBefore: math.MaxUint64}
	}
	// The flush's baseline: the disk's I/O counters before the device can be
	// written (they only grow, so an early baseline errs on the side of an
	// fsync). Its fd stays open for the teardown's second read.
	if st, c, err := openIOStat(dirfd, dir); err == nil {
		d.ioStat, d.ioAtAttach = st, c
	}
	if err := opts.fault(stepBeforeAttach, nr); err != nil {
		return nil, err
	}
	cfg := buildConfig(b, opts, dio)
	if err := configure(ctx, d, b, opts, cfg, dio, &bound); err != nil {
		return nil, err
	}
	if err := opts.fault(stepVerified, nr); err != nil {
		return nil, err
	}
	if !opts.forceNoDiskseq {
		seq, err := getDiskseq(main.Fd())
		if err != nil && !errors.Is(err, ErrUnsupported) {
			return nil, fmt.Errorf("BLKGETDISKSEQ %s: %w", node, err)
		}
		d.diskseq = seq
		if seq != 0 {
			diskseqWorks.Store(true)
		}
	}
	if d.size, err = unix.IoctlGetUint64(int(main.Fd()), unix.BLKGETSIZE64); err != nil {
		return nil, fmt.Errorf("BLKGETSIZE64 %s: %w", node, err)
	}
	return d, nil
}

// buildConfig fills struct loop_config for LOOP_CONFIGURE.
func buildConfig(b *backing, opts *Options, dio bool) unix.LoopConfig {
	var cfg unix.LoopConfig
	cfg.Fd = uint32(b.file.Fd())
	cfg.Size = opts.SectorSize // the kernel's block_size: always explicit, never 0
	cfg.Info.Offset = opts.Offset
	cfg.Info.Sizelimit = opts.Size
	// The kernel counts capacity in 512-byte sectors and keeps a tail that
	// is not a whole logical block: reading it gives EIO and "Buffer I/O
	// error" in dmesg. A limit rounded down to the logical block size leaves
	// none (prepareBacking refused one of zero).
	if lim := expectedSize(b.size, opts.Offset, opts.Size, opts.SectorSize); lim != expectedSize(b.size, opts.Offset, opts.Size, 512) {
		cfg.Info.Sizelimit = lim
	}
	// AUTOCLEAR always: a crash before the caller decides never leaks a device.
	// PARTSCAN is set after the attach (enablePartscan) to avoid double scans.
	cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
	if opts.KeepFromStart {
		cfg.Info.Flags = 0 // the caller accepted the crash window (owner tag set)
	}
	if b.readOnly {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	if dio {
		cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	copy(cfg.Info.File_name[:], opts.FileName)
	return cfg
}

// configure binds the backing with LOOP_CONFIGURE, or the legacy ioctls when
// LOOP_CONFIGURE is unsupported or known broken, and verifies the result.
func configure(ctx context.Context, d *Device, b *backing, opts *Options, cfg unix.LoopConfig, dio bool, bound *bool) error {
	fd := int(d.file.Fd())
	if configureBroken.Load() {
		return configureLegacy(ctx, d, b, opts, cfg, dio, bound)
	}
	err := unix.IoctlLoopConfigure(fd, &cfg)
	if err == nil {
		*bound = true
		if err := opts.fault(stepAttached, d.nr); err != nil {
			return err
		}
		err = verifyConfigured(d, b, opts, dio)
		if errors.Is(err, errConfigureBroken) {
			// A kernel that accepts LOOP_CONFIGURE and misapplies it (5.8
			// ignored PARTSCAN and the size limit) proves itself broken.
			// Never reuse this device in place: the clear may be lazy.
			configureBroken.Store(true)
			d.logger().LogAttrs(ctx, slog.LevelDebug, "LOOP_CONFIGURE misapplied its arguments, using LOOP_SET_FD from now on",
				slog.String("device", d.path), slog.Any("error", err))
			return fmt.Errorf("%s: %v: %w", d.path, err, unix.EBUSY)
		}
		return err
	}
	if !unsupportedErrno(err) {
		return fmt.Errorf("LOOP_CONFIGURE %s: %w", d.path, err)
	}
	// EINVAL is also what an unusable backing gives (a procfs file, say):
	// try the legacy path on the same, still unbound device, and mark
	// LOOP_CONFIGURE missing process-wide only if that one works. One bad
	// backing must not cost every later attach the slow path.
	if lerr := configureLegacy(ctx, d, b, opts, cfg, dio, bound); lerr != nil {
		if *bound {
			return lerr
		}
		return fmt.Errorf("LOOP_CONFIGURE %s: %w", d.path, err)
	}
	configureBroken.Store(true)
	d.logger().LogAttrs(ctx, slog.LevelDebug, "LOOP_CONFIGURE unsupported, using LOOP_SET_FD",
		slog.String("device", d.path), slog.Any("error", err))
	return nil
}

// configureLegacy binds with LOOP_SET_FD and sets the rest with
// LOOP_SET_STATUS64, LOOP_SET_BLOCK_SIZE and LOOP_SET_DIRECT_IO, as kernels
// before 5.8 need.
func configureLegacy(ctx context.Context, d *Device, b *backing, opts *Options, cfg unix.LoopConfig, dio bool, bound *bool) error {
	fd := int(d.file.Fd())
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_FD, int(cfg.Fd)); err != nil {
		return fmt.Errorf("LOOP_SET_FD %s: %w", d.path, err)
	}
	*bound = true
	if err := opts.fault(stepAttached, d.nr); err != nil {
		return err
	}
	info := cfg.Info
	// LOOP_SET_STATUS64 can only set AUTOCLEAR and PARTSCAN.
	info.Flags &= unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_PARTSCAN
	if err := setStatusRetry(ctx, fd, &info); err != nil {
		return fmt.Errorf("LOOP_SET_STATUS64 %s: %w", d.path, err)
	}
	if info.Offset != 0 || info.Sizelimit != 0 {
		// Before 5.0 a new offset or size limit did not invalidate the
		// page cache of the device (fixed by kernel commit 5db470e229e2,
		// "loop: drop caches if offset or block_size are changed"); systemd
		// issues BLKFLSBUF here for the same reason. Best effort.
		_ = unix.IoctlSetInt(fd, unix.BLKFLSBUF, 0)
	}
	if cfg.Size != 0 {
		_ = unix.IoctlSetInt(fd, unix.LOOP_SET_BLOCK_SIZE, int(cfg.Size)) // verified below
		ss, err := unix.IoctlGetUint32(fd, unix.BLKSSZGET)
		if err != nil || ss != cfg.Size {
			return fmt.Errorf("%s: block size %d, want %d: %w", d.path, ss, cfg.Size, unix.EIO)
		}
	}
	if dio {
		_ = unix.IoctlSetInt(fd, unix.LOOP_SET_DIRECT_IO, 1) // verified below
	}
	return verifyConfigured(d, b, opts, dio)
}

// setStatusRetry retries LOOP_SET_STATUS64 on EAGAIN, which 5.0+ returns while
// someone (udev) holds the device open and page cache must be dropped.
func setStatusRetry(ctx context.Context, fd int, info *unix.LoopInfo64) error {
	for n := 1; ; n++ {
		err := unix.IoctlLoopSetStatus64(fd, info)
		if err != unix.EAGAIN || n >= maxAttempts {
			return err
		}
		// systemd's formula for this retry: 10 ms + uniform[0, 240 ms * n/64).
		if err := sleepCtx(ctx, 10*time.Millisecond+rand.N(time.Duration(240*float64(time.Millisecond)*float64(n)/maxAttempts)+1)); err != nil {
			return err
		}
	}
}

var errConfigureBroken = errors.New("LOOP_CONFIGURE result does not match the request")

// verifyConfigured checks what the kernel applied: 5.8's LOOP_CONFIGURE
// ignored the size limit and PARTSCAN, and from 6.14 the DIO flag reports
// whether direct I/O is really in effect.
func verifyConfigured(d *Device, b *backing, opts *Options, dio bool) error {
	fd := int(d.file.Fd())
	ss, err := unix.IoctlGetUint32(fd, unix.BLKSSZGET)
	if err != nil {
		return fmt.Errorf("BLKSSZGET %s: %w", d.path, err)
	}
	if ss != opts.SectorSize {
		return fmt.Errorf("%s: sector size %d, want %d: %w", d.path, ss, opts.SectorSize, errConfigureBroken)
	}
	if opts.Offset != 0 || opts.Size != 0 {
		got, err := unix.IoctlGetUint64(fd, unix.BLKGETSIZE64)
		if err != nil {
			return fmt.Errorf("BLKGETSIZE64 %s: %w", d.path, err)
		}
		// 6.18 keeps a tail that is not a whole logical block (the capacity
		// is counted in 512-byte sectors); accept it rounded either way.
		want := expectedSize(b.size, opts.Offset, opts.Size, 512)
		if got != want && got != expectedSize(b.size, opts.Offset, opts.Size, opts.SectorSize) {
			// 5.8 did not apply lo_sizelimit.
			return fmt.Errorf("%s: size %d, want %d: %w", d.path, got, want, errConfigureBroken)
		}
	}
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return fmt.Errorf("LOOP_GET_STATUS64 %s: %w", d.path, err)
	}
	d.status = info
	d.dio = info.Flags&unix.LO_FLAGS_DIRECT_IO != 0
	if dio && !d.dio {
		// From 6.14 the flag reports the effective state; restart buffered.
		return fmt.Errorf("%s: direct I/O not enabled: %w", d.path, unix.ENOANO)
	}
	return nil
}

// expectedSize is min(sizelimit, backing - offset) rounded down to 512 and to
// the logical block size. Comparing with lo_sizelimit exactly (as systemd
// does) would call a sizelimit past EOF a kernel bug.
func expectedSize(backingSize, offset, sizelimit uint64, blockSize uint32) uint64 {
	avail := uint64(0)
	if backingSize > offset {
		avail = backingSize - offset
	}
	if sizelimit != 0 && sizelimit < avail {
		avail = sizelimit
	}
	avail &^= 511
	if blockSize > 512 {
		avail -= avail % uint64(blockSize)
	}
	return avail
}

// finish runs the post-attach steps: the device is bound, verified and
// locked exclusively, so no cooperating allocator gets it meanwhile.
func finish(ctx context.Context, d *Device, b *backing, opts *Options) error {
	fd := int(d.file.Fd())
	if b.isBlock {
		mirrorDiscard(ctx, b, d)
	}
	if opts.Partscan {
		if err := enablePartscan(d); err != nil {
			return err
		}
	}
	if err := opts.fault(stepPartscan, d.nr); err != nil {
		return err
	}
	d.backing = BackingID{Dev: devOfStat(&b.st), Ino: b.st.Ino}
	// The verification's status still holds for what is checked here
	// (backing, offset, autoclear, read-only: partscan changes none of them).
	info := d.status
	d.status = nil
	if info == nil {
		var err error
		if info, err = unix.IoctlLoopGetStatus64(fd); err != nil {
			return fmt.Errorf("LOOP_GET_STATUS64 %s: %w", d.path, err)
		}
	}
	// Identity check (beyond systemd): the kernel must have bound our inode.
	if info.Device != d.backing.Dev || info.Inode != d.backing.Ino || info.Offset != opts.Offset {
		return fmt.Errorf("%s bound to %d/%d@%d, want %d/%d@%d: %w", d.path, info.Device, info.Inode, info.Offset,
			d.backing.Dev, d.backing.Ino, opts.Offset, unix.EIO)
	}
	if (info.Flags&unix.LO_FLAGS_AUTOCLEAR != 0) == opts.KeepFromStart || (info.Flags&unix.LO_FLAGS_READ_ONLY != 0) != b.readOnly {
		return fmt.Errorf("%s flags %#x do not match the request: %w", d.path, info.Flags, unix.EIO)
	}
	if b.readOnly {
		if ro, err := readAttr(d.sysfsDir() + "/ro"); err != nil || ro != "1" {
			return fmt.Errorf("%s not read-only in sysfs: %w", d.path, unix.EIO)
		}
	}
	if err := opts.fault(stepDone, d.nr); err != nil {
		return err
	}
	if opts.Keep && !opts.KeepFromStart {
		if _, err := d.SetAutoclear(false); err != nil {
			return err
		}
	}
	// Hand back the caller's lock state.
	switch opts.Lock {
	case LockNone:
		// The allocation lock was taken on the main fd (see attempt).
		if err := unix.Flock(fd, unix.LOCK_UN); err != nil {
			return fmt.Errorf("unlock %s: %w", d.path, err)
		}
	case LockShared:
		// Downgrading with flock is not atomic, but the device is bound: a
		// cooperating allocator never takes a bound device.
		if err := unix.Flock(int(d.lock.Fd()), unix.LOCK_SH|unix.LOCK_NB); err != nil {
			return fmt.Errorf("downgrade lock on %s: %w", d.path, err)
		}
	}
	if opts.Keep {
		d.owned = false
	}
	d.logger().LogAttrs(ctx, slog.LevelDebug, "loop device attached", slog.String("device", d.path),
		slog.String("devnum", d.devnum.String()), slog.Uint64("diskseq", d.diskseq), slog.String("backing_file", d.backingPath))
	return nil
}

// abort undoes a failed attempt: fds on the device are closed first, then the
// clear is issued on the fd that was bound (an extra opener would make
// LOOP_CLR_FD lazy), then that fd is closed. Never clear what we did not bind.
func (d *Device) abort(bound bool) {
	d.ioStat.Close()
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
	if bound {
		_ = unix.IoctlSetInt(int(d.file.Fd()), unix.LOOP_CLR_FD, 0)
	}
	d.file.Close()
}

// ensureNode stats /dev/loopN, creating the node from sysfs when /dev lacks it
// (containers with a tmpfs /dev). The devnum comes from sysfs, never from nr:
// max_part changes the minor.
func ensureNode(node string, nr int) (Devnum, error) {
	devnum, err := devnumOfNode(node)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return devnum, err
	}
	sys := fmt.Sprintf("/sys/devices/virtual/block/loop%d/dev", nr)
	want, serr := readSysfsDevnum(sys)
	if serr != nil {
		return 0, err // still ENOENT: retryable
	}
	if merr := unix.Mknod(node, unix.S_IFBLK|0o660, int(want)); merr != nil && merr != unix.EEXIST {
		return 0, fmt.Errorf("mknod %s: %w", node, merr)
	}
	return devnumOfNode(node)
}

// openLoopNode opens /dev/loopN for attempt: one open(2) of the path, then
// fstat proves that it is loopN's block device (major 7, minor N <<
// part_shift), so a node replaced or stale in /dev gives ENXIO ("absent").
// openVerified's O_PATH step and /proc/self/fd reopen would cost two more
// path walks on every attach, for a number that has no identity to check
// yet beyond the one the driver gives it. O_NONBLOCK keeps a node swapped
// for a FIFO from blocking the open; with blocking it is cleared again, so
// that os.NewFile sees a blocking fd and does not try to register it with
// the poller (block devices refuse epoll). A missing node is made from
// sysfs (ensureNode) and opened again.
func openLoopNode(node string, nr int, acc int, blocking bool) (int, Devnum, error) {
	flags := unix.O_CLOEXEC | unix.O_NOCTTY | unix.O_NOFOLLOW | unix.O_NONBLOCK | acc
	fd, err := unix.Open(node, flags, 0)
	if err == unix.ENOENT {
		if _, err := ensureNode(node, nr); err != nil {
			return -1, 0, err
		}
		fd, err = unix.Open(node, flags, 0)
	}
	if err != nil {
		return -1, 0, &os.PathError{Op: "open", Path: node, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, 0, &os.PathError{Op: "stat", Path: node, Err: err}
	}
	devnum := devnumOfStat(&st)
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || !isLoopDevnum(nr, devnum) {
		unix.Close(fd)
		return -1, 0, fmt.Errorf("%s is not loop device %d (%s): %w", node, nr, devnum, unix.ENXIO)
	}
	if blocking {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, 0); err != nil {
			unix.Close(fd)
			return -1, 0, &os.PathError{Op: "fcntl", Path: node, Err: err}
		}
	}
	return fd, devnum, nil
}

// openVerified opens a block node safely (a node in /dev can be replaced,
// and a number reused, between lookup and open): O_PATH|O_NOFOLLOW, check
// it is the block device with the expected devnum, then reopen with the
// wanted flags and require the diskseq to be the one seen (0: read from
// sysfs first when checkSysfs). Any mismatch is ENXIO ("absent").
func openVerified(node string, devnum Devnum, diskseq uint64, acc int, checkSysfs bool) (*os.File, error) {
	pfd, err := unix.Open(node, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: node, Err: err}
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return nil, &os.PathError{Op: "stat", Path: node, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || devnumOfStat(&st) != devnum {
		return nil, fmt.Errorf("%s is no longer block device %s: %w", node, devnum, unix.ENXIO)
	}
	if diskseq == 0 && checkSysfs {
		if s, err := readAttrUint(devnum.SysfsDir() + "/diskseq"); err == nil {
			diskseq = s
		}
	}
	// Without O_NONBLOCK (it means nothing to a block device here): os.NewFile
	// would register a non-blocking fd with the poller, a failing epoll_ctl.
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pfd), unix.O_CLOEXEC|unix.O_NOCTTY|acc, 0)
	if err != nil {
		return nil, &os.PathError{Op: "reopen", Path: node, Err: err}
	}
	if diskseq != 0 {
		got, err := getDiskseq(uintptr(fd))
		if err == nil && got != diskseq {
			unix.Close(fd)
			return nil, fmt.Errorf("%s diskseq %d, want %d: %w", node, got, diskseq, unix.ENXIO)
		}
	}
	return os.NewFile(uintptr(fd), node), nil
}

// getDiskseq reads BLKGETDISKSEQ; "unsupported" errnos (old kernels answer
// EINVAL on a loop device) give ErrUnsupported.
func getDiskseq(fd uintptr) (uint64, error) {
	seq, err := unix.IoctlGetUint64(int(fd), unix.BLKGETDISKSEQ)
	if err != nil {
		if unsupportedErrno(err) {
			return 0, fmt.Errorf("diskseq: %w", ErrUnsupported)
		}
		return 0, err
	}
	return seq, nil
}

// readFences records the uevent seqnum and CLOCK_MONOTONIC just before the
// attach ioctl: on kernels without diskseq they tell this attachment's
// uevents and udev entries from an earlier one's.
func readFences() Fences {
	f := Fences{SeqnumNotBefore: math.MaxUint64}
	if s, err := readAttrUint("/sys/kernel/uevent_seqnum"); err == nil {
		f.SeqnumNotBefore = s
	}
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) == nil {
		f.TimeNotBefore = time.Duration(ts.Nano()) / time.Microsecond * time.Microsecond
	}
	return f
}

// shortcut returns a wrapper around a block-device backing instead of a new
// loop device when nothing would change (as systemd does): offset 0, whole size,
// same sector size, and partscan either unneeded or already effective.
func shortcut(ctx context.Context, b *backing, opts *Options) (*Device, bool, error) {
	if opts.Offset != 0 || opts.Size != 0 || opts.SectorSize != b.blockSize {
		return nil, false, nil
	}
	// Lock and BackingLock would be two flocks on one inode here, the
	// second refused by the first: a real loop device keeps them apart.
	if opts.Lock != LockNone && b.lock != LockNone {
		return nil, false, nil
	}
	devnum := devnumOfStat(&b.st)
	if opts.Partscan && !effectivePartscan(devnum) {
		if opts.MayPopulate || hasPartitionTable(b.file) {
			return nil, false, nil
		}
	}
	// The backing's own open file description becomes the handle, so the
	// BackingLock taken on it lasts as long as the handle; never O_DIRECT
	// (the caller's I/O would need its alignment).
	if b.direct {
		if err := setDirect(b.file, false); err != nil {
			return nil, true, fmt.Errorf("clear O_DIRECT: %w", err)
		}
	}
	f := b.file
	b.file = nil
	d := &Device{file: f, path: b.path, nr: -1, devnum: devnum, backingPath: b.path, shortcut: true, log: loggerOr(opts.Logger),
		sectorSize: b.blockSize, size: b.size, readOnly: b.readOnly,
		fences: Fences{SeqnumNotBefore: math.MaxUint64}}
	// A partition of a loop disk answers LOOP_GET_STATUS64 for its parent:
	// only a node with its own sysfs loop/ directory is a loop device.
	if info, err := unix.IoctlLoopGetStatus64(int(f.Fd())); err == nil && isLoopDisk(devnum) {
		d.nr = int(info.Number)
		d.backing = BackingID{Dev: info.Device, Ino: info.Inode}
		d.dio = info.Flags&unix.LO_FLAGS_DIRECT_IO != 0
	}
	if !opts.forceNoDiskseq {
		d.diskseq, _ = getDiskseq(f.Fd())
	}
	if opts.Lock != LockNone {
		if err := d.Flock(ctx, opts.Lock, opts.LockNonBlocking); err != nil {
			f.Close()
			return nil, true, err
		}
	}
	return d, true, nil
}

func mirrorDiscard(ctx context.Context, b *backing, d *Device) {
	src := devnumOfStat(&b.st).SysfsDir() + "/queue/discard_max_bytes"
	v, err := readAttr(src)
	if err == nil {
		err = os.WriteFile(d.devnum.SysfsDir()+"/queue/discard_max_bytes", []byte(v), 0)
	}
	if err != nil {
		d.logger().LogAttrs(ctx, slog.LevelDebug, "copy discard_max_bytes from block backing",
			slog.String("device", d.path), slog.Any("error", err))
	}
}
