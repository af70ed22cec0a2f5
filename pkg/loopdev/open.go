package loopdev

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// OpenOptions describes how to open an existing device.
type OpenOptions struct {
	Access          AccessMode // Auto and ReadWrite open read-write; ReadOnly read-only
	Lock            LockState
	LockNonBlocking bool
	// Optional expectations: a mismatch is ErrReused.
	ExpectDiskSeq uint64
	ExpectBacking *BackingID
}

// Open opens an existing block device (spec 9.1): a reopen, never a dup, with
// the identity checks of spec 7.1. The handle is not owned: Detach returns
// ErrNotOwned until Unrelinquish.
func Open(ctx context.Context, path string, opts OpenOptions) (*Device, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	devnum, err := devnumOfNode(real)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	acc := unix.O_RDWR
	if opts.Access == AccessReadOnly {
		acc = unix.O_RDONLY
	}
	f, err := openVerified(real, devnum, opts.ExpectDiskSeq, acc, false)
	if err != nil && opts.Access == AccessAuto && (errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES)) {
		acc = unix.O_RDONLY
		f, err = openVerified(real, devnum, opts.ExpectDiskSeq, acc, false)
	}
	if err != nil {
		if errors.Is(err, unix.ENXIO) && opts.ExpectDiskSeq != 0 {
			return nil, fmt.Errorf("open %s: %v: %w", path, err, ErrReused)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	d := &Device{file: f, path: real, nr: -1, devnum: devnum, readOnly: acc == unix.O_RDONLY,
		fences: Fences{SeqnumNotBefore: math.MaxUint64}}
	fd := int(f.Fd())
	// A partition of a loop disk answers LOOP_GET_STATUS64 for its parent.
	if info, err := unix.IoctlLoopGetStatus64(fd); err == nil && isLoopDisk(devnum) {
		d.nr = int(info.Number)
		d.backing = BackingID{Dev: info.Device, Ino: info.Inode}
		d.offset = info.Offset
		d.dio = info.Flags&unix.LO_FLAGS_DIRECT_IO != 0
		d.readOnly = d.readOnly || info.Flags&unix.LO_FLAGS_READ_ONLY != 0
		if s, err := readAttr(devnum.SysfsDir() + "/loop/backing_file"); err == nil {
			d.backingPath, _ = splitDeleted(s)
		}
	}
	d.diskseq, _ = getDiskseq(f.Fd())
	if opts.ExpectBacking != nil && *opts.ExpectBacking != d.backing {
		f.Close()
		return nil, fmt.Errorf("open %s: backing %v, want %v: %w", path, d.backing, *opts.ExpectBacking, ErrReused)
	}
	if d.sectorSize, err = unix.IoctlGetUint32(fd, unix.BLKSSZGET); err != nil {
		f.Close()
		return nil, fmt.Errorf("BLKSSZGET %s: %w", path, err)
	}
	if d.size, err = unix.IoctlGetUint64(fd, unix.BLKGETSIZE64); err != nil {
		f.Close()
		return nil, fmt.Errorf("BLKGETSIZE64 %s: %w", path, err)
	}
	if opts.Lock != LockNone {
		if err := d.Flock(ctx, opts.Lock, opts.LockNonBlocking); err != nil {
			f.Close()
			return nil, err
		}
	}
	return d, nil
}

// Info describes a bound loop device.
type Info struct {
	Path        string    `json:"path"`
	Nr          int       `json:"nr"`
	Devnum      Devnum    `json:"devnum"`
	DiskSeq     uint64    `json:"diskseq"`
	BackingFile string    `json:"backing_file"` // sysfs text, namespace-relative
	Deleted     bool      `json:"deleted"`      // backing file was unlinked
	Backing     BackingID `json:"backing"`
	Offset      uint64    `json:"offset"`
	SizeLimit   uint64    `json:"sizelimit"`
	Autoclear   bool      `json:"autoclear"`
	ReadOnly    bool      `json:"read_only"`
	Partscan    bool      `json:"partscan"`
	DirectIO    bool      `json:"direct_io"`
	FileName    string    `json:"file_name"`
}

// Record turns an Info into a record for DetachRecord.
func (i Info) Record() Record {
	return Record{Path: i.Path, Devnum: i.Devnum, DiskSeq: i.DiskSeq, Backing: i.Backing, Offset: i.Offset}
}

// List returns every bound loop device. Devices being torn down while it
// runs are skipped.
func List() ([]Info, error) {
	dirs, err := filepath.Glob("/sys/block/loop*")
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, dir := range dirs {
		if i, ok := inspect(dir); ok {
			out = append(out, i)
		}
	}
	return out, nil
}

// inspect reads one loop device; ok is false when it is unbound or vanished.
func inspect(sysdir string) (Info, bool) {
	name := filepath.Base(sysdir)
	nr, err := strconv.Atoi(strings.TrimPrefix(name, "loop"))
	if err != nil {
		return Info{}, false
	}
	bf, err := readAttr(sysdir + "/loop/backing_file")
	if err != nil {
		return Info{}, false
	}
	devnum, err := readSysfsDevnum(sysdir + "/dev")
	if err != nil {
		return Info{}, false
	}
	i := Info{Path: "/dev/" + name, Nr: nr, Devnum: devnum}
	i.BackingFile, i.Deleted = splitDeleted(bf)
	i.Offset, _ = readAttrUint(sysdir + "/loop/offset")
	i.SizeLimit, _ = readAttrUint(sysdir + "/loop/sizelimit")
	i.Autoclear = attrIs(sysdir+"/loop/autoclear", "1")
	i.Partscan = attrIs(sysdir+"/loop/partscan", "1")
	i.DirectIO = attrIs(sysdir+"/loop/dio", "1")
	i.ReadOnly = attrIs(sysdir+"/ro", "1")
	i.DiskSeq, _ = readAttrUint(sysdir + "/diskseq")
	// lo_device/lo_inode and lo_file_name need the device open; a read-only
	// open raises no IN_CLOSE_WRITE for udev.
	f, err := openVerified(i.Path, devnum, i.DiskSeq, unix.O_RDONLY, false)
	if err != nil {
		return i, !errors.Is(err, unix.ENXIO)
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return Info{}, false
	}
	i.Backing = BackingID{Dev: info.Device, Ino: info.Inode}
	i.FileName = cString(info.File_name[:])
	return i, true
}

func attrIs(path, want string) bool {
	v, err := readAttr(path)
	return err == nil && v == want
}

func cString(b []byte) string {
	if i := strings.IndexByte(string(b), 0); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

// FindByBacking returns every binding of one file (a file may be attached
// several times). Only candidates are opened: a device whose sysfs
// backing_file names, in our mount namespace, another existing inode is
// skipped without an open (every open of a device makes a concurrent
// LOOP_CLR_FD of its owner lazy).
func FindByBacking(id BackingID) ([]Info, error) {
	dirs, err := filepath.Glob("/sys/block/loop*")
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, dir := range dirs {
		bf, err := readAttr(dir + "/loop/backing_file")
		if err != nil {
			continue
		}
		if p, deleted := splitDeleted(bf); !deleted {
			var st unix.Stat_t
			if unix.Stat(p, &st) == nil && (devOfStat(&st) != id.Dev || st.Ino != id.Ino) {
				continue
			}
		}
		if i, ok := inspect(dir); ok && i.Backing == id {
			out = append(out, i)
		}
	}
	return out, nil
}

// Verify reports whether rec still names a live attachment: nil, ErrGone or
// ErrReused.
func Verify(rec Record) error {
	f, err := openRecord(rec, false)
	if err != nil {
		return err
	}
	f.Close()
	return nil
}

// openRecord opens the device named by rec and proves it still carries that
// attachment (spec 8.3). With exclusive the open is O_EXCL, which fails with
// EBUSY (ErrInUse) while a filesystem is mounted from the device.
func openRecord(rec Record, exclusive bool) (*os.File, error) {
	devnum, err := devnumOfNode(rec.Path)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%s: %w", rec.Path, ErrGone)
		}
		return nil, fmt.Errorf("%s: %w", rec.Path, err)
	}
	if devnum != rec.Devnum {
		return nil, fmt.Errorf("%s is %s, recorded %s: %w", rec.Path, devnum, rec.Devnum, ErrReused)
	}
	acc := unix.O_RDONLY
	if exclusive {
		acc |= unix.O_EXCL
	}
	f, err := openVerified(rec.Path, rec.Devnum, 0, acc, false)
	if err != nil {
		if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%s: %w", rec.Path, ErrGone)
		}
		if exclusive && errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("%s: %w", rec.Path, ErrInUse)
		}
		return nil, err
	}
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		f.Close()
		if err == unix.ENXIO {
			return nil, fmt.Errorf("%s unbound: %w", rec.Path, ErrGone)
		}
		return nil, fmt.Errorf("LOOP_GET_STATUS64 %s: %w", rec.Path, err)
	}
	seq, serr := getDiskseq(f.Fd())
	switch {
	case serr == nil && rec.DiskSeq != 0 && seq != rec.DiskSeq:
		f.Close()
		return nil, fmt.Errorf("%s diskseq %d, recorded %d: %w", rec.Path, seq, rec.DiskSeq, ErrReused)
	case serr != nil || rec.DiskSeq == 0:
		// Without diskseq the backing identity and offset are the fallback.
		if (rec.Backing != BackingID{} && (BackingID{Dev: info.Device, Ino: info.Inode}) != rec.Backing) || info.Offset != rec.Offset {
			f.Close()
			return nil, fmt.Errorf("%s bound to another file (diskseq unsupported): %w", rec.Path, ErrReused)
		}
	}
	return f, nil
}

