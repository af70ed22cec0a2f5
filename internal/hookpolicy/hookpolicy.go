// Package hookpolicy holds the path rules of oci-loop-hook's policy that
// both its configuration check (pkg/config) and the hook itself
// (internal/hook) apply: which destinations are always denied, what "below
// a prefix" means, and what a catalog name looks like.
package hookpolicy

import "strings"

// IsCatalogName reports whether name is a valid catalog name (also the
// name part of annotation requests): 1 to 63 of [A-Za-z0-9._-], starting
// with a letter or digit. A loop, not a regexp: the hook runs as one process
// per container, and compiling `{0,62}` at start cost it 0.3 ms.
func IsCatalogName(name string) bool {
	if len(name) == 0 || len(name) > 63 {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '_' && c != '-') {
			return false
		}
	}
	return true
}

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
