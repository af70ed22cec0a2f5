package main

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/loopkit/loopkit/internal/bytesize"
)

// sizeFlag is a flag.Value holding a byte count, read by the size parser
// of loopkit's config files (internal/bytesize): K, M, G, T with or
// without B/iB, all binary.
type sizeFlag uint64

func (f *sizeFlag) String() string { return strconv.FormatUint(uint64(*f), 10) }

func (f *sizeFlag) Set(s string) error {
	v, err := bytesize.Parse(s)
	if err != nil {
		// flag prefixes `invalid value "s" for flag -size:`.
		return errors.New("want a byte count such as 4096, 64M or 1GiB (K, M, G, T: powers of 1024)")
	}
	*f = sizeFlag(v)
	return nil
}

// humanSize prints bytes with a binary unit, for text output.
func humanSize(b uint64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%d B", b)
	}
	div, exp := uint64(unit), 0
	for n := b / unit; n >= unit && exp < 4; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(b)/float64(div), "KMGTP"[exp])
}
