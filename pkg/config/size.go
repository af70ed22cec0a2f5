package config

import (
	"fmt"
	"strconv"

	"github.com/loopkit/loopkit/internal/bytesize"
)

// ByteSize is a size in bytes. In TOML it is an integer (bytes) or a string
// with an optional unit: "10GiB", "512M", "4096".
type ByteSize int64

// UnmarshalText implements encoding.TextUnmarshaler for TOML strings.
func (s *ByteSize) UnmarshalText(b []byte) error {
	v, err := ParseByteSize(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// MarshalText prints the size in bytes.
func (s ByteSize) MarshalText() ([]byte, error) {
	return []byte(strconv.FormatInt(int64(s), 10)), nil
}

// ParseByteSize parses a plain number of bytes or one with a unit, case
// insensitive: K, KB and KiB all mean 2^10, M, MB and MiB 2^20, G, GB and
// GiB 2^30, T, TB and TiB 2^40 ("10GiB", "256MB", "512M", "4096"). Every
// command and config file of loopkit reads sizes with internal/bytesize,
// which this wraps with ErrInvalid.
func ParseByteSize(s string) (ByteSize, error) {
	n, err := bytesize.Parse(s)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return ByteSize(n), nil
}
