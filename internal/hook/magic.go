package hook

import (
	"bytes"
	"errors"
	"io"
)

// Superblock magics, read through the image fd (never blkid, whose cache was
// observed reporting the previous occupant of a reused loop device).
var magics = []struct {
	fstype string
	offset int64
	magic  []byte
}{
	{"squashfs", 0, []byte("hsqs")},
	{"erofs", 1024, []byte{0xe2, 0xe1, 0xf5, 0xe0}},
	{"ext4", 1080, []byte{0x53, 0xef}},
}

// DetectFSType returns the filesystem type whose magic r carries, or "".
func DetectFSType(r io.ReaderAt) (string, error) {
	for _, m := range magics {
		ok, err := hasMagic(r, m.offset, m.magic)
		if err != nil {
			return "", err
		}
		if ok {
			return m.fstype, nil
		}
	}
	return "", nil
}

// HasMagic reports whether r carries the magic of fstype.
func HasMagic(r io.ReaderAt, fstype string) (bool, error) {
	for _, m := range magics {
		if m.fstype == fstype {
			return hasMagic(r, m.offset, m.magic)
		}
	}
	return false, nil
}

func hasMagic(r io.ReaderAt, off int64, magic []byte) (bool, error) {
	buf := make([]byte, len(magic))
	n, err := r.ReadAt(buf, off)
	if n < len(buf) {
		if err == nil || errors.Is(err, io.EOF) {
			return false, nil
		}
		return false, err
	}
	return bytes.Equal(buf, magic), nil
}
