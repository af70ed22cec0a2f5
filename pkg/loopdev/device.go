package loopdev

import (
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
// block device itself). Its methods are safe for concurrent use.
type Device struct {
	mu      sync.Mutex
	file    *os.File // main fd; never closed by a finalizer early (see Close)
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
func (d *Device) Offset() uint64       { return d.offset }
func (d *Device) SectorSize() uint32   { return d.sectorSize }
func (d *Device) Size() uint64         { return d.size }
func (d *Device) ReadOnly() bool       { return d.readOnly }
func (d *Device) DirectIO() bool       { return d.dio }
func (d *Device) Created() bool        { return d.created }
func (d *Device) File() *os.File       { return d.file }
func (d *Device) Record() Record {
	return Record{Path: d.path, Devnum: d.devnum, DiskSeq: d.diskseq, Backing: d.backing, Offset: d.offset}
}

// Owned reports whether Detach would clear the binding.
func (d *Device) Owned() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.owned
}
