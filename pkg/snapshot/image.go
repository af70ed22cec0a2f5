package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// blockSize is the ext4 block size of every image and the loop device's
// logical block size: ext4 with 1 KiB blocks does not mount on a 4 KiB loop
// device, and mke2fs picks 1 KiB for images below 512 MiB unless told.
const blockSize = 4096

// ext4Features is pinned so images do not depend on the host's mke2fs.conf
// and stay mountable by older kernels.
const ext4Features = "none,has_journal,ext_attr,resize_inode,dir_index,filetype,extent,flex_bg," +
	"sparse_super,large_file,huge_file,dir_nlink,extra_isize,64bit,metadata_csum"

// cloneMethod says how an image was copied.
type cloneMethod string

const (
	cloneReflink cloneMethod = "reflink"
	cloneSparse  cloneMethod = "sparse"
)

// mkfsOptions are the mke2fs options of a container filesystem of size
// bytes, pinned so that images do not depend on the host's mke2fs.conf (its
// "small" type gives a 256 MiB filesystem 1 KiB blocks and four times the
// inodes) and so that the usable space is close to the size asked for:
//   - -m 0: no blocks reserved for root; nothing in a container needs them.
//   - a journal of 1/64 of the size, 4 MiB to 64 MiB (mke2fs would take
//     16 MiB, 6% of a 256 MiB label); from 1 GiB on this is mke2fs's own
//     choice.
//   - one 256-byte inode per 16 KiB: 1.6% of the size, room for the small
//     files of distribution images.
//
// Layered mode formats its upper filesystems with the same options
// (features without resize_inode).
func mkfsOptions(size int64, features string) []string {
	journalMiB := min(max(size/64>>20, 4), 64)
	return []string{
		"-b", strconv.Itoa(blockSize), "-m", "0", "-i", "16384", "-I", "256",
		"-J", "size=" + strconv.FormatInt(journalMiB, 10), "-O", features,
		"-E", "root_owner=0:0,lazy_journal_init=1",
	}
}

// makeTemplate creates an empty ext4 image of size bytes at path: root
// directory 0755 owned by 0:0, no lost+found (the conformance suite compares
// a fresh snapshot with an empty directory).
func makeTemplate(ctx context.Context, path string, size int64) error {
	if err := createSized(path, size); err != nil {
		return err
	}
	// lazy_journal_init: the journal lies in holes of a new sparse file,
	// which read as zeros, so mke2fs need not write it. Discard stays on:
	// for a file it punches holes, so mke2fs marks the inode tables zeroed
	// and the kernel's lazyinit thread never writes them.
	args := append([]string{"-q", "-F", "-t", "ext4"}, mkfsOptions(size, ext4Features)...)
	if err := run(ctx, "mkfs.ext4", append(args, path)...); err != nil {
		return err
	}
	// debugfs edits the image offline; no mount, no loop device needed.
	if err := run(ctx, "debugfs", "-w", "-R", "rmdir lost+found", path); err != nil {
		return err
	}
	return syncPath(path)
}

// createSized creates a new sparse file of size bytes.
func createSized(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create template %s: %w", path, err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("size template %s: %w", path, err)
	}
	return nil
}

// cloneImage copies src to a new file dst: FICLONE where the filesystem
// shares extents (XFS reflink=1, btrfs), else a sparse copy. Never a plain
// copy: copy_file_range over holes fills them on ext4 (containerd #12956).
func cloneImage(src, dst string) (cloneMethod, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", fmt.Errorf("open clone source: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("create clone: %w", err)
	}
	method, err := cloneFile(in, out)
	if err == nil {
		// The image must be durable before the record naming it commits.
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		return "", fmt.Errorf("clone %s to %s: %w", src, dst, err)
	}
	return method, nil
}

func cloneFile(in, out *os.File) (cloneMethod, error) {
	err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd()))
	if err == nil {
		return cloneReflink, nil
	}
	// EOPNOTSUPP (ext4, tmpfs), EXDEV (other filesystem), EINVAL (unaligned
	// or unsupported by this fs): fall back to the sparse copy.
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EXDEV) &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return "", fmt.Errorf("FICLONE: %w", err)
	}
	return cloneSparse, sparseCopy(in, out)
}

