package loopdev

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/ptable"
	"golang.org/x/sys/unix"
)

// backing is the opened file behind a future loop device.
type backing struct {
	file      *os.File
	path      string
	readOnly  bool
	direct    bool // fd has O_DIRECT
	isBlock   bool
	size      uint64
	st        unix.Stat_t
	blockSize uint32 // device's logical block size for block backings
	lock      LockState
}

// lockFile takes the requested flock on the fd the kernel will hold.
func (b *backing) lockFile() error {
	if b.lock == LockNone {
		return nil
	}
	if err := unix.Flock(int(b.file.Fd()), lockHow(b.lock)|unix.LOCK_NB); err != nil {
		return fmt.Errorf("lock backing: %w", os.NewSyscallError("flock", err))
	}
	return nil
}

const openBase = unix.O_CLOEXEC | unix.O_NONBLOCK | unix.O_NOCTTY

// openBackingPath opens the backing by path, with O_DIRECT first when dio
// is wanted. An error names the buffered attempt: O_DIRECT's own refusal
// (EINVAL on tmpfs or some FUSE) would hide the real EPERM or EROFS.
func openBackingPath(path string, mode AccessMode, dio bool) (*os.File, error) {
	acc := unix.O_RDWR
	if mode == AccessReadOnly {
		acc = unix.O_RDONLY
	}
	try := func(acc int) (int, error) {
		if dio {
			if fd, err := unix.Open(path, openBase|acc|unix.O_DIRECT, 0); err == nil {
				return fd, nil
			}
		}
		// O_DIRECT refused: continue buffered.
		return unix.Open(path, openBase|acc, 0)
	}
	fd, err := try(acc)
	if err != nil && mode == AccessAuto && (err == unix.EROFS || err == unix.EACCES || err == unix.EPERM) {
		// Read-only media or bind mounts: fall back to read-only, and on
		// failure report the read-write refusal that started it.
		var rerr error
		if fd, rerr = try(unix.O_RDONLY); rerr == nil {
			err = nil
		}
	}
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	abs, aerr := filepath.Abs(path)
	if aerr != nil {
		abs = path
	}
	return os.NewFile(uintptr(fd), filepath.Clean(abs)), nil
}

// prepareBacking checks and sizes an opened backing fd (mode, type, size,
// sector size, O_DIRECT to match the DIO setting), which
// it takes over.
func prepareBacking(f *os.File, opts *Options, dio *bool) (*backing, error) {
	b := &backing{file: f, path: f.Name()}
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return nil, fmt.Errorf("fcntl: %w", err)
	}
	switch {
	case fl&unix.O_PATH != 0, fl&unix.O_ACCMODE == unix.O_WRONLY:
		return nil, fmt.Errorf("opened O_PATH or write-only: %w", unix.EBADFD)
	case fl&unix.O_ACCMODE == unix.O_RDONLY:
		if opts.Access == AccessReadWrite {
			return nil, fmt.Errorf("read-only, but read-write was asked: %w", unix.EROFS)
		}
		b.readOnly = true
	}
	b.direct = fl&unix.O_DIRECT != 0
	if err := unix.Fstat(int(f.Fd()), &b.st); err != nil {
		return nil, fmt.Errorf("stat: %w", err)
	}
	switch b.st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		b.isBlock = true
		bs, err := unix.IoctlGetUint32(int(f.Fd()), unix.BLKSSZGET)
		if err != nil {
			return nil, fmt.Errorf("BLKSSZGET: %w", err)
		}
		if int32(bs) <= 0 {
			return nil, fmt.Errorf("BLKSSZGET: sector size %d: %w", int32(bs), unix.EIO)
		}
		b.blockSize = bs
		if b.size, err = unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64); err != nil {
			return nil, fmt.Errorf("BLKGETSIZE64: %w", err)
		}
	case unix.S_IFREG:
		b.size = uint64(b.st.Size)
	case unix.S_IFDIR:
		return nil, invalidf("a directory")
	default:
		return nil, invalidf("not a regular file or block device")
	}
	if b.size < 512 {
		return nil, invalidf("%d bytes, less than one 512-byte sector", b.size)
	}
	if opts.Offset >= b.size || b.size-opts.Offset < 512 {
		return nil, invalidf("offset %d beyond the end (%d bytes)", opts.Offset, b.size)
	}
	if opts.SectorSize == SectorSizeAuto {
		ss, err := probeGPTSectorSize(f)
		if err != nil {
			return nil, fmt.Errorf("probe sector size: %w", err)
		}
		opts.SectorSize = ss
	}
	if opts.SectorSize == 0 {
		opts.SectorSize = 512
		if b.isBlock {
			opts.SectorSize = b.blockSize
		}
	}
	if expectedSize(b.size, opts.Offset, opts.Size, opts.SectorSize) == 0 {
		return nil, invalidf("less than one %d-byte logical block past offset %d", opts.SectorSize, opts.Offset)
	}
	// The DIO setting is the master: an O_DIRECT backing fd turns DIO on by
	// itself on newer kernels, which would defeat an explicit "off".
	if b.direct != *dio {
		err := setDirect(b.file, *dio)
		switch {
		case err != nil && *dio:
			*dio = false // O_DIRECT refused: continue buffered
		case err != nil:
			return nil, fmt.Errorf("clear O_DIRECT: %w", err)
		default:
			b.direct = *dio
		}
	}
	return b, nil
}

func directFlag(on bool) int {
	if on {
		return unix.O_DIRECT
	}
	return 0
}

func accFlags(readOnly bool) int {
	if readOnly {
		return unix.O_RDONLY
	}
	return unix.O_RDWR
}

// setDirect turns O_DIRECT on or off on f's open file description with
// F_SETFL, which keeps the description (and its BackingLock) instead of
// opening a new one.
func setDirect(f *os.File, on bool) error {
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return os.NewSyscallError("fcntl", err)
	}
	fl &^= unix.O_DIRECT
	fl |= directFlag(on)
	if _, err := unix.FcntlInt(f.Fd(), unix.F_SETFL, fl); err != nil {
		return os.NewSyscallError("fcntl", err)
	}
	return nil
}

// dropDirect turns O_DIRECT off after the kernel refused direct I/O
// (restart buffered from get-free). It keeps the open file description: a
// device cleared lazily may still hold it, and a new one would have to take
// the BackingLock again, against that very device.
func (b *backing) dropDirect() error {
	if err := setDirect(b.file, false); err != nil {
		return fmt.Errorf("clear O_DIRECT: %w", err)
	}
	b.direct = false
	return nil
}

// probeGPTSectorSize reads the GPT sector size from the backing's head,
// through a buffered read-only reopen (O_DIRECT has alignment rules).
func probeGPTSectorSize(f *os.File) (uint32, error) {
	head, err := readHead(f, 8192)
	if err != nil {
		return 0, err
	}
	ss, err := ptable.GPTSectorSize(head)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", err, unix.ENOTUNIQ)
	}
	return ss, nil
}

// hasPartitionTable reports whether a GPT or a DOS (MBR) table is present. A
// probe failure counts as "has a table" (fail-safe for untrusted images).
func hasPartitionTable(f *os.File) bool {
	head, err := readHead(f, 8192)
	return err != nil || ptable.HasTable(head)
}

func readHead(f *os.File, n int) ([]byte, error) {
	r, err := reopen(f, openBase|unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	buf := make([]byte, n)
	m, err := io.ReadFull(r, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return buf[:m], nil
}
