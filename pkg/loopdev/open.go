package loopdev

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// OpenOptions describes how to open an existing device.
type OpenOptions struct {
	Access AccessMode // Auto and ReadWrite open read-write; ReadOnly read-only
	// Lock is the lock to take on the device once open.
	Lock LockState
	// LockNonBlocking makes a held lock fail with EWOULDBLOCK.
	LockNonBlocking bool
	// ExpectDiskSeq, when not 0, is the diskseq the device must have; a
	// mismatch is ErrReused.
	ExpectDiskSeq uint64
	// ExpectBacking, when not nil, is the backing the device must be bound
	// to; a mismatch is ErrReused.
	ExpectBacking *BackingID
	// Logger receives debug records of this handle; nil logs nothing.
	Logger *slog.Logger
}

// Open opens an existing block device through O_PATH and a reopen (never a
// dup), checking devnum and, when given, diskseq and backing. The handle is
// not owned: Detach releases it and returns
// ErrNotOwned until Unrelinquish.
func Open(ctx context.Context, path string, opts OpenOptions) (*Device, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, opError("open", path, err)
	}
	devnum, err := devnumOfNode(real)
	if err != nil {
		return nil, opError("open", real, err)
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
	d := &Device{file: f, path: real, nr: -1, devnum: devnum, readOnly: acc == unix.O_RDONLY, log: opts.Logger,
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

// Info describes a bound loop device as sysfs shows it. List and
// FindByBacking read sysfs only, so Backing is zero in List's results and
// FileName is empty in both: Inspect fills them.
type Info struct {
	Path        string    `json:"path"`         // /dev/loopN
	Nr          int       `json:"nr"`           // N
	Devnum      Devnum    `json:"devnum"`       // major:minor
	DiskSeq     uint64    `json:"diskseq"`      // 0 on kernels without diskseq
	BackingFile string    `json:"backing_file"` // sysfs text, namespace-relative
	Deleted     bool      `json:"deleted"`      // backing file was unlinked
	Backing     BackingID `json:"backing"`      // zero unless Inspect or FindByBacking filled it
	Offset      uint64    `json:"offset"`       // bytes into the backing
	SizeLimit   uint64    `json:"sizelimit"`    // bytes; 0 = to the end
	Autoclear   bool      `json:"autoclear"`    // unbinds at the last close
	ReadOnly    bool      `json:"read_only"`    // read-only device
	Partscan    bool      `json:"partscan"`     // the kernel scans its partition table
	DirectIO    bool      `json:"direct_io"`    // direct I/O to the backing
	FileName    string    `json:"file_name"`    // lo_file_name owner tag; empty unless Inspect filled it
}

// Record turns an Info into a record for DetachRecord.
func (i Info) Record() Record {
	return Record{Path: i.Path, Devnum: i.Devnum, DiskSeq: i.DiskSeq, Backing: i.Backing, Offset: i.Offset}
}

// ListFilter decides, for each bound device List finds, whether to leave it
// out (skip) and whether to end the listing after it (stop).
type ListFilter func(Info) (skip, stop bool)

// List returns the bound loop devices that filter keeps (all of them when
// filter is nil), reading sysfs only: it never opens a device (an open by
// us would turn its owner's concurrent LOOP_CLR_FD into a lazy autoclear)
// nor stats a backing path (one on a hung FUSE or NFS mount would hang us).
// Devices being torn down while it runs are skipped.
func List(filter ListFilter) ([]Info, error) {
	dirs, err := filepath.Glob("/sys/block/loop*")
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, dir := range dirs {
		i, ok := inspectSysfs(dir)
		if !ok {
			continue
		}
		skip, stop := false, false
		if filter != nil {
			skip, stop = filter(i)
		}
		if !skip {
			out = append(out, i)
		}
		if stop {
			break
		}
	}
	return out, nil
}

// inspectSysfs reads one loop device from sysfs; ok is false when it is
// unbound or vanished.
func inspectSysfs(sysdir string) (Info, bool) {
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
	return i, true
}

// Inspect completes an Info from List with what only the device itself
// knows: the backing's (st_dev, st_ino) and the lo_file_name owner tag. It
// opens the device read-only (no IN_CLOSE_WRITE for udev) after checking
// devnum and diskseq, so call it only on devices that are yours, or as an
// administrator who accepts that the open makes a concurrent detach by the
// owner lazy. It returns ErrGone or ErrReused when the attachment changed.
func Inspect(i Info) (Info, error) {
	f, err := openVerified(i.Path, i.Devnum, i.DiskSeq, unix.O_RDONLY, false)
	if err != nil {
		if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
			return i, fmt.Errorf("inspect %s: %v: %w", i.Path, err, ErrGone)
		}
		return i, fmt.Errorf("inspect %s: %w", i.Path, err)
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err == unix.ENXIO {
		return i, fmt.Errorf("inspect %s: unbound: %w", i.Path, ErrGone)
	}
	if err != nil {
		return i, fmt.Errorf("inspect %s: LOOP_GET_STATUS64: %w", i.Path, err)
	}
	i.Backing = BackingID{Dev: info.Device, Ino: info.Inode}
	i.FileName = cString(info.File_name[:])
	return i, nil
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

// FindByBacking returns every binding of the file the caller knows as path
// with identity id (a file may be attached several times), reading sysfs
// only. A binding matches when sysfs names the same path, not deleted:
// after the caller's path still resolves to id, the file bound under that
// name is that inode (a replaced file shows as " (deleted)" or under its
// new name). It stats the caller's own path, never another device's
// backing (one on a hung FUSE or NFS mount would hang every caller), and
// opens no device. The results carry Backing = id.
func FindByBacking(path string, id BackingID) ([]Info, error) {
	want, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("find bindings of %s: %w", path, err)
	}
	if r, err := filepath.EvalSymlinks(want); err == nil {
		want = r
	}
	var st unix.Stat_t
	if err := unix.Stat(want, &st); err != nil {
		if err == unix.ENOENT {
			return nil, nil
		}
		return nil, fmt.Errorf("find bindings of %s: %w", path, &os.PathError{Op: "stat", Path: want, Err: err})
	}
	if (BackingID{Dev: devOfStat(&st), Ino: st.Ino}) != id {
		return nil, nil // path names another file now: none of its bindings is id's
	}
	out, err := List(func(i Info) (bool, bool) { return i.Deleted || i.BackingFile != want, false })
	for k := range out {
		out[k].Backing = id
	}
	return out, err
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
// attachment. With exclusive the open is O_EXCL, which fails with
// EBUSY (ErrInUse) while a filesystem is mounted from the device.
func openRecord(rec Record, exclusive bool) (*os.File, error) {
	// A zero identity would match whatever is bound there now, a foreign
	// losetup binding included.
	if rec.DiskSeq == 0 && rec.Backing == (BackingID{}) {
		return nil, invalidf("record of %s has neither a diskseq nor a backing identity", rec.Path)
	}
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
		// Without diskseq the backing identity and offset are the identity;
		// a record that has none cannot be checked, so it matches nothing.
		if rec.Backing == (BackingID{}) {
			f.Close()
			return nil, invalidf("%s: diskseq unsupported and the record has no backing identity", rec.Path)
		}
		if (BackingID{Dev: info.Device, Ino: info.Inode}) != rec.Backing || info.Offset != rec.Offset {
			f.Close()
			return nil, fmt.Errorf("%s bound to another file (diskseq unsupported): %w", rec.Path, ErrReused)
		}
	}
	return f, nil
}

// DetachRecord is the guarded detach by name: it detaches the device only
// if it still carries the recorded attachment, on the very fd it verified,
// with the variants of opts. Results: nil (detached), ErrGone (absent or
// unbound: nothing to do), ErrReused (someone else's binding now:
// untouched), ErrDetachDeferred (cleared, still held; unbinds at the last
// close), ErrInUse (opts.Exclusive and mounted: untouched).
func DetachRecord(ctx context.Context, rec Record, opts DetachOptions) error {
	f, err := openRecord(rec, opts.Exclusive)
	if err != nil {
		return fmt.Errorf("detach %s: %w", rec.Path, err)
	}
	nr := -1
	if n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(rec.Path), "loop")); err == nil {
		nr = n
	}
	d := &Device{file: f, path: rec.Path, nr: nr, devnum: rec.Devnum, diskseq: rec.DiskSeq,
		backing: rec.Backing, offset: rec.Offset, created: true, owned: true, remove: opts.RemoveDevice, log: opts.Logger}
	if d.diskseq == 0 {
		d.diskseq, _ = getDiskseq(f.Fd())
	}
	// The backing path as sysfs names it now, while our verified fd pins the
	// binding: without diskseq it is what tells our binding from a later one.
	if bf, err := readAttr(rec.Devnum.SysfsDir() + "/loop/backing_file"); err == nil {
		d.backingPath, _ = splitDeleted(bf)
	}
	d.mu.Lock()
	err = d.teardownLocked(ctx)
	d.mu.Unlock()
	if opts.Wait && errors.Is(err, ErrDetachDeferred) {
		return d.awaitUnbind(ctx)
	}
	return err
}

