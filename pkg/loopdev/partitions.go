package loopdev

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Partition is one partition of a loop device, as sysfs shows it.
type Partition struct {
	Nr     int    // partition number, N of /dev/loopXpN
	Path   string // /dev/loopXpN
	Devnum Devnum // major:minor of the partition
	Start  uint64 // bytes
	Size   uint64 // bytes
}

// listPartitions enumerates the sub-directories of the disk's sysfs
// directory dir that carry a "partition" file. name is the disk's kernel
// name (loop7) when the caller knows it, else "" and it is read from sysfs.
func listPartitions(dir, name string) ([]Partition, error) {
	fd, err := openDir(dir)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return listPartitionsAt(fd, dir, name)
}

// openDir opens a sysfs directory for getdents and openat.
func openDir(dir string) (int, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return fd, nil
}

// listPartitionsAt is listPartitions on dir already opened as dirfd.
func listPartitionsAt(dirfd int, dir, name string) ([]Partition, error) {
	// Partitions are the sub-directories named <disk>p<N> (loop7p1); matching
	// the name first spares a failed open per attribute file of the disk.
	if name == "" {
		link, err := os.Readlink(dir) // /sys/dev/block/M:m -> ../../devices/.../loopN
		if err != nil {
			return nil, err
		}
		name = filepath.Base(link)
	}
	names, err := readDirNames(dirfd, dir, name+"p")
	if err != nil {
		return nil, err
	}
	var out []Partition
	for _, name := range names {
		sub := filepath.Join(dir, name)
		pn, err := readAttrUint(filepath.Join(sub, "partition"))
		if err != nil {
			continue
		}
		p := Partition{Nr: int(pn), Path: "/dev/" + name}
		p.Devnum, _ = readSysfsDevnum(filepath.Join(sub, "dev"))
		if s, err := readAttrUint(filepath.Join(sub, "start")); err == nil {
			p.Start = s * 512
		}
		if s, err := readAttrUint(filepath.Join(sub, "size")); err == nil {
			p.Size = s * 512
		}
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Nr < out[j].Nr })
	return out, nil
}

// readDirNames lists the entries of the directory open as fd (dir names it
// in errors) whose names start with prefix, with raw getdents (see
// readAttr for why) and without a string for every other entry (a loop
// disk's directory has about 28). It reads until getdents returns 0: a
// short read is not the end in sysfs (stopping at the first read that left
// room lost partitions in R10).
func readDirNames(fd int, dir, prefix string) ([]string, error) {
	var names []string
	var buf [8192]byte
	for {
		n, err := unix.ReadDirent(fd, buf[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &os.PathError{Op: "getdents", Path: dir, Err: err}
		}
		if n <= 0 {
			return names, nil
		}
		// struct linux_dirent64: d_ino (8), d_off (8), d_reclen (2),
		// d_type (1), then the NUL-terminated name.
		for b := buf[:n]; len(b) >= 19; {
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < 19 || reclen > len(b) {
				return nil, &os.PathError{Op: "getdents", Path: dir, Err: unix.EIO}
			}
			name := b[19:reclen]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			if bytes.HasPrefix(name, []byte(prefix)) {
				names = append(names, string(name))
			}
			b = b[reclen:]
		}
	}
}

// deletePartitions removes every partition synchronously with BLKPG, so the
// next user of the number sees none. It returns how many it found.
func deletePartitions(f *os.File, dir, name string) (int, error) {
	fd, err := openDir(dir)
	if os.IsNotExist(err) {
		return 0, unix.ENODEV
	} else if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return deletePartitionsAt(f, fd, dir, name)
}

// deletePartitionsAt is deletePartitions on dir already opened as dirfd.
func deletePartitionsAt(f *os.File, dirfd int, dir, name string) (int, error) {
	parts, err := listPartitionsAt(dirfd, dir, name)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, unix.ENODEV
		}
		return 0, err
	}
	var first error
	for _, p := range parts {
		btrfsForget(p.Path)
		err := blkpg(f, unix.BLKPG_DEL_PARTITION, &unix.BlkpgPartition{Pno: int32(p.Nr)})
		if err != nil && err != unix.ENODEV && first == nil { // ENODEV: the kernel removed it first
			first = fmt.Errorf("BLKPG_DEL_PARTITION %s: %w", p.Path, err)
		}
	}
	return len(parts), first
}

