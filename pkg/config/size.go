package config

import (
	"fmt"
	"strconv"
	"strings"
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

// sizeUnits are all binary: disk and image sizes are counted in powers of
// two, and a "10GB" meaning 10^10 would give an image 7% smaller than the
// same setting written "10GiB" (util-linux and dd read "M" as 2^20 too).
var sizeUnits = map[string]int64{
	"": 1, "b": 1,
	"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
	"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
	"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
	"t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}

// ParseByteSize parses a plain number of bytes or one with a unit, case
// insensitive: K, KB and KiB all mean 2^10, M, MB and MiB 2^20, G, GB and
// GiB 2^30, T, TB and TiB 2^40 ("10GiB", "256MB", "512M", "4096"). Every
// command and config file of loopkit reads sizes with it.
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("%w: size %q: not a number", ErrInvalid, s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: size %q: %v", ErrInvalid, s, err)
	}
	mult, ok := sizeUnits[strings.ToLower(strings.TrimSpace(t[i:]))]
	if !ok {
		return 0, fmt.Errorf("%w: size %q: unknown unit", ErrInvalid, s)
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("%w: size %q: too large", ErrInvalid, s)
	}
	return ByteSize(n * mult), nil
}
