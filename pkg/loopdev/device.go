package loopdev

import (
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// Fences narrow the reuse race on kernels without diskseq (spec 7.2): uevents
// with SEQNUM <= SeqnumNotBefore and udev entries initialised before
// TimeNotBefore (CLOCK_MONOTONIC) belong to an earlier attachment.
type Fences struct {
	SeqnumNotBefore uint64        // math.MaxUint64 = unknown
	TimeNotBefore   time.Duration // CLOCK_MONOTONIC; 0 = unknown
}

// BackingID is the (st_dev, st_ino) of the file behind a loop device, equal
// to the kernel's lo_device/lo_inode.
type BackingID struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// Record is what a caller persists to find and detach an attachment later,
// possibly from another process (spec 8.3).
type Record struct {
	Path    string    `json:"path"`
	Devnum  Devnum    `json:"devnum"`
	DiskSeq uint64    `json:"diskseq"`
	Backing BackingID `json:"backing"`
	Offset  uint64    `json:"offset"`
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
	remove      bool         // LOOP_CTL_REMOVE after the clear
	shortcut    bool         // the block-device backing itself: nothing was attached
	ioAtAttach  *ioCounters  // diskstats when the attach finished, for flush
	log         *slog.Logger // nil: discard
}

func (d *Device) Path() string         { return d.path }
func (d *Device) Nr() int              { return d.nr }
func (d *Device) Devnum() Devnum       { return d.devnum }
func (d *Device) DiskSeq() uint64      { return d.diskseq }
func (d *Device) Fences() Fences       { return d.fences }
func (d *Device) BackingPath() string  { return d.backingPath }
func (d *Device) BackingID() BackingID { return d.backing }

// Offset is the start of the device in the backing, in bytes.
func (d *Device) Offset() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.offset
}
func (d *Device) SectorSize() uint32 { return d.sectorSize }

// Size is the device's size in bytes.
func (d *Device) Size() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.size
}
func (d *Device) ReadOnly() bool { return d.readOnly }
func (d *Device) DirectIO() bool { return d.dio }
func (d *Device) Created() bool  { return d.created }

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