// DetachOptions refine DetachRecordWith.
type DetachOptions struct {
	// Exclusive opens the device O_EXCL: while a filesystem is mounted from
	// it (a mount claims the block device) the detach fails with ErrInUse
	// and touches nothing. The clear is issued on that exclusive fd, so
	// nothing can mount the device in between.
	Exclusive bool
	// Wait, after a deferred detach, polls until the kernel has unbound the
	// device (another opener closed it) or ctx ends.
	Wait bool
}

// DetachRecord is the guarded detach by name (spec 8.3): it detaches the
// device only if it still carries the recorded attachment, on the very fd it
// verified. Results: nil (detached), ErrGone (absent or unbound: nothing to
// do), ErrReused (someone else's binding now: untouched), ErrDetachDeferred
// (cleared, still held; unbinds at the last close).
func DetachRecord(ctx context.Context, rec Record) error {
	return DetachRecordWith(ctx, rec, DetachOptions{})
}

// DetachRecordWith is DetachRecord with options; see DetachOptions.
func DetachRecordWith(ctx context.Context, rec Record, opts DetachOptions) error {
	err := detachRecord(ctx, rec, opts.Exclusive)
	if opts.Wait && errors.Is(err, ErrDetachDeferred) {
		return awaitUnbind(ctx, rec)
	}
	return err
}

