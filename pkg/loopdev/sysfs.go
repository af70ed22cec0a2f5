package loopdev

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// maxAttr caps sysfs reads: backing_file is kernel text of at most PATH_MAX
// plus " (deleted)".
const maxAttr = 8192

// readAttr reads a single-line sysfs attribute, stripping only the trailing
// newline: a backing file name may legitimately end in spaces.
func readAttr(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxAttr+1))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > maxAttr {
		return "", fmt.Errorf("read %s: attribute longer than %d bytes: %w", path, maxAttr, ErrInvalidArgument)
	}
	return parseAttr(b), nil
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
