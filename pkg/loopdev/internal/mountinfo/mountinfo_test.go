package mountinfo

import (
	"strings"
	"testing"
)

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/mnt/a\040b`:        "/mnt/a b",
		`/mnt/tab\011nl\012`: "/mnt/tab\tnl\n",
		`/mnt/back\134slash`: `/mnt/back\slash`,
		`/mnt/plain`:         "/mnt/plain",
		`/mnt/short\04`:      `/mnt/short\04`,
		`/mnt/notoctal\089`:  `/mnt/notoctal\089`,
		`\040`:               " ",
	} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParse(t *testing.T) {
	in := "36 35 7:3 / /var/lib/my\\040images rw,relatime shared:1 master:2 - ext4 /dev/loop3 rw\n" +
		"37 35 0:5 / /dev rw - devtmpfs udev rw\n" +
		"garbage\n"
	ms, err := Parse(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 {
		t.Fatalf("%d mounts, want 2: %+v", len(ms), ms)
	}
	if m := ms[0]; m.Devnum != "7:3" || m.MountPoint != "/var/lib/my images" || m.FSType != "ext4" || m.Source != "/dev/loop3" {
		t.Errorf("first mount %+v", m)
	}
	if m := ms[1]; m.FSType != "devtmpfs" || m.Source != "udev" {
		t.Errorf("second mount %+v", m)
	}
}
