package config

import (
	"errors"
	"testing"
)

// ParseByteSize is internal/bytesize's parser (tested there) with
// configuration errors marked ErrInvalid once.
func TestParseByteSize(t *testing.T) {
	if got, err := ParseByteSize("64MiB"); err != nil || got != 64<<20 {
		t.Errorf("ParseByteSize(64MiB) = %d, %v", got, err)
	}
	_, err := ParseByteSize("10XB")
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("ParseByteSize(10XB): %v does not match ErrInvalid", err)
	}
	if want := `invalid configuration: size "10XB": unknown unit`; err.Error() != want {
		t.Errorf("ParseByteSize(10XB): %q, want %q", err, want)
	}
}
