package hook

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/loopkit/loopkit/pkg/config"
)

// Check 20: malformed stdin is exit 2.
func TestParseStateMalformed(t *testing.T) {
	big := `{"ociVersion":"1.0.2","id":"x","status":"creating","pid":5,"bundle":"/b","annotations":{"k":"` + strings.Repeat("a", 10<<20) + `"}}`
	cases := map[string]string{
		"empty":                "",
		"truncated":            `{"ociVersion":"1.0.2","id":"x","status":"crea`,
		"10MiB":                big,
		"duplicate id":         `{"id":"a","id":"b","status":"creating","pid":5,"bundle":"/b"}`,
		"duplicate annotation": `{"id":"a","status":"creating","pid":5,"bundle":"/b","annotations":{"k":"1","k":"2"}}`,
		"non-string ann value": `{"id":"a","status":"creating","pid":5,"bundle":"/b","annotations":{"k":1}}`,
		"id dotdot":            `{"id":"../../x","status":"creating","pid":5,"bundle":"/b"}`,
		"id newline":           `{"id":"a\nb","status":"creating","pid":5,"bundle":"/b"}`,
		"id empty":             `{"id":"","status":"creating","pid":5,"bundle":"/b"}`,
		"pid string":           `{"id":"a","status":"creating","pid":"5","bundle":"/b"}`,
		"pid float":            `{"id":"a","status":"creating","pid":5.5,"bundle":"/b"}`,
		"negative pid":         `{"id":"a","status":"creating","pid":-5,"bundle":"/b"}`,
		"relative bundle":      `{"id":"a","status":"creating","pid":5,"bundle":"b"}`,
		"trailing data":        `{"id":"a","status":"creating","pid":5,"bundle":"/b"} {}`,
		"array":                `[]`,
		"null":                 `null`,
		"no status":            `{"id":"a","pid":5,"bundle":"/b"}`,
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := ReadState(strings.NewReader(in))
			if ExitCode(err) != 2 {
				t.Fatalf("err %v: exit %d, want 2", err, ExitCode(err))
			}
			if strings.ContainsAny(err.Error(), "\n") {
				t.Errorf("multi-line error %q", err)
			}
		})
	}
}

