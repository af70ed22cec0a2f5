package hook

import (
	"bytes"
	"testing"

	"github.com/loopkit/loopkit/internal/hookpolicy"
	"github.com/loopkit/loopkit/pkg/config"
)

// FuzzParsers runs the parsers that see untrusted or on-disk input: the OCI
// state, the annotations it carries (both forms), a --mount value, a state
// record and a TOML configuration. None may panic; whatever they accept
// must satisfy the invariants the rest of the hook relies on. Seeds live in
// testdata/fuzz/FuzzParsers and run as regression tests.
func FuzzParsers(f *testing.F) {
	f.Add([]byte(`{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":5,"bundle":"/b","annotations":{"org.ociloop.image":"ds","org.ociloop.dest":"/data"}}`),
		`[{"image":"ds","dest":"/data","noexec":true}]`, "image=ds,dest=/data,rw",
		[]byte(`{"id":"c1","mounts":[{"device":"/dev/loop1","devnum":"7:1","image_dev":1,"image_ino":2,"phase":"mounted"}]}`),
		[]byte("version = 1\n[images.ds]\npath = \"/srv/ds.sqfs\"\nfstype = \"squashfs\"\n"))
	f.Add([]byte(`{"id":"../../x","status":"stopped"}`), `[{"image":"a","image":"b"}]`, "dest=/x",
		[]byte(`{"id":"a","id":"b"}`), []byte("[images.x]\nbogus = 1\n"))
	f.Fuzz(func(t *testing.T, state []byte, mounts string, mountArg string, record []byte, toml []byte) {
		if st, err := ParseState(state); err == nil {
			if st.ID == "" || StateName(st.ID, st.Bundle) == "" || bytes.ContainsAny([]byte(StateName(st.ID, st.Bundle)), "/\x00") {
				t.Fatalf("accepted id %q maps to file name %q", st.ID, StateName(st.ID, st.Bundle))
			}
			if reqs, err := ParseAnnotations(st.Annotations, "org.ociloop.", 4); err == nil {
				checkRequests(t, reqs)
			}
		}
		if reqs, err := ParseAnnotations(map[string]string{"org.ociloop.mounts": mounts}, "org.ociloop.", 4); err == nil {
			checkRequests(t, reqs)
			cfg := config.DefaultHook()
			cfg.Images = map[string]config.HookImage{"ds": {Path: "/srv/ds.sqfs", FSType: "squashfs"}}
			if plans, err := MakePlans(&cfg, reqs); err == nil {
				for _, p := range plans {
					if hookpolicy.IsDeniedDest(p.Dest) || !(hookpolicy.HasPathPrefix(p.Dest, "/data") || hookpolicy.HasPathPrefix(p.Dest, "/mnt")) {
						t.Fatalf("plan with destination %q", p.Dest)
					}
				}
			}
		}
		if r, err := ParseMountArg(mountArg); err == nil {
			checkRequests(t, []Request{r})
		}
		if rec, err := ParseRecord(record); err == nil {
			for _, m := range rec.Mounts {
				if !loopDevice.MatchString(m.Device) || m.Devnum == 0 || (m.ImageDev == 0 && m.ImageIno == 0) {
					t.Fatalf("record accepted device %q devnum %s backing %d:%d", m.Device, m.Devnum, m.ImageDev, m.ImageIno)
				}
			}
		}
		var cfg config.Hook = config.DefaultHook()
		if err := config.DecodeStrict(bytes.NewReader(toml), &cfg); err == nil {
			_ = cfg.Validate()
		}
	})
}

func checkRequests(t *testing.T, reqs []Request) {
	for _, r := range reqs {
		if r.Dest == "" || r.Dest[0] != '/' || r.Image == "" || len(r.Dest) > maxDestLen || bytes.IndexByte([]byte(r.Dest), 0) >= 0 {
			t.Fatalf("accepted request %+v", r)
		}
	}
}