// btrfsForget tells btrfs to drop its cached device for a partition about to
// be deleted. btrfs remembers every device it scanned per filesystem UUID;
// a stale entry for a deleted partition makes a later mount of another copy
// of that filesystem (a new attachment of the same image) pick the dead
// path or fail. BTRFS_IOC_FORGET_DEV came with kernel commit 228a73abde5c
// ("btrfs: introduce new ioctl to unregister a btrfs device"); systemd's
// block_device_remove_partition issues it for the same reason. Best effort.
func btrfsForget(node string) {
	fd, err := unix.Open("/dev/btrfs-control", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	// struct btrfs_ioctl_vol_args { __s64 fd; char name[4088]; }
	var args struct {
		fd   int64
		name [4088]byte
	}
	copy(args.name[:], node)
	_, _, _ = unix.Syscall(unix.SYS_IOCTL, uintptr(fd), btrfsIocForgetDev, uintptr(unsafe.Pointer(&args)))
}

// effectivePartscan decides whether the kernel scans partitions of a disk
// (max_part, GENHD_FL_NO_PART, the partscan attribute); these files
// changed meaning in 5.17, 5.19, 6.3 and 6.10.
func effectivePartscan(disk Devnum) bool {
	dir := disk.SysfsDir()
	if v, err := readAttr(dir + "/partscan"); err == nil { // 6.10+, 6.6 backports
		return v == "1"
	}
	if _, err := os.Stat(dir + "/partition"); err == nil {
		return false
	}
	if v, err := readAttr(dir + "/loop/partscan"); err == nil && v == "0" { // 5.19+
		return false
	}
	if v, err := readAttrUint(dir + "/ext_range"); err == nil && v <= 1 {
		return false
	}
	if c, err := readAttr(dir + "/capability"); err == nil {
		if v, err := strconv.ParseUint(strings.TrimSpace(c), 16, 64); err == nil && v&0x204 != 0 {
			return false
		}
	}
	return true
}

// enablePartscan turns partscan on after the attach. LOOP_CONFIGURE
// with PARTSCAN emits a change uevent before rereading partitions; a udev
// open in that window scans twice and partitions flap. A read-only open and
// close drains the pending scan state first (no IN_CLOSE_WRITE for udev).
func enablePartscan(d *Device) error {
	drain, err := reopenOFD(d.file, openBase|unix.O_RDONLY)
	if err != nil {
		return err
	}
	drain.Close()
	fd := int(d.file.Fd())
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return fmt.Errorf("LOOP_GET_STATUS64 %s: %w", d.path, err)
	}
	info.Flags |= unix.LO_FLAGS_PARTSCAN
	info.Flags &= unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_PARTSCAN
	if err := unix.IoctlLoopSetStatus64(fd, info); err != nil {
		return fmt.Errorf("enable partscan on %s: %w", d.path, err)
	}
	if !effectivePartscan(d.devnum) {
		return fmt.Errorf("partscan on %s: %w", d.path, ErrUnsupported)
	}
	return nil
}

// Partitions lists the device's partitions after checking the device is
// still this attachment.
func (d *Device) Partitions() ([]Partition, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.partitionsLocked()
}

func (d *Device) partitionsLocked() ([]Partition, error) {
	if err := d.errClosedLocked(); err != nil {
		return nil, err
	}
	if err := d.checkAlive(); err != nil {
		return nil, err
	}
	return listPartitions(d.sysfsDir(), d.kernelName())
}

// AddPartition creates partition nr synchronously with BLKPG_ADD_PARTITION;
// EBUSY means the kernel's scan already created it, which is fine.
func (d *Device) AddPartition(nr int, start, length uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.errClosedLocked(); err != nil {
		return err
	}
	return d.addPartitionLocked(nr, start, length)
}

func (d *Device) addPartitionLocked(nr int, start, length uint64) error {
	d.unpartitioned = false // the teardown must look for partitions now
	p := unix.BlkpgPartition{Pno: int32(nr), Start: int64(start), Length: int64(length)}
	if err := blkpg(d.file, unix.BLKPG_ADD_PARTITION, &p); err != nil && err != unix.EBUSY {
		return fmt.Errorf("BLKPG_ADD_PARTITION %s p%d: %w", d.path, nr, err)
	}
	return nil
}

// OpenPartition opens partition nr with the identity checks of openVerified: the
// node must be a block device whose sysfs parent is our disk, and the
// diskseq (shared with the disk) must be ours. flags are added to
// O_CLOEXEC|O_NONBLOCK|O_NOCTTY (e.g. unix.O_RDONLY).
func (d *Device) OpenPartition(ctx context.Context, nr int, flags int) (*os.File, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	parts, err := d.partitionsLocked()
	if err != nil {
		return nil, err
	}
	for _, p := range parts {
		if p.Nr != nr {
			continue
		}
		parent, err := readSysfsDevnum(p.Devnum.SysfsDir() + "/../dev")
		if err != nil || parent != d.devnum {
			return nil, fmt.Errorf("partition %s does not belong to %s: %w", p.Path, d.path, unix.ENXIO)
		}
		f, err := openVerified(p.Path, p.Devnum, d.diskseq, flags, false)
		if err != nil {
			return nil, fmt.Errorf("open partition %d of %s: %w", nr, d.path, err)
		}
		return f, nil
	}
	return nil, fmt.Errorf("partition %d of %s: %w", nr, d.path, unix.ENOENT)
}

// checkAlive verifies the device still carries this attachment.
func (d *Device) checkAlive() error {
	if d.diskseq == 0 {
		return nil
	}
	seq, err := readAttrUint(d.devnum.SysfsDir() + "/diskseq")
	if err != nil {
		return fmt.Errorf("%s: %w", d.path, ErrGone)
	}
	if seq != d.diskseq {
		return fmt.Errorf("%s diskseq %d, ours %d: %w", d.path, seq, d.diskseq, ErrReused)
	}
	return nil
}

// kernelName is loopN for a loop device, "" when unknown.
func (d *Device) kernelName() string {
	if d.nr < 0 {
		return ""
	}
	return "loop" + strconv.Itoa(d.nr)
}

// mayHavePartitions tells the teardown whether to look for partitions. A
// binding that never had partscan and got no BLKPG partition from us has
// none when the loop module's max_part is 0: the kernel then marks the disk
// GENHD_FL_NO_PART, which refuses partitions. Skipping the listing saves
// five syscalls of every teardown.
func (d *Device) mayHavePartitions() bool {
	return !d.unpartitioned || loopMaxPart() != 0
}

// loopMaxPart is the loop module's max_part parameter, read once: it is
// fixed while the module is loaded. An unreadable value counts as "may
// have partitions".
var loopMaxPart = sync.OnceValue(func() uint64 {
	v, err := readAttrUint("/sys/module/loop/parameters/max_part")
	if err != nil {
		return 1
	}
	return v
})