// Sweep detaches the loop devices backed by files under backingDir whose
// lo_file_name tag starts with ownerPrefix and that orphan reports as
// abandoned, each with the guarded detach. Only devices whose sysfs
// backing_file lies under backingDir are opened (to read the tag), so other
// owners' devices are never touched. It returns the devices it detached
// (deferred detaches included).
func Sweep(ctx context.Context, backingDir, ownerPrefix string, orphan func(Info) bool) ([]Info, error) {
	if ownerPrefix == "" || backingDir == "" {
		return nil, fmt.Errorf("sweep: empty owner prefix or backing directory: %w", ErrInvalidArgument)
	}
	dir, err := filepath.Abs(backingDir)
	if err != nil {
		return nil, fmt.Errorf("sweep: %w", err)
	}
	dir = filepath.Clean(dir)
	all, err := List(func(i Info) (bool, bool) {
		return !strings.HasPrefix(i.BackingFile, dir+"/"), false
	})
	if err != nil {
		return nil, err
	}
	var done []Info
	var errs []error
	for _, i := range all {
		i, err := Inspect(i)
		if err != nil || !strings.HasPrefix(i.FileName, ownerPrefix) || !orphan(i) {
			continue
		}
		err = DetachRecord(ctx, i.Record(), DetachOptions{})
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

// isLoopDisk reports whether devnum is a whole loop device, not one of its
// partitions (which have no loop/ directory in sysfs).
func isLoopDisk(devnum Devnum) bool {
	_, err := os.Stat(devnum.SysfsDir() + "/loop")
	return err == nil
}
