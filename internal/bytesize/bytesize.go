// Package bytesize parses the byte sizes that every loopkit command and
// configuration file accepts. It stands apart from pkg/config so that
// loopctl reads a size without linking the TOML decoder and the hook's
// policy: loopctl runs as one process per attach or detach, and each package
// it links is initialised on every start.
package bytesize

import (
	"fmt"
	"strconv"
	"strings"
)

// units are all binary: disk and image sizes are counted in powers of two,
// and a "10GB" meaning 10^10 would give an image 7% smaller than the same
// setting written "10GiB" (util-linux and dd read "M" as 2^20 too).
var units = map[string]int64{
	"": 1, "b": 1,
	"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
	"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
	"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
	"t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}

// Parse parses a plain number of bytes or one with a unit, case
// insensitive: K, KB and KiB all mean 2^10, M, MB and MiB 2^20, G, GB and
// GiB 2^30, T, TB and TiB 2^40 ("10GiB", "256MB", "512M", "4096"). Sizes
// above 2^62 are refused. The error names the input: `size "x": why`.
func Parse(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q: not a number", s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %v", s, err)
	}
	mult, ok := units[strings.ToLower(strings.TrimSpace(t[i:]))]
	if !ok {
		return 0, fmt.Errorf("size %q: unknown unit", s)
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return n * mult, nil
}
