package loopdev

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Devnum is a device number (dev_t). This file is the only place that takes
// one apart; everywhere else it is opaque and printed as "major:minor".
type Devnum uint64

// Major is the device's major number.
func (d Devnum) Major() uint32 { return unix.Major(uint64(d)) }

// Minor is the device's minor number.
func (d Devnum) Minor() uint32 { return unix.Minor(uint64(d)) }

// String formats the devnum as "major:minor", as sysfs does.
func (d Devnum) String() string { return fmt.Sprintf("%d:%d", d.Major(), d.Minor()) }

// SysfsDir is /sys/dev/block/M:m, the device's sysfs directory.
func (d Devnum) SysfsDir() string { return "/sys/dev/block/" + d.String() }

// MarshalText renders "M:m" so records stay readable.
func (d Devnum) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText parses "M:m".
func (d *Devnum) UnmarshalText(b []byte) error {
	v, err := ParseDevnum(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// ParseDevnum parses "M:m" as found in sysfs dev files and uevents.
func ParseDevnum(s string) (Devnum, error) {
	maj, min, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok {
		return 0, fmt.Errorf("parse devnum %q: %w", s, ErrInvalidArgument)
	}
	M, err1 := strconv.ParseUint(maj, 10, 32)
	m, err2 := strconv.ParseUint(min, 10, 32)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("parse devnum %q: %w", s, ErrInvalidArgument)
	}
	return mkdevnum(uint32(M), uint32(m)), nil
}

func mkdevnum(major, minor uint32) Devnum { return Devnum(unix.Mkdev(major, minor)) }

// devnumOfStat returns st_rdev; Stat_t.Rdev is 32 bits on some architectures.
func devnumOfStat(st *unix.Stat_t) Devnum { return Devnum(uint64(st.Rdev)) } //nolint:unconvert

// devOfStat returns st_dev as the backing identity's device half.
func devOfStat(st *unix.Stat_t) uint64 { return uint64(st.Dev) } //nolint:unconvert

// readSysfsDevnum reads a sysfs "dev" file.
func readSysfsDevnum(path string) (Devnum, error) {
	s, err := readAttr(path)
	if err != nil {
		return 0, err
	}
	return ParseDevnum(s)
}

// devnumOfNode stats a node without following symlinks and returns its
// devnum, requiring a block device.
func devnumOfNode(path string) (Devnum, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return 0, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, &os.PathError{Op: "stat", Path: path, Err: unix.ENOTBLK}
	}
	return devnumOfStat(&st), nil
}
