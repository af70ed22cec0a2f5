// Package hookpolicy holds the path rules of oci-loop-hook's policy that
// both its configuration check (pkg/config) and the hook itself
// (internal/hook) apply: which destinations are always denied, what "below
// a prefix" means, and what a catalog name looks like.
package hookpolicy

import (
	"regexp"
	"strings"
)

// CatalogName is the pattern of catalog names (and of the name part of
// annotation requests).
var CatalogName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// IsDeniedDest reports whether the clean absolute path p is "/" or lies at or
// below /proc, /sys or /dev, which are never valid destinations.
func IsDeniedDest(p string) bool {
	if p == "/" {
		return true
	}
	for _, d := range []string{"/proc", "/sys", "/dev"} {
		if HasPathPrefix(p, d) {
			return true
		}
	}
	return false
}

// HasPathPrefix reports whether p equals prefix or lies below it, comparing
// whole path components ("/database" is not below "/data").
func HasPathPrefix(p, prefix string) bool {
	if prefix == "/" {
		return strings.HasPrefix(p, "/")
	}
	return p == prefix || strings.HasPrefix(p, prefix+"/")
}
