package hook

import (
	"bytes"
	"errors"
	"io"

	"github.com/loopkit/loopkit/internal/ext4"
)

// Superblock magics, read through the image fd (never blkid, whose cache was
// observed reporting the previous occupant of a reused loop device). ext4's
// comes from the superblock reader the snapshotter shares.
var magics = []struct {
	fstype string
	has    func(io.ReaderAt) (bool, error)
}{
	{"squashfs", magicAt(0, []byte("hsqs"))},
	{"erofs", magicAt(1024, []byte{0xe2, 0xe1, 0xf5, 0xe0})},
	{"ext4", ext4.HasMagic},
}

// DetectFSType returns the filesystem type whose magic r carries, or "".
func DetectFSType(r io.ReaderAt) (string, error) {
	for _, m := range magics {
		ok, err := m.has(r)
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
			return m.has(r)
		}
	}
	return false, nil
}

// magicAt checks for magic at offset off; a file too short to hold it
// does not carry it.
func magicAt(off int64, magic []byte) func(io.ReaderAt) (bool, error) {
	return func(r io.ReaderAt) (bool, error) {
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
}
