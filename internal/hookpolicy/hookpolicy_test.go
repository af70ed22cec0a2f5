package hookpolicy

import (
	"regexp"
	"testing"
)

func TestHasPathPrefix(t *testing.T) {
	for _, tc := range []struct {
		p, prefix string
		want      bool
	}{
		{"/data", "/data", true},
		{"/data/x", "/data", true},
		{"/database", "/data", false},
		{"/dat", "/data", false},
		{"/anything", "/", true},
	} {
		if got := HasPathPrefix(tc.p, tc.prefix); got != tc.want {
			t.Errorf("HasPathPrefix(%q, %q) = %t", tc.p, tc.prefix, got)
		}
	}
}

func TestIsDeniedDest(t *testing.T) {
	for p, want := range map[string]bool{
		"/": true, "/proc": true, "/proc/1": true, "/sys/fs": true, "/dev": true, "/dev/shm": true,
		"/devices": false, "/data": false, "/etc": false, "/system": false,
	} {
		if got := IsDeniedDest(p); got != want {
			t.Errorf("IsDeniedDest(%q) = %t", p, got)
		}
	}
}

func TestCatalogName(t *testing.T) {
	for name, want := range map[string]bool{
		"dataset1": true, "a.b-c_d": true, "": false, ".hidden": false, "a/b": false, "a b": false,
		"x123456789012345678901234567890123456789012345678901234567890123": false, // 64 bytes
		"x12345678901234567890123456789012345678901234567890123456789012":  true,  // 63 bytes
		"-a": false, "_a": false, "a-": true, "a..b": true, "0": true, "caf\u00e9": false, "a\x00": false,
	} {
		if got := IsCatalogName(name); got != want {
			t.Errorf("IsCatalogName(%q) = %t", name, got)
		}
	}
}

// catalogNameRE is the rule IsCatalogName implements, as a regexp: the
// oracle of the fuzz test.
var catalogNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

func FuzzIsCatalogName(f *testing.F) {
	for _, s := range []string{"dataset1", "a.b-c_d", "", ".hidden", "a/b", "-a", "a\n", "caf\u00e9"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := IsCatalogName(s), catalogNameRE.MatchString(s); got != want {
			t.Fatalf("IsCatalogName(%q) = %t, the rule says %t", s, got, want)
		}
	})
}
