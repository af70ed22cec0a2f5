package loopdev

import (
	"log/slog"
	"math"
	"time"
)

// AccessMode selects how the backing and the device are opened.
type AccessMode int

const (
	// AccessAuto tries read-write and falls back to read-only on EROFS,
	// EACCES or EPERM (read-only media, read-only bind mounts).
	AccessAuto AccessMode = iota
	// AccessReadWrite fails when the backing cannot be opened read-write.
	AccessReadWrite
	// AccessReadOnly opens the backing and binds the device read-only.
	AccessReadOnly
)

// String names the mode for messages.
func (m AccessMode) String() string {
	switch m {
	case AccessReadWrite:
		return "read-write"
	case AccessReadOnly:
		return "read-only"
	}
	return "auto"
}

// LockState is the BSD lock a caller holds on the device.
type LockState int

const (
	// LockNone holds no lock.
	LockNone LockState = iota
	// LockShared is flock(LOCK_SH): what udev takes while it probes;
	// readers share it.
	LockShared
	// LockExclusive is flock(LOCK_EX): keeps udev and cooperating tools
	// (systemd, other loopkit users) away from the device.
	LockExclusive
)

// SectorSizeAuto asks for the sector size of the GPT found in the backing.
const SectorSizeAuto uint32 = ^uint32(0)

// Unchanged leaves a value as it is in RefreshSize.
const Unchanged uint64 = math.MaxUint64

// maxAttempts bounds the allocation loop (systemd: 64 attempts, 63 sleeps).
const maxAttempts = 64

// Options describes an attachment. The zero value attaches the whole file
// read-write if possible (else read-only), 512-byte sectors, direct I/O on
// where the backing supports it, autoclear, no lock handed back.
type Options struct {
	// Access is how the backing and the device are opened.
	Access AccessMode
	// Offset is the start of the device in the backing, in bytes, a
	// multiple of 512.
	Offset uint64
	// Size is the device's size limit in bytes, a multiple of 512; 0 means
	// to the end of the backing.
	Size uint64
	// SectorSize is the logical block size: 0 = 512 for files (the device's
	// for block backings), SectorSizeAuto = GPT probe, or 512..4096.
	SectorSize uint32
	// Partscan asks the kernel to scan the partition table.
	Partscan bool
	// MayPopulate says the caller will write a partition table; it refuses
	// the block-device shortcut when partscan is off.
	MayPopulate bool
	// DirectIO turns direct I/O on the backing on or off; nil means on
	// where the backing supports it (it avoids caching every block twice,
	// once for the device and once for the file).
	DirectIO *bool
	// Lock is the lock handed back with the device.
	Lock LockState
	// LockNonBlocking makes a held Lock fail with EWOULDBLOCK instead of
	// waiting for it.
	LockNonBlocking bool
	// Keep clears AUTOCLEAR and relinquishes the device before returning, so
	// it stays bound after this process exits ("attach and keep").
	Keep bool
	// KeepFromStart, with Keep, configures without AUTOCLEAR at all instead
	// of clearing it after setup succeeded. It saves the extra
	// LOOP_SET_STATUS64, which freezes the queue (~20 ms on 6.18), at a price:
	// a crash inside Attach leaves the device bound. It therefore requires a
	// FileName owner tag, so the owner's Sweep finds such a device.
	KeepFromStart bool
	// FileName is an owner tag written into lo_file_name (at most 63 bytes)
	// inside LOOP_CONFIGURE, so the first uevent already carries it.
	FileName string
	// WaitPartitions opens the uevent socket before the attach ioctl, so a
	// later WaitPartitions misses no event of this attachment.
	WaitPartitions bool
	// BackingLock takes a non-blocking flock on the open file description
	// the loop device holds (not the caller's), so the lock lasts exactly as
	// long as the binding: exclusive for exclusive writers, shared for
	// readers. A conflicting holder gives EWOULDBLOCK. On a block-device
	// backing that holder can be udev, which probes a disk under LOCK_SH
	// after each change event: wait for udev to settle first (udevadm
	// settle) or retry.
	BackingLock LockState
	// RemoveDevice deletes /dev/loopN with LOOP_CTL_REMOVE after Detach, as
	// systemd does. Off by default: on 6.18 the removal (del_gendisk) costs
	// ~50 ms per device, ten times a whole attach+detach cycle, and
	// LOOP_CTL_GET_FREE reuses unbound devices anyway.
	RemoveDevice bool
	// Logger receives debug records (collisions, fallbacks, attach and
	// detach); nil logs nothing.
	Logger *slog.Logger

	// Test-only knobs; unexported so only this package's tests set them.
	faultHook      func(step string, nr int) error
	onBackoff      func(attempt int, d time.Duration)
	forceNoDiskseq bool
}

// Named steps at which tests inject faults.
const (
	stepGetFree      = "get-free"
	stepLocked       = "locked"
	stepBeforeAttach = "before-attach"
	stepAttached     = "attached"
	stepVerified     = "verified"
	stepPartscan     = "partscan"
	stepDone         = "done"
)

func (o *Options) fault(step string, nr int) error {
	if o.faultHook == nil {
		return nil
	}
	return o.faultHook(step, nr)
}

// wantDirectIO resolves the DIO default once per attach (reading it twice
// once applied the flags twice in systemd).
func (o *Options) wantDirectIO() bool {
	if o.DirectIO != nil {
		return *o.DirectIO
	}
	return true
}

func (o *Options) validate() error {
	if o.Access < AccessAuto || o.Access > AccessReadOnly {
		return invalidf("access mode %d", o.Access)
	}
	if o.BackingLock < LockNone || o.BackingLock > LockExclusive {
		return invalidf("backing lock state %d", o.BackingLock)
	}
	if o.Lock < LockNone || o.Lock > LockExclusive {
		return invalidf("lock state %d", o.Lock)
	}
	// The kernel answers EOVERFLOW above LLONG_MAX.
	if o.Offset > math.MaxInt64 || o.Size > math.MaxInt64 {
		return invalidf("offset %d or size %d beyond %d", o.Offset, o.Size, int64(math.MaxInt64))
	}
	if o.Offset%512 != 0 {
		return invalidf("offset %d not a multiple of 512", o.Offset)
	}
	if o.Size%512 != 0 {
		return invalidf("size %d not a multiple of 512", o.Size)
	}
	switch o.SectorSize {
	case 0, SectorSizeAuto, 512, 1024, 2048, 4096:
	default:
		return invalidf("sector size %d (want 512, 1024, 2048 or 4096)", o.SectorSize)
	}
	if o.KeepFromStart && (!o.Keep || o.FileName == "") {
		return invalidf("KeepFromStart needs Keep and a FileName owner tag")
	}
	if len(o.FileName) >= 64 {
		return invalidf("file name tag %q longer than 63 bytes", o.FileName)
	}
	return nil
}
