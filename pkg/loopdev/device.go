package loopdev

import (
	"fmt"
	"log/slog"
	"math/bits"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Fences narrow the reuse race on kernels without diskseq (before 5.15,
// kernel commit 7957d93bf32b added BLKGETDISKSEQ): uevents
// with SEQNUM <= SeqnumNotBefore and udev entries initialised before
// TimeNotBefore (CLOCK_MONOTONIC) belong to an earlier attachment.
type Fences struct {
	SeqnumNotBefore uint64        // math.MaxUint64 = unknown
	TimeNotBefore   time.Duration // CLOCK_MONOTONIC; 0 = unknown
}

// BackingID is the (st_dev, st_ino) of the file behind a loop device, equal
// to the kernel's lo_device/lo_inode.
type BackingID struct {
	Dev uint64 `json:"dev"` // st_dev of the backing file
	Ino uint64 `json:"ino"` // st_ino of the backing file
}

// Record is what a caller persists to find and detach an attachment later,
// possibly from another process: DetachRecord and Verify check devnum and
// diskseq (without diskseq: backing and offset) before they act.
type Record struct {
	Path    string    `json:"path"`    // /dev/loopN
	Devnum  Devnum    `json:"devnum"`  // major:minor of the device
	DiskSeq uint64    `json:"diskseq"` // the kernel's disk sequence number of this attachment; 0 = unknown
	Backing BackingID `json:"backing"` // the backing file, the identity without diskseq
	Offset  uint64    `json:"offset"`  // byte offset of the device in the backing
}

// Device is an open loop device (or, for the block-device shortcut, the
// block device itself). Its methods are safe for concurrent use: every
// method that uses the device's fds holds mu for the whole use, so a
// teardown can never close an fd (whose number the kernel then hands to the
// next open, maybe of another device) under an ioctl.
type Device struct {
	mu      sync.Mutex
	file    *os.File // main fd; guarded by mu, like every field a method changes
	lock    *ofd     // separate OFD carrying the caller's flock, or nil
	uevents *ueventSocket

	path        string
	nr          int
	devnum      Devnum
	diskseq     uint64
	fences      Fences
	backingPath string
	backing     BackingID
	offset      uint64
	sectorSize  uint32
	size        uint64
	readOnly    bool
	dio         bool
	created     bool
	owned       bool
	closed      bool
	remove      bool // LOOP_CTL_REMOVE after the clear
	// unpartitioned: attached here without partscan and given no BLKPG
	// partition since, so with max_part 0 there is none to delete.
	unpartitioned bool
	status        *unix.LoopInfo64 // LOOP_GET_STATUS64 of the attach's verification, reused once by finish
	shortcut      bool             // the block-device backing itself: nothing was attached
	ioAtAttach    *ioCounters      // diskstats just before LOOP_CONFIGURE, the flush's baseline
	ioStat        *ioStat          // the disk's sysfs stat, open from the attach to the teardown
	log           *slog.Logger     // nil: discard
}

// sysfsDir is the device's sysfs directory. For loopN with the devnum the
// loop driver gives loopN (major 7, minor N << part_shift) it is named
// after the disk under /sys/devices/virtual/block (loop disks have no
// parent device): the directory /sys/dev/block/M:m links to, without that
// symlink's resolution, which the attach and detach would otherwise pay for
// each attribute they read. Any other handle (a node whose devnum is not
// its name's) uses the devnum's directory: the devnum is the identity.
func (d *Device) sysfsDir() string { return sysfsDirOf(d.nr, d.devnum) }

func sysfsDirOf(nr int, devnum Devnum) string {
	if _, ok := loopPartShift(); ok && isLoopDevnum(nr, devnum) {
		return "/sys/devices/virtual/block/loop" + strconv.Itoa(nr)
	}
	return devnum.SysfsDir()
}

// isLoopDevnum reports whether devnum is the one the loop driver gives
// loopN; without a known part_shift, whether it is any loop devnum.
func isLoopDevnum(nr int, devnum Devnum) bool {
	if nr < 0 {
		return false
	}
	if shift, ok := loopPartShift(); ok {
		return devnum == Devnum(unix.Mkdev(7, uint32(nr)<<shift))
	}
	return devnum.Major() == 7
}

// loopPartShift is the loop driver's part_shift: loopN is major 7
// (LOOP_MAJOR), minor N << part_shift, and the module's max_part parameter
// reads back as (1 << part_shift) - 1 (loop_init rounds it up so). Read
// once: it is fixed while the module is loaded. ok is false when max_part
// cannot be read or has another form.
var loopPartShift = sync.OnceValues(func() (int, bool) {
	v, err := readAttrUint("/sys/module/loop/parameters/max_part")
	shift := bits.Len64(v)
	return shift, err == nil && v == 1<<shift-1
})

// Path is the device node, /dev/loopN (the backing's own node for the
// block-device shortcut).
func (d *Device) Path() string { return d.path }

// Nr is N of /dev/loopN, or -1 for a device that is not a loop device.
func (d *Device) Nr() int { return d.nr }

// Devnum is the device's major:minor.
func (d *Device) Devnum() Devnum { return d.devnum }

// DiskSeq is the kernel's sequence number of this attachment (never reused
// until reboot); 0 on kernels without BLKGETDISKSEQ.
func (d *Device) DiskSeq() uint64 { return d.diskseq }

// Fences are the uevent seqnum and time read before the attach, which tell
// this attachment's events from earlier ones on kernels without diskseq.
func (d *Device) Fences() Fences { return d.fences }

// BackingPath is the backing file's path as the attach saw it.
func (d *Device) BackingPath() string { return d.backingPath }

// BackingID is the backing file's (st_dev, st_ino).
func (d *Device) BackingID() BackingID { return d.backing }

// Offset is the start of the device in the backing, in bytes.
func (d *Device) Offset() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.offset
}

// SectorSize is the device's logical block size.
func (d *Device) SectorSize() uint32 { return d.sectorSize }

// Size is the device's size in bytes.
func (d *Device) Size() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.size
}

// ReadOnly reports whether the device is read-only.
func (d *Device) ReadOnly() bool { return d.readOnly }

// DirectIO reports whether the kernel does direct I/O to the backing.
func (d *Device) DirectIO() bool { return d.dio }

// Created reports whether this handle made the attachment (or took it over
// with Unrelinquish), as opposed to opening an existing one.
func (d *Device) Created() bool { return d.created }

// File is the main fd. It is closed by Detach and Close, and after a
// DetachWith with Exclusive it is another fd: do not keep it.
func (d *Device) File() *os.File {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.file
}

// Record is what to persist to detach this attachment later, from any
// process, with DetachRecord.
func (d *Device) Record() Record {
	d.mu.Lock()
	defer d.mu.Unlock()
	return Record{Path: d.path, Devnum: d.devnum, DiskSeq: d.diskseq, Backing: d.backing, Offset: d.offset}
}

// errClosedLocked is the error of a method called after Detach or Close.
func (d *Device) errClosedLocked() error {
	if d.closed {
		return fmt.Errorf("%s: %w", d.path, os.ErrClosed)
	}
	return nil
}

// Owned reports whether Detach would clear the binding.
func (d *Device) Owned() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.owned
}
