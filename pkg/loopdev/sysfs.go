package loopdev

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// maxAttr caps sysfs reads: backing_file is kernel text of at most PATH_MAX
// plus " (deleted)".
const maxAttr = 8192

// readAttr reads a single-line sysfs attribute, stripping only the trailing
// newline: a backing file name may legitimately end in spaces.
//
// Raw syscalls, not os.Open: attach and detach read several attributes, and
// *os.File's poller registration and finalizer cost more than the read. One
// read: sysfs renders the whole attribute (at most a page) on the first
// read of an open file, so a buffer larger than maxAttr needs no second
// read to find EOF.
func readAttr(path string) (string, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return "", &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	var buf [maxAttr + 1]byte
	for {
		n, err := unix.Read(fd, buf[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return "", &os.PathError{Op: "read", Path: path, Err: err}
		}
		if n > maxAttr {
			return "", fmt.Errorf("read %s: attribute longer than %d bytes: %w", path, maxAttr, ErrInvalidArgument)
		}
		return parseAttr(buf[:n]), nil
	}
}

// parseAttr strips exactly one trailing newline.
func parseAttr(b []byte) string {
	return strings.TrimSuffix(string(b), "\n")
}

func readAttrUint(path string) (uint64, error) {
	s, err := readAttr(path)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(strings.TrimSpace(s), 0, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", path, err)
	}
	return v, nil
}

// splitDeleted recognises the " (deleted)" suffix the kernel appends to
// backing_file after the file was unlinked.
func splitDeleted(s string) (path string, deleted bool) {
	if p, ok := strings.CutSuffix(s, " (deleted)"); ok {
		return p, true
	}
	return s, false
}
