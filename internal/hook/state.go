package hook

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"strings"
	"unicode/utf8"
)

// MaxStateSize caps the OCI state read from stdin.
const MaxStateSize = 1 << 20

// Container statuses the hook acts on.
const (
	StatusCreating = "creating"
	StatusStopped  = "stopped"
)

// State is the validated OCI container state (runtime-spec runtime.md).
type State struct {
	OCIVersion  string
	ID          string
	Status      string
	Pid         int
	Bundle      string
	Annotations map[string]string
}

// ReadState reads at most MaxStateSize bytes from r and parses them with
// ParseState.
func ReadState(r io.Reader) (*State, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxStateSize+1))
	if err != nil {
		return nil, invalidf("read state from stdin: %w", err)
	}
	if len(data) > MaxStateSize {
		return nil, invalidf("state on stdin is larger than %d bytes", MaxStateSize)
	}
	return ParseState(data)
}

// ParseState decodes the state strictly: correct types, no duplicate keys,
// no trailing data, exact key names. Unknown top-level fields are tolerated
// (the spec allows them; crun adds "root"). The id, bundle, status and pid
// are validated; errors match ErrInvalid.
func ParseState(untrusted []byte) (*State, error) {
	if len(untrusted) == 0 {
		return nil, invalidf("empty state on stdin")
	}
	if err := checkJSON(untrusted); err != nil {
		return nil, invalidf("malformed state: %v", err)
	}
	var (
		s   State
		pid *int
	)
	err := decodeFields(untrusted, map[string]any{
		"ociVersion":  &s.OCIVersion,
		"id":          &s.ID,
		"status":      &s.Status,
		"pid":         &pid,
		"bundle":      &s.Bundle,
		"annotations": &s.Annotations,
	}, true)
	if err != nil {
		return nil, invalidf("malformed state: %v", err)
	}
	if pid != nil {
		s.Pid = *pid
	}
	if err := validateID(s.ID); err != nil {
		return nil, err
	}
	if s.Status == "" || len(s.Status) > 64 || !printable(s.Status) {
		return nil, invalidf("state: invalid status %q", truncate(s.Status, 64))
	}
	if s.Pid < 0 {
		return nil, invalidf("state: invalid pid %d", s.Pid)
	}
	if s.Bundle != "" && (!filepath.IsAbs(s.Bundle) || len(s.Bundle) > 4096 || strings.ContainsRune(s.Bundle, 0)) {
		return nil, invalidf("state: bundle %q is not an absolute path", truncate(s.Bundle, 256))
	}
	return &s, nil
}

// runcID is runc's container id pattern; such ids are used as file names.
var runcID = regexp.MustCompile(`^[\w+\-.]+$`)

func validateID(id string) error {
	switch {
	case id == "":
		return invalidf("state: empty container id")
	case len(id) > 1024:
		return invalidf("state: container id longer than 1024 bytes")
	case !utf8.ValidString(id) || !printable(id) || strings.ContainsRune(id, '/'):
		return invalidf("state: container id %q contains '/' or control characters", truncate(id, 64))
	}
	return nil
}

// StateName is the file-name stem of a container's record and lock: the id
// itself when it is a plain runc id (and not "." or ".."), else the hex
// sha256 of the id, so no id can name a file outside the state directory,
// followed by a hash of the bundle path. The same id under two runc roots or
// two runtimes is two containers (with two bundles): keyed on the id alone,
// each one's poststop would tear down the other's mounts.
func StateName(id, bundle string) string {
	stem := id
	if !runcID.MatchString(id) || id == "." || id == ".." || len(id) > 200 {
		sum := sha256.Sum256([]byte(id))
		stem = hex.EncodeToString(sum[:])
	}
	b := sha256.Sum256([]byte(bundle))
	return stem + "." + hex.EncodeToString(b[:8])
}

func printable(s string) bool {
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// DisplayID is the container id as printed in the one-line error: quoted
// when it holds anything unusual, and bounded.
func DisplayID(id string) string {
	if runcID.MatchString(id) && len(id) <= 128 {
		return id
	}
	return fmt.Sprintf("%q", truncate(id, 64))
}