func detachRecord(ctx context.Context, rec Record, exclusive bool) error {
	f, err := openRecord(rec, exclusive)
	if err != nil {
		return fmt.Errorf("detach %s: %w", rec.Path, err)
	}
	nr := -1
	if n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(rec.Path), "loop")); err == nil {
		nr = n
	}
	d := &Device{file: f, path: rec.Path, nr: nr, devnum: rec.Devnum, diskseq: rec.DiskSeq,
		backing: rec.Backing, offset: rec.Offset, created: true, owned: true}
	if d.diskseq == 0 {
		d.diskseq, _ = getDiskseq(f.Fd())
	}
	ctl, err := openControl(ctx)
	if err != nil {
		f.Close()
		return fmt.Errorf("detach %s: %w", rec.Path, err)
	}
	defer ctl.Close()
	// The open fd pins the binding (a clear by others turns lazy), but re-check
	// under the control lock anyway.
	if err := d.checkAlive(); err != nil {
		f.Close()
		return fmt.Errorf("detach %s: %w", rec.Path, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.teardownLocked(ctx, ctl)
}

// Sweep detaches loop devices whose lo_file_name tag starts with ownerPrefix
// and that orphan reports as abandoned, each with the guarded detach. It
// returns the devices it detached (deferred detaches included).
func Sweep(ctx context.Context, ownerPrefix string, orphan func(Info) bool) ([]Info, error) {
	if ownerPrefix == "" {
		return nil, fmt.Errorf("sweep: empty owner prefix: %w", ErrInvalidArgument)
	}
	all, err := List()
	if err != nil {
		return nil, err
	}
	var done []Info
	var errs []error
	for _, i := range all {
		if !strings.HasPrefix(i.FileName, ownerPrefix) || !orphan(i) {
			continue
		}
		err := DetachRecord(ctx, i.Record())
		switch {
		case err == nil, errors.Is(err, ErrDetachDeferred):
			done = append(done, i)
		case errors.Is(err, ErrGone), errors.Is(err, ErrReused):
		default:
			errs = append(errs, err)
		}
	}
	return done, errors.Join(errs...)
}

// Add creates /dev/loopN with LOOP_CTL_ADD (EEXIST if present), for hosts
// whose /dev lacks nodes or that want a warm pool.
func Add(ctx context.Context, nr int) error {
	ctl, err := openControl(ctx)
	if err != nil {
		return err
	}
	defer ctl.Close()
	if err := unix.IoctlSetInt(int(ctl.Fd()), unix.LOOP_CTL_ADD, nr); err != nil {
		return fmt.Errorf("LOOP_CTL_ADD %d: %w", nr, err)
	}
	_, err = ensureNode("/dev/loop"+strconv.Itoa(nr), nr)
	return err
}

// isLoopDisk reports whether devnum is a whole loop device, not one of its
// partitions (which have no loop/ directory in sysfs).
func isLoopDisk(devnum Devnum) bool {
	_, err := os.Stat(devnum.SysfsDir() + "/loop")
	return err == nil
}
