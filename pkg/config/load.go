// Package config loads loopkit's TOML configuration files: strict decoding
// (unknown keys are errors, with their key path), a security check on the
// file itself, and typed structs with built-in defaults per component.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	toml "github.com/pelletier/go-toml/v2"
	"golang.org/x/sys/unix"
)

// MaxFileSize caps how much of a configuration file is read.
const MaxFileSize = 1 << 20

// ErrInsecure reports a configuration file (or its directory) that is not a
// root-owned regular file/directory, or that is group- or world-writable.
var ErrInsecure = errors.New("insecure configuration file")

// ErrInvalid reports a file that is not valid TOML, has unknown keys, wrong
// types or values that fail validation.
var ErrInvalid = errors.New("invalid configuration")

// DecodeStrict decodes TOML from r into v. Unknown keys at any level, wrong
// types, duplicate keys and invalid TOML are errors matching ErrInvalid; the
// message names the key path. Fields of v that the document omits keep the
// values v already had, so callers pre-fill defaults.
func DecodeStrict(r io.Reader, v any) error {
	data, err := io.ReadAll(io.LimitReader(r, MaxFileSize+1))
	if err != nil {
		return fmt.Errorf("read configuration: %w", err)
	}
	if len(data) > MaxFileSize {
		return fmt.Errorf("%w: larger than %d bytes", ErrInvalid, MaxFileSize)
	}
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return describeTOMLError(err)
	}
	return nil
}

func describeTOMLError(err error) error {
	var missing *toml.StrictMissingError
	if errors.As(err, &missing) {
		keys := make([]string, 0, len(missing.Errors))
		for i := range missing.Errors {
			keys = append(keys, strings.Join(missing.Errors[i].Key(), "."))
		}
		return fmt.Errorf("%w: unknown key %s", ErrInvalid, strings.Join(keys, ", "))
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		// A value's own UnmarshalText error (a size) already says
		// "invalid configuration"; the class is named once.
		msg := strings.TrimPrefix(strings.TrimPrefix(de.Error(), "toml: "), ErrInvalid.Error()+": ")
		if k := de.Key(); len(k) > 0 {
			return fmt.Errorf("%w: key %s (line %d column %d): %s", ErrInvalid, strings.Join(k, "."), row, col, msg)
		}
		return fmt.Errorf("%w: line %d column %d: %s", ErrInvalid, row, col, msg)
	}
	return fmt.Errorf("%w: %s", ErrInvalid, singleLine(err.Error()))
}

// CheckFileSecure opens path without following a final symlink and checks
// that it is a regular file owned by root and not group- or world-writable,
// and that its directory is a root-owned directory that is not group- or
// world-writable. A missing file matches fs.ErrNotExist.
func CheckFileSecure(path string) error {
	f, err := openSecure(path)
	if err != nil {
		return err
	}
	return f.Close()
}

// LoadFile checks path with the rules of CheckFileSecure and decodes it with
// DecodeStrict into v, reading only that one open file. A missing file
// matches fs.ErrNotExist, so callers can fall back to defaults.
func LoadFile(path string, v any) error {
	f, err := openSecure(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := DecodeStrict(f, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func openSecure(path string) (*os.File, error) {
	if !filepath.IsAbs(path) {
		return nil, fmt.Errorf("%w: %s: path is not absolute", ErrInvalid, path)
	}
	// O_NOFOLLOW: a symlink swapped in for the config would redirect policy;
	// O_NONBLOCK: a FIFO planted there must not hang the loader.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, &fs.PathError{Op: "open", Path: path, Err: fs.ErrNotExist}
		}
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("%w: %s: is a symlink", ErrInsecure, path)
		}
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, &fs.PathError{Op: "fstat", Path: path, Err: err}
	}
	if err := checkOwnerMode(path, &st, unix.S_IFREG); err != nil {
		f.Close()
		return nil, err
	}
	var dst unix.Stat_t
	dir := filepath.Dir(path)
	if err := unix.Stat(dir, &dst); err != nil {
		f.Close()
		return nil, &fs.PathError{Op: "stat", Path: dir, Err: err}
	}
	if err := checkOwnerMode(dir, &dst, unix.S_IFDIR); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// CheckOwnerMode reports ErrInsecure unless st describes an object of the
// given type (unix.S_IFREG, unix.S_IFDIR) owned by root and not writable by
// group or others.
func CheckOwnerMode(path string, st *unix.Stat_t, kind uint32) error {
	return checkOwnerMode(path, st, kind)
}

func checkOwnerMode(path string, st *unix.Stat_t, kind uint32) error {
	if st.Mode&unix.S_IFMT != kind {
		what := "regular file"
		if kind == unix.S_IFDIR {
			what = "directory"
		}
		return fmt.Errorf("%w: %s: not a %s", ErrInsecure, path, what)
	}
	if st.Uid != 0 {
		return fmt.Errorf("%w: %s: owned by uid %d, not root", ErrInsecure, path, st.Uid)
	}
	if st.Mode&0o022 != 0 {
		return fmt.Errorf("%w: %s: group- or world-writable (mode %04o)", ErrInsecure, path, st.Mode&0o7777)
	}
	return nil
}

func singleLine(s string) string {
	s = strings.ReplaceAll(s, "\r", " ")
	return strings.ReplaceAll(s, "\n", " ")
}
