package loopdev

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

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
		return fmt.Errorf("lock backing %s: %w", b.path, os.NewSyscallError("flock", err))
	}
	return nil
}

const openBase = unix.O_CLOEXEC | unix.O_NONBLOCK | unix.O_NOCTTY

// openBackingPath opens the backing by path (spec 3.2).
func openBackingPath(path string, mode AccessMode, dio bool) (*os.File, error) {
	acc := unix.O_RDWR
	if mode == AccessReadOnly {
		acc = unix.O_RDONLY
	}
	try := func(flags int) (int, error) { return unix.Open(path, openBase|flags, 0) }
	fd, err := -1, error(nil)
	var first error
	if dio {
		fd, err = try(acc | unix.O_DIRECT)
		first = err
	}
	if fd < 0 {
		// O_DIRECT refused (tmpfs, some FUSE): continue buffered.
		fd, err = try(acc)
		if first == nil {
			first = err
		}
	}
	if fd < 0 && mode == AccessAuto && (err == unix.EROFS || err == unix.EACCES || err == unix.EPERM) {
		// Read-only media or bind mounts: fall back to read-only.
		if dio {
			fd, err = try(unix.O_RDONLY | unix.O_DIRECT)
		}
		if fd < 0 {
			fd, err = try(unix.O_RDONLY)
		}
	}
	if fd < 0 {
		_ = err
		return nil, &os.PathError{Op: "open", Path: path, Err: first}
	}
	abs, aerr := filepath.Abs(path)
	if aerr != nil {
		abs = path
	}
	return os.NewFile(uintptr(fd), filepath.Clean(abs)), nil
}

// prepareBacking runs the preamble (spec 3.3) on an opened backing fd, which
// it takes over.
func prepareBacking(f *os.File, opts *Options, dio *bool) (*backing, error) {
	b := &backing{file: f, path: f.Name()}
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return nil, fmt.Errorf("fcntl %s: %w", b.path, err)
	}
	switch {
	case fl&unix.O_PATH != 0, fl&unix.O_ACCMODE == unix.O_WRONLY:
		return nil, fmt.Errorf("backing %s opened O_PATH or write-only: %w", b.path, unix.EBADFD)
	case fl&unix.O_ACCMODE == unix.O_RDONLY:
		if opts.Access == AccessReadWrite {
			return nil, fmt.Errorf("backing %s is read-only but read-write was asked: %w", b.path, unix.EROFS)
		}
		b.readOnly = true
	}
	b.direct = fl&unix.O_DIRECT != 0
	if err := unix.Fstat(int(f.Fd()), &b.st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", b.path, err)
	}
	switch b.st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		b.isBlock = true
		bs, err := unix.IoctlGetUint32(int(f.Fd()), unix.BLKSSZGET)
		if err != nil {
			return nil, fmt.Errorf("BLKSSZGET %s: %w", b.path, err)
		}
		if int32(bs) <= 0 {
			return nil, fmt.Errorf("BLKSSZGET %s: sector size %d: %w", b.path, int32(bs), unix.EIO)
		}
		b.blockSize = bs
		if b.size, err = unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64); err != nil {
			return nil, fmt.Errorf("BLKGETSIZE64 %s: %w", b.path, err)
		}
	case unix.S_IFREG:
		b.size = uint64(b.st.Size)
	case unix.S_IFDIR:
		return nil, invalidf("backing %s is a directory", b.path)
	default:
		return nil, invalidf("backing %s is not a regular file or block device", b.path)
	}
	if b.size < 512 {
		return nil, invalidf("backing %s is %d bytes, less than one 512-byte sector", b.path, b.size)
	}
	if opts.Offset >= b.size || b.size-opts.Offset < 512 {
		return nil, invalidf("offset %d beyond the end of %s (%d bytes)", opts.Offset, b.path, b.size)
	}
	if opts.SectorSize == SectorSizeAuto {
		ss, err := probeGPTSectorSize(f)
		if err != nil {
			return nil, fmt.Errorf("probe sector size of %s: %w", b.path, err)
		}
		opts.SectorSize = ss
	}
	if opts.SectorSize == 0 {
		opts.SectorSize = 512
		if b.isBlock {
			opts.SectorSize = b.blockSize
		}
	}
	// The DIO setting is the master: an O_DIRECT backing fd turns DIO on by
	// itself on newer kernels, which would defeat an explicit "off".
	if b.direct != *dio {
		nf, err := reopen(f, openBase|accFlags(b.readOnly)|directFlag(*dio))
		switch {
		case err != nil && *dio:
			*dio = false // O_DIRECT refused: continue buffered
		case err != nil:
			return nil, fmt.Errorf("reopen %s without O_DIRECT: %w", b.path, err)
		default:
			f.Close()
			b.file, b.direct = nf, *dio
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

// reopenBuffered replaces the backing fd by one without O_DIRECT, after the
// kernel refused direct I/O (restart buffered from get-free, spec 3.4 step 7).
func (b *backing) reopenBuffered() error {
	nf, err := reopen(b.file, openBase|accFlags(b.readOnly))
	if err != nil {
		return fmt.Errorf("reopen %s without O_DIRECT: %w", b.path, err)
	}
	b.file.Close()
	b.file, b.direct = nf, false
	return b.lockFile()
}

// probeGPTSectorSize looks for "EFI PART" at the offsets a GPT header sits at
// for 512..4096-byte sectors, through a buffered read-only reopen (O_DIRECT
// has alignment rules).
func probeGPTSectorSize(f *os.File) (uint32, error) {
	head, err := readHead(f, 8192)
	if err != nil {
		return 0, err
	}
	var found uint32
	for _, ss := range []uint32{512, 1024, 2048, 4096} {
		if int(ss)+8 <= len(head) && bytes.Equal(head[ss:ss+8], []byte("EFI PART")) {
			if found != 0 {
				return 0, fmt.Errorf("GPT headers for sector sizes %d and %d: %w", found, ss, unix.ENOTUNIQ)
			}
			found = ss
		}
	}
	return found, nil
}

// hasPartitionTable reports whether a GPT or a DOS (MBR) table is present. A
// probe failure counts as "has a table" (fail-safe for untrusted images).
func hasPartitionTable(f *os.File) bool {
	head, err := readHead(f, 8192)
	if err != nil {
		return true
	}
	for _, ss := range []int{512, 1024, 2048, 4096} {
		if ss+8 <= len(head) && bytes.Equal(head[ss:ss+8], []byte("EFI PART")) {
			return true
		}
	}
	if len(head) >= 512 && head[510] == 0x55 && head[511] == 0xAA {
		for i := 0; i < 4; i++ {
			e := head[446+16*i : 446+16*(i+1)]
			if e[4] != 0 && (e[0] == 0 || e[0] == 0x80) {
				return true
			}
		}
	}
	return false
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