func TestParseStateAccepts(t *testing.T) {
	in := `{"ociVersion":"1.0.2-dev","id":"test1","status":"creating","pid":16218,"bundle":"/run/b","annotations":{"org.ociloop.image":"a"},"root":"/x","ID":"ignored"}`
	st, err := ParseState([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if st.ID != "test1" || st.Pid != 16218 || st.Bundle != "/run/b" || st.Annotations["org.ociloop.image"] != "a" {
		t.Fatalf("%+v", st)
	}
	// podman's poststop state has no pid.
	st, err = ParseState([]byte(`{"ociVersion":"1.0.2","id":"p","status":"stopped","bundle":"/b"}`))
	if err != nil || st.Pid != 0 {
		t.Fatalf("%+v %v", st, err)
	}
}

func TestStateName(t *testing.T) {
	for id, want := range map[string]string{"abc-1.2_x+y": "abc-1.2_x+y", ".": "", "..": "", "a b": "", "é": ""} {
		name := StateName(id, "/b1")
		got, sep := name[:len(name)-17], name[len(name)-17]
		if want != "" && got != want {
			t.Errorf("StateName(%q) = %q", id, got)
		}
		if want == "" && (len(got) != 64 || strings.ContainsAny(got, "/.")) {
			t.Errorf("StateName(%q) = %q, want a hash", id, got)
		}
		if sep != '.' {
			t.Errorf("StateName(%q) = %q lacks the bundle hash", id, name)
		}
	}
	// The same id under two runc roots is two containers (two bundles).
	if StateName("c1", "/run/a/c1") == StateName("c1", "/run/b/c1") {
		t.Error("two bundles share a state name")
	}
}

// Check 19: the wrong stage is exit 4: status not creating, pid 1
// (createContainer placement), or our own mount namespace.
func TestSetupWrongStage(t *testing.T) {
	cfg := config.DefaultHook()
	cfg.StateDir = filepath.Join(t.TempDir(), "state")
	h := New(&cfg, nullLog(), "test")
	a := ann("x", "/data")
	for name, st := range map[string]*State{
		"stopped": {ID: "a", Status: StatusStopped, Pid: 5, Bundle: "/b", Annotations: a},
		"running": {ID: "a", Status: "running", Pid: 5, Bundle: "/b", Annotations: a},
		"pid1":    {ID: "a", Status: StatusCreating, Pid: 1, Bundle: "/b", Annotations: a},
		"no pid":  {ID: "a", Status: StatusCreating, Bundle: "/b", Annotations: a},
	} {
		if err := h.Setup(ctxT(t), st, nil); ExitCode(err) != 4 {
			t.Errorf("%s: %v (exit %d), want 4", name, err, ExitCode(err))
		}
	}
	// Our own process: same mount namespace, the createContainer view.
	if _, err := PinContainer(os.Getpid()); ExitCode(err) != 4 {
		t.Errorf("own namespace: %v, want exit 4", err)
	}
}

func TestParseAnnotations(t *testing.T) {
	p := "org.ociloop."
	ok := []struct {
		name string
		in   map[string]string
		want []Request
	}{
		{"none", map[string]string{"other": "x"}, nil},
		{"single", map[string]string{p + "image": "ds1", p + "dest": "/data"}, []Request{{Image: "ds1", Dest: "/data"}}},
		{"single rw noexec", map[string]string{p + "image": "ds1", p + "dest": "/data", p + "rw": "true", p + "options": "noexec"}, []Request{{Image: "ds1", Dest: "/data", RW: true, Noexec: true}}},
		{"list", map[string]string{p + "mounts": `[{"image":"ds1","dest":"/data"},{"image":"tools","dest":"/mnt/t","noexec":true}]`},
			[]Request{{Image: "ds1", Dest: "/data"}, {Image: "tools", Dest: "/mnt/t", Noexec: true}}},
	}
	for _, tc := range ok {
		got, err := ParseAnnotations(tc.in, p, 4)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if len(got) != len(tc.want) {
			t.Errorf("%s: got %+v", tc.name, got)
			continue
		}
		for i := range got {
			got[i].Source = ""
			if got[i] != tc.want[i] {
				t.Errorf("%s: got %+v want %+v", tc.name, got[i], tc.want[i])
			}
		}
	}
	bad := map[string]map[string]string{
		"both forms":      {p + "image": "a", p + "dest": "/d", p + "mounts": "[]"},
		"image only":      {p + "image": "a"},
		"dest only":       {p + "dest": "/d"},
		"rw yes":          {p + "image": "a", p + "dest": "/d", p + "rw": "yes"},
		"unknown option":  {p + "image": "a", p + "dest": "/d", p + "options": "suid"},
		"unknown key":     {p + "imgae": "a"},
		"list unknown":    {p + "mounts": `[{"image":"a","dest":"/d","suid":true}]`},
		"list dup key":    {p + "mounts": `[{"image":"a","image":"b","dest":"/d"}]`},
		"list trailing":   {p + "mounts": `[{"image":"a","dest":"/d"}]x`},
		"list not array":  {p + "mounts": `{"image":"a","dest":"/d"}`},
		"list empty":      {p + "mounts": `[]`},
		"list no dest":    {p + "mounts": `[{"image":"a"}]`},
		"list wrong type": {p + "mounts": `[{"image":"a","dest":"/d","rw":"true"}]`},
		"list case":       {p + "mounts": `[{"Image":"a","dest":"/d"}]`},
		"value too long":  {p + "image": strings.Repeat("a", 5000), p + "dest": "/d"},
		"relative dest":   {p + "image": "a", p + "dest": "data"},
		"nul dest":        {p + "image": "a", p + "dest": "/data\x00x"},
		"bad name":        {p + "image": "-a", p + "dest": "/d"},
	}
	for name, in := range bad {
		if _, err := ParseAnnotations(in, p, 4); ExitCode(err) != 2 {
			t.Errorf("%s: %v (exit %d), want 2", name, err, ExitCode(err))
		}
	}
	five := `[` + strings.Repeat(`{"image":"a","dest":"/d"},`, 4) + `{"image":"a","dest":"/d"}]`
	if _, err := ParseAnnotations(map[string]string{p + "mounts": five}, p, 4); ExitCode(err) != 3 {
		t.Errorf("5 mounts over max_mounts=4: %v", err)
	}
}

func TestParseMountArg(t *testing.T) {
	r, err := ParseMountArg("image=ds1,dest=/data,rw,noexec")
	if err != nil || r.Image != "ds1" || r.Dest != "/data" || !r.RW || !r.Noexec {
		t.Fatalf("%+v %v", r, err)
	}
	for _, bad := range []string{"", "image=ds1", "dest=/d", "image=a,dest=/d,rw=true", "image=a,dest=/d,suid", "image=a,image=b,dest=/d"} {
		if _, err := ParseMountArg(bad); ExitCode(err) != 2 {
			t.Errorf("%q: %v, want exit 2", bad, err)
		}
	}
}

// Check 7: destination tricks are refused (3) or rejected as malformed (2).
func TestDestinationTricks(t *testing.T) {
	cfg := config.DefaultHook()
	cfg.Images = map[string]config.HookImage{"ds": {Path: "/srv/ds.sqfs", FSType: "squashfs"}}
	cases := map[string]int{
		"/":                              3,
		"/proc":                          3,
		"/proc/self":                     3,
		"/sys":                           3,
		"/dev/x":                         3,
		"/etc":                           3,
		"/etc/data":                      3,
		"/database":                      3,
		"/data/../../proc":               3,
		"/data/../etc":                   3,
		"relative/path":                  2,
		"data":                           2,
		"/data\x00/x":                    2,
		"/" + strings.Repeat("a", 5<<10): 2,
	}
	for dest, code := range cases {
		_, err := MakePlans(&cfg, []Request{{Image: "ds", Dest: dest}})
		if ExitCode(err) != code {
			t.Errorf("dest %q: %v (exit %d), want %d", truncate(dest, 40), err, ExitCode(err), code)
		}
	}
	for _, dest := range []string{"/data", "/data/x", "/mnt/a/b", "/../../../../data"} {
		plans, err := MakePlans(&cfg, []Request{{Image: "ds", Dest: dest}})
		if err != nil {
			t.Errorf("dest %q: %v", dest, err)
			continue
		}
		if !strings.HasPrefix(plans[0].Dest, "/data") && !strings.HasPrefix(plans[0].Dest, "/mnt") {
			t.Errorf("dest %q cleaned to %q", dest, plans[0].Dest)
		}
	}
	cfg.DestAllowedPrefixes = []string{"/data", "/etc/app"}
	if _, err := MakePlans(&cfg, []Request{{Image: "ds", Dest: "/etc/app/x"}}); err != nil {
		t.Errorf("/etc listed explicitly: %v", err)
	}
	cfg.Enabled = false
	if _, err := MakePlans(&cfg, []Request{{Image: "ds", Dest: "/data"}}); ExitCode(err) != 3 {
		t.Errorf("disabled: %v", err)
	}
	cfg = config.DefaultHook()
	if _, err := MakePlans(&cfg, []Request{{Image: "ds", Dest: "/data"}}); ExitCode(err) != 3 {
		t.Errorf("built-in defaults allowed a request: %v", err)
	}
}

func TestParseRecord(t *testing.T) {
	good := `{"tool_version":"v","id":"c1","bundle":"/b","init_pid":5,"init_start_time":9,"mnt_ns_inode":4,"created":"2026-01-01T00:00:00Z",
	"mounts":[{"name":"ds","image_path":"/i","image_dev":1,"image_ino":2,"image_size":3,"fstype":"squashfs","mode":"ro","dest":"/data","device":"/dev/loop3","devnum":"7:3","diskseq":77,"phase":"mounted"}]}`
	r, err := ParseRecord([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	lr := r.Mounts[0].LoopRecord()
	if lr.Path != "/dev/loop3" || lr.Devnum.String() != "7:3" || lr.DiskSeq != 77 {
		t.Fatalf("%+v", lr)
	}
	for name, bad := range map[string]string{
		"unknown": strings.Replace(good, `"bundle"`, `"bundel"`, 1),
		"dup":     strings.Replace(good, `"bundle":"/b"`, `"bundle":"/b","bundle":"/c"`, 1),
		"device":  strings.Replace(good, `"/dev/loop3"`, `"/dev/sda"`, 1),
		"devnum":  strings.Replace(good, `"7:3"`, `"0:0"`, 1),
		// A zero identity would match whatever now sits on the device,
		// even with require_diskseq (issue 12, finding 4).
		"zero identity": strings.Replace(strings.Replace(good, `"image_dev":1,"image_ino":2`, `"image_dev":0,"image_ino":0`, 1), `"diskseq":77`, `"diskseq":0`, 1),
		"type":          strings.Replace(good, `"init_pid":5`, `"init_pid":"5"`, 1),
		"phase":         strings.Replace(good, `"mounted"`, `"x"`, 1),
		"id":            strings.Replace(good, `"c1"`, `"a/b"`, 1),
		"trailing":      good + "{}",
	} {
		if _, err := ParseRecord([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
