// Package uevent parses kernel uevent datagrams (NETLINK_KOBJECT_UEVENT).
// pkg/loopdev reads them to learn when partitions appear; the parser of
// this untrusted input is kept apart so that it can be fuzzed alone and
// stays out of the loopdev API.
package uevent

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
)

// ErrMalformed marks a datagram that is not a kernel uevent.
var ErrMalformed = errors.New("malformed uevent")

// Event is a parsed kernel uevent.
type Event struct {
	Action  string            // "add", "change", "remove"...
	Devpath string            // sysfs path below /sys
	Env     map[string]string // KEY=VALUE fields (SUBSYSTEM, DEVTYPE, DISKSEQ, SEQNUM...)
}

// Parse parses a kernel uevent datagram: "ACTION@DEVPATH\0KEY=VALUE\0...".
func Parse(b []byte) (*Event, error) {
	parts := bytes.Split(bytes.TrimRight(b, "\x00"), []byte{0})
	if len(parts) == 0 {
		return nil, fmt.Errorf("empty uevent: %w", ErrMalformed)
	}
	action, devpath, ok := strings.Cut(string(parts[0]), "@")
	if !ok || action == "" || devpath == "" {
		return nil, fmt.Errorf("uevent header %q: %w", parts[0], ErrMalformed)
	}
	ev := &Event{Action: action, Devpath: devpath, Env: map[string]string{}}
	for _, kv := range parts[1:] {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("uevent field %q: %w", kv, ErrMalformed)
		}
		ev.Env[k] = v
	}
	return ev, nil
}
