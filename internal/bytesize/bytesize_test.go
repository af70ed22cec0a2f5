package bytesize

import (
	"strconv"
	"strings"
	"testing"
)

// Every unit is binary: MB and MiB (KB/KiB, GB/GiB, TB/TiB) are the same.
func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  string // substring of the error; "" = success
	}{
		{"4096", 4096, ""},
		{"10GiB", 10 << 30, ""},
		{"256MiB", 256 << 20, ""},
		{"512M", 512 << 20, ""},
		{"1GB", 1 << 30, ""},
		{"1G", 1 << 30, ""},
		{"256MB", 256 << 20, ""},
		{"4kb", 4 << 10, ""},
		{"2TB", 2 << 40, ""},
		{" 64 mib ", 64 << 20, ""},
		{"", 0, `size "": not a number`},
		{"GiB", 0, `size "GiB": not a number`},
		{"10XB", 0, `size "10XB": unknown unit`},
		{"-1", 0, `size "-1": not a number`},
		{"99999999999TiB", 0, `size "99999999999TiB": too large`},
		{"99999999999999999999", 0, `size "99999999999999999999": strconv.ParseInt`},
	} {
		got, err := Parse(tc.in)
		switch {
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("Parse(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("Parse(%q) = %d, %v; want an error with %q", tc.in, got, err, tc.err)
		}
	}
}

// FuzzParse: whatever is accepted is a size in [0, 2^62] that reads back
// as itself when printed in bytes. The seeds are the table above's inputs.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"4096", "10GiB", "512M", " 64 mib ", "", "GiB", "10XB", "-1", "99999999999TiB", "1\x00K"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := Parse(s)
		if err != nil {
			if n != 0 {
				t.Fatalf("Parse(%q) failed but returned %d", s, n)
			}
			return
		}
		if n < 0 || n > 1<<62 {
			t.Fatalf("Parse(%q) = %d, outside [0, 2^62]", s, n)
		}
		if back, err := Parse(strconv.FormatInt(n, 10)); err != nil || back != n {
			t.Fatalf("Parse(%q) = %d, which reads back as %d, %v", s, n, back, err)
		}
	})
}