// sparseCopy copies only the data extents of in (SEEK_DATA/SEEK_HOLE),
// leaving holes in out.
func sparseCopy(in, out *os.File) error {
	st, err := in.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if err := out.Truncate(size); err != nil {
		return err
	}
	ifd, ofd := int(in.Fd()), int(out.Fd())
	var off int64
	for off < size {
		data, err := unix.Seek(ifd, off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) {
				return nil // no more data after off
			}
			return fmt.Errorf("SEEK_DATA: %w", err)
		}
		hole, err := unix.Seek(ifd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("SEEK_HOLE: %w", err)
		}
		for pos := data; pos < hole; {
			roff, woff := pos, pos
			n, err := unix.CopyFileRange(ifd, &roff, ofd, &woff, int(min(hole-pos, 1<<30)), 0)
			if err != nil {
				return fmt.Errorf("copy_file_range: %w", err)
			}
			if n == 0 {
				return fmt.Errorf("copy_file_range: %w", io.ErrUnexpectedEOF)
			}
			pos += int64(n)
		}
		off = hole
	}
	return nil
}

// growImage enlarges the image file and its filesystem offline.
func growImage(ctx context.Context, path string, size int64) error {
	if err := os.Truncate(path, size); err != nil {
		return fmt.Errorf("grow %s: %w", path, err)
	}
	// resize2fs refuses a filesystem mounted since its last check
	// (s_lastcheck < s_mtime) and asks for e2fsck -f, which would re-create
	// lost+found. The image was unmounted cleanly and its journal replayed
	// at Commit, so only the check time is updated; resize2fs still refuses
	// a filesystem marked with errors.
	if err := run(ctx, "tune2fs", "-T", "now", path); err != nil {
		return err
	}
	if err := run(ctx, "resize2fs", path, strconv.FormatInt(size/1024, 10)+"K"); err != nil {
		return err
	}
	return syncPath(path)
}

// shrinkImage shrinks the filesystem and the image file offline to size
// (about 0.7 s for 150 MiB of data in a 10 GiB image). The image is a
// staging clone of a committed parent, which Commit proved clean, so
// resize2fs is forced past its own conservative minimum estimate
// (resize2fs -P) and past its "run e2fsck -f first" check, whose e2fsck -f
// would re-create lost+found: whether the content fits is what the resize
// itself finds out, and a read-only e2fsck -f then proves the result
// consistent. If the content does not fit, the error matches
// errdefs.ErrInvalidArgument; the clone is discarded either way.
func shrinkImage(ctx context.Context, path string, size int64) error {
	if err := run(ctx, "resize2fs", "-f", path, strconv.FormatInt(size/1024, 10)+"K"); err != nil {
		if ctx.Err() != nil {
			return err
		}
		est := ""
		if min, eerr := minimumSize(ctx, path); eerr == nil {
			est = fmt.Sprintf(" (resize2fs estimates %d)", min)
		}
		return fmt.Errorf("filesystem content does not fit in %d bytes%s: %w: %v", size, est, errdefs.ErrInvalidArgument, err)
	}
	if err := run(ctx, "e2fsck", "-f", "-n", path); err != nil {
		return fmt.Errorf("shrunk filesystem is inconsistent: %w", err)
	}
	// resize2fs truncates a regular file it shrinks; make sure of it.
	if err := os.Truncate(path, size); err != nil {
		return err
	}
	return syncPath(path)
}

// minimumSize is resize2fs's estimate of the smallest size the content
// fits in (conservative: the real minimum is often lower).
func minimumSize(ctx context.Context, path string) (int64, error) {
	out, err := exec.CommandContext(ctx, "resize2fs", "-P", path).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("resize2fs -P %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "Estimated minimum size of the filesystem: "); ok {
			blocks, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, err
			}
			return blocks * blockSize, nil
		}
	}
	return 0, fmt.Errorf("resize2fs -P %s: no estimate in %q", path, out)
}

// allocated returns the bytes the file occupies on disk (st_blocks × 512).
func allocated(path string) (int64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return st.Blocks * 512, nil
}

func syncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	return nil
}

// run executes an external tool and includes its output in the error.
func run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}
