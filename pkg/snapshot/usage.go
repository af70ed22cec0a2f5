package snapshot

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// Usage of a flat-mode snapshot (docs/operations.md, "What Usage means"):
//
//   - Size is the bytes of the image file that no other file shares: on a
//     backing filesystem with reflink (XFS reflink=1, btrfs) the blocks
//     written since the clone, overwrites of the parent's blocks included;
//     on one without (ext4: a sparse copy) every allocated block, since the
//     copy shares nothing. Summed over snapshots it is the disk they use.
//   - Inodes is the inodes in use beyond the parent's: from statfs of the
//     mounted filesystem while mounted (the on-disk counters are updated
//     only when the kernel writes the superblock), else from the
//     superblock.
//
// A committed snapshot keeps the values measured at Commit.

// FS_IOC_FIEMAP and its structures (linux/fiemap.h); x/sys has no wrapper.
const (
	fsIocFiemap        = 0xC020660B
	fiemapExtentLast   = 0x1
	fiemapExtentShared = 0x2000
	fiemapHeaderSize   = 32
	fiemapExtentSize   = 56
	fiemapBatch        = 256
)

// unsharedBytes sums the lengths of the file's extents not shared with
// another file (FIEMAP_EXTENT_SHARED clear).
func unsharedBytes(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, fiemapHeaderSize+fiemapBatch*fiemapExtentSize)
	le := binary.LittleEndian
	var start, total uint64
	for {
		clear(buf[:fiemapHeaderSize])
		le.PutUint64(buf[0:], start)
		le.PutUint64(buf[8:], ^uint64(0)-start) // to the end of the file
		le.PutUint32(buf[24:], fiemapBatch)     // fm_extent_count
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			if errno == unix.EOPNOTSUPP || errno == unix.ENOTTY {
				// No FIEMAP (tmpfs), so no shared extents either.
				return allocated(path)
			}
			return 0, &os.PathError{Op: "FIEMAP", Path: path, Err: errno}
		}
		n := le.Uint32(buf[20:]) // fm_mapped_extents
		if n == 0 {
			return int64(total), nil
		}
		for i := range n {
			e := buf[fiemapHeaderSize+int(i)*fiemapExtentSize:]
			logical, length, flags := le.Uint64(e[0:]), le.Uint64(e[16:]), le.Uint32(e[40:])
			if flags&fiemapExtentShared == 0 {
				total += length
			}
			start = logical + length
			if flags&fiemapExtentLast != 0 {
				return int64(total), nil
			}
		}
	}
}

// usedInodes is the inodes in use in image: statfs of mnt, the filesystem
// mounted from its device, if given, else the superblock.
func usedInodes(image, mnt string) (int64, error) {
	if mnt != "" {
		var st unix.Statfs_t
		if err := unix.Statfs(mnt, &st); err == nil {
			return int64(st.Files) - int64(st.Ffree), nil
		}
	}
	sb, err := readSuperblock(image)
	if err != nil {
		return 0, err
	}
	return sb.UsedInodes(), nil
}

// mountPoints maps each block device mounted in this mount namespace to
// one of its mount points.
func mountPoints() map[loopdev.Devnum]string {
	mounts, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil
	}
	out := map[loopdev.Devnum]string{}
	for _, m := range mounts {
		d := loopdev.Devnum(unix.Mkdev(uint32(m.Major), uint32(m.Minor)))
		if _, ok := out[d]; !ok {
			out[d] = m.Mountpoint
		}
	}
	return out
}

// imageUsage measures image (a snapshot on top of the image parent, or of
// nothing); mnt is where its filesystem is mounted, if known.
func imageUsage(image, parent, mnt string) (snapshots.Usage, error) {
	size, err := unsharedBytes(image)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", image, err)
	}
	inodes, err := usedInodes(image, mnt)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of %s: %w", image, err)
	}
	if parent != "" {
		if sb, err := readSuperblock(parent); err == nil {
			inodes -= sb.UsedInodes()
		}
	}
	return snapshots.Usage{Size: size, Inodes: max(inodes, 0)}, nil
}
