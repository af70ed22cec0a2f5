package config

import (
	"errors"
	"testing"
)

// Every unit is binary: MB and MiB (KB/KiB, GB/GiB, TB/TiB) are the same.
func TestParseByteSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{"4096", 4096, true},
		{"10GiB", 10 << 30, true},
		{"256MiB", 256 << 20, true},
		{"512M", 512 << 20, true},
		{"1GB", 1 << 30, true},
		{"1G", 1 << 30, true},
		{"256MB", 256 << 20, true},
		{"4kb", 4 << 10, true},
		{"2TB", 2 << 40, true},
		{" 64 mib ", 64 << 20, true},
		{"", 0, false},
		{"GiB", 0, false},
		{"10XB", 0, false},
		{"-1", 0, false},
		{"99999999999TiB", 0, false},
	} {
		got, err := ParseByteSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseByteSize(%q): %v does not match ErrInvalid", tc.in, err)
		}
	}
}
