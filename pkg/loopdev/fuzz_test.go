package loopdev

// Fuzz targets for the parsers of untrusted kernel text: uevent datagrams,
// single-line sysfs attributes, devnums. Seeds in testdata/fuzz.

import (
	"bytes"
	"strings"
	"testing"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/uevent"
)

func FuzzParseUevent(f *testing.F) {
	f.Add([]byte("add@/devices/virtual/block/loop0/loop0p1\x00ACTION=add\x00DEVPATH=/devices/virtual/block/loop0/loop0p1\x00SUBSYSTEM=block\x00MAJOR=259\x00MINOR=0\x00DEVNAME=loop0p1\x00DEVTYPE=partition\x00DISKSEQ=21\x00PARTN=1\x00SEQNUM=841\x00"))
	f.Add([]byte("change@/devices/virtual/block/loop7\x00ACTION=change\x00SUBSYSTEM=block\x00DEVTYPE=disk\x00DISKSEQ=9\x00SEQNUM=1"))
	f.Add([]byte("libudev\x00\xfe\xed\xca\xfe"))
	f.Add([]byte("@\x00=\x00"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := uevent.Parse(b)
		if err != nil {
			return
		}
		if ev.Action == "" || ev.Devpath == "" || strings.Contains(ev.Action, "@") {
			t.Fatalf("accepted header %q@%q", ev.Action, ev.Devpath)
		}
		// Re-serialise and parse again: the same event.
		var buf bytes.Buffer
		buf.WriteString(ev.Action + "@" + ev.Devpath)
		for k, v := range ev.Env {
			if k == "" || strings.ContainsRune(k, '=') || strings.ContainsRune(k+v, 0) {
				t.Fatalf("accepted field %q=%q", k, v)
			}
			buf.WriteString("\x00" + k + "=" + v)
		}
		ev2, err := uevent.Parse(buf.Bytes())
		if err != nil || ev2.Action != ev.Action || ev2.Devpath != ev.Devpath || len(ev2.Env) != len(ev.Env) {
			t.Fatalf("round trip: %v %+v vs %+v", err, ev2, ev)
		}
		for k, v := range ev.Env {
			if ev2.Env[k] != v {
				t.Fatalf("round trip of %s: %q vs %q", k, ev2.Env[k], v)
			}
		}
	})
}

// FuzzParseAttr: only the single trailing newline goes; a backing file name
// may end in spaces or even a newline of its own.
func FuzzParseAttr(f *testing.F) {
	f.Add([]byte("/var/lib/images/a b.img \n"))
	f.Add([]byte("/tmp/x (deleted)\n"))
	f.Add([]byte("1\n"))
	f.Add([]byte("name\n\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		got := parseAttr(append(append([]byte(nil), b...), '\n'))
		if got != string(b) {
			t.Fatalf("parseAttr(%q + newline) = %q", b, got)
		}
		if !bytes.HasSuffix(b, []byte("\n")) && parseAttr(b) != string(b) {
			t.Fatalf("parseAttr(%q) changed text without a trailing newline", b)
		}
		if p, del := splitDeleted(string(b)); del && p+" (deleted)" != string(b) {
			t.Fatalf("splitDeleted(%q) = %q", b, p)
		}
	})
}

func FuzzParseDevnum(f *testing.F) {
	for _, s := range []string{"7:12", "259:0\n", "0:0", "4095:1048575", "7:", ":1", "7:-1", "a:b", "4294967296:0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDevnum(s)
		if err != nil {
			return
		}
		d2, err := ParseDevnum(d.String())
		if err != nil || d2 != d {
			t.Fatalf("%q -> %s -> %v, %v", s, d, d2, err)
		}
	})
}
