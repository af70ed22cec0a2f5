package hookpolicy

import "testing"

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
	} {
		if got := CatalogName.MatchString(name); got != want {
			t.Errorf("CatalogName(%q) = %t", name, got)
		}
	}
}
