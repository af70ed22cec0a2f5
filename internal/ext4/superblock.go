// Package ext4 reads the ext4 superblock: the few fields loopkit needs to
// recognise an image, size it, and refuse one whose filesystem recorded
// errors. It never writes.
package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// Offset is where the primary superblock starts in the image; it is 1024
// bytes long.
const Offset = 1024

// Magic is s_magic of ext2/3/4.
const Magic = 0xEF53

// ErrNotExt4 is returned when the image carries no ext4 superblock.
var ErrNotExt4 = errors.New("no ext4 superblock")

// s_state bits (fs/ext4/ext4.h).
const (
	stateValid  = 0x1 // EXT4_VALID_FS: unmounted cleanly, or mounted
	stateError  = 0x2 // EXT4_ERROR_FS: the kernel recorded an error
	stateOrphan = 0x4 // EXT4_ORPHAN_FS: orphans being recovered
)

// Feature bits read here.
const (
	IncompatRecover = 0x4  // EXT4_FEATURE_INCOMPAT_RECOVER: journal needs replay
	Incompat64Bit   = 0x80 // EXT4_FEATURE_INCOMPAT_64BIT
)

// Superblock holds the superblock fields loopkit reads.
type Superblock struct {
	InodesCount     uint32
	FreeInodesCount uint32
	BlocksCount     uint64
	FreeBlocksCount uint64
	LogBlockSize    uint32
	State           uint16
	FeatureCompat   uint32
	FeatureIncompat uint32
	FeatureROCompat uint32
	// ErrorCount is s_error_count: errors the kernel recorded since the
	// last full e2fsck.
	ErrorCount uint32
	// FirstErrorFunc names the kernel function of the first recorded error.
	FirstErrorFunc string
}

// HasMagic reports whether r carries an ext2/3/4 superblock.
func HasMagic(r io.ReaderAt) (bool, error) {
	var b [2]byte
	if _, err := r.ReadAt(b[:], Offset+0x38); err != nil {
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		return false, err
	}
	return binary.LittleEndian.Uint16(b[:]) == Magic, nil
}

// Read decodes the primary superblock of r.
func Read(r io.ReaderAt) (Superblock, error) {
	buf := make([]byte, 1024)
	if _, err := r.ReadAt(buf, Offset); err != nil {
		if errors.Is(err, io.EOF) {
			return Superblock{}, ErrNotExt4
		}
		return Superblock{}, err
	}
	le := binary.LittleEndian
	if le.Uint16(buf[0x38:]) != Magic {
		return Superblock{}, ErrNotExt4
	}
	sb := Superblock{
		InodesCount:     le.Uint32(buf[0x0:]),
		BlocksCount:     uint64(le.Uint32(buf[0x4:])),
		FreeBlocksCount: uint64(le.Uint32(buf[0xC:])),
		FreeInodesCount: le.Uint32(buf[0x10:]),
		LogBlockSize:    le.Uint32(buf[0x18:]),
		State:           le.Uint16(buf[0x3A:]),
		FeatureCompat:   le.Uint32(buf[0x5C:]),
		FeatureIncompat: le.Uint32(buf[0x60:]),
		FeatureROCompat: le.Uint32(buf[0x64:]),
		ErrorCount:      le.Uint32(buf[0x194:]),
		FirstErrorFunc:  cString(buf[0x1A8 : 0x1A8+32]),
	}
	if sb.FeatureIncompat&Incompat64Bit != 0 {
		sb.BlocksCount |= uint64(le.Uint32(buf[0x150:])) << 32
		sb.FreeBlocksCount |= uint64(le.Uint32(buf[0x158:])) << 32
	}
	return sb, nil
}

// ReadFile decodes the primary superblock of the image at path.
func ReadFile(path string) (Superblock, error) {
	f, err := os.Open(path)
	if err != nil {
		return Superblock{}, err
	}
	defer f.Close()
	sb, err := Read(f)
	if err != nil {
		return Superblock{}, fmt.Errorf("%s: %w", path, err)
	}
	return sb, nil
}

// BlockSize is the filesystem block size in bytes.
func (sb Superblock) BlockSize() int64 { return 1024 << sb.LogBlockSize }

// UsedInodes is the inode count minus the free inodes. The kernel updates
// the on-disk free count only when it writes the superblock (unmount,
// sync): while mounted it is stale.
func (sb Superblock) UsedInodes() int64 {
	return int64(sb.InodesCount) - int64(sb.FreeInodesCount)
}

// NeedsRecovery reports a journal that must be replayed before the image is
// read offline.
func (sb Superblock) NeedsRecovery() bool { return sb.FeatureIncompat&IncompatRecover != 0 }

// HasErrors reports whether the kernel or e2fsck recorded filesystem errors
// that no full check has cleared since: the s_state error bit, or a
// non-zero s_error_count.
func (sb Superblock) HasErrors() bool { return sb.State&stateError != 0 || sb.ErrorCount > 0 }

// Clean reports s_state "valid" without errors or orphan recovery pending:
// e2fsck without -f would skip this filesystem.
func (sb Superblock) Clean() bool {
	return sb.State&stateValid != 0 && sb.State&(stateError|stateOrphan) == 0
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}
