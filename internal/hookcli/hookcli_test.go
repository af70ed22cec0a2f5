package hookcli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func runHook(t *testing.T, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(Build{Version: "dev", Commit: "unknown"}, args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

// secureConfig writes a config into a fresh root-owned 0700 directory.
func secureConfig(t *testing.T, body string) (path, dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: configuration files must be root-owned")
	}
	dir = t.TempDir()
	path = filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, dir
}

func TestUsageAndVersion(t *testing.T) {
	if code, out, _ := runHook(t, "", "--help"); code != 0 || !strings.Contains(out, "Usage: oci-loop-hook") {
		t.Errorf("--help: %d %q", code, out)
	}
	for _, v := range []string{"version", "--version"} {
		if code, out, _ := runHook(t, "", v); code != 0 || !strings.HasPrefix(out, "oci-loop-hook ") || !strings.Contains(out, "(commit ") {
			t.Errorf("%s: %d %q", v, code, out)
		}
	}
	// --help documents every configuration key with its default.
	if _, out, _ := runHook(t, "", "--help"); !strings.Contains(out, "allowed_image_dirs = ") || !strings.Contains(out, "dest_symlinks = 'refuse'") {
		t.Errorf("--help lacks the configuration keys: %q", out)
	}
	for _, args := range [][]string{{}, {"frobnicate"}, {"--bogus", "setup"}, {"setup", "extra"}, {"--log", "loud", "setup"}} {
		code, out, errs := runHook(t, "", append([]string{"--config", "/nonexistent/x.toml"}, args...)...)
		if code != 2 || out != "" || strings.Count(errs, "\n") != 1 || !strings.HasPrefix(errs, "oci-loop-hook: ") {
			t.Errorf("%v: exit %d stdout %q stderr %q", args, code, out, errs)
		}
	}
}

// Check 23 at the command level: an explicit --config that does not exist,
// a world-writable config, a symlinked state directory are exit 2.
func TestConfigAndStateDirHardening(t *testing.T) {
	state := `{"ociVersion":"1.0.2","id":"c1","status":"stopped","bundle":"/b"}`
	code, _, errs := runHook(t, state, "--config", filepath.Join(t.TempDir(), "missing.toml"), "teardown")
	if code != 2 || !strings.Contains(errs, "does not exist") {
		t.Errorf("missing explicit config: %d %q", code, errs)
	}
	p, dir := secureConfig(t, "version = 1\nstate_dir = \""+filepath.Join(t.TempDir(), "state")+"\"\nlog = \"stderr\"\n")
	if code, _, errs := runHook(t, state, "--config", p, "teardown"); code != 0 {
		t.Errorf("teardown without a record: %d %q", code, errs)
	}
	if code, out, _ := runHook(t, "", "--config", p, "check-config"); code != 0 || !strings.Contains(out, "max_mounts = 4") {
		t.Errorf("check-config: %d %q", code, out)
	}
	os.Chmod(p, 0o666)
	if code, _, errs := runHook(t, state, "--config", p, "teardown"); code != 2 || strings.Count(errs, "\n") != 1 {
		t.Errorf("world-writable config: %d %q", code, errs)
	}
	if code, _, _ := runHook(t, "", "--config", p, "check-config"); code != 2 {
		t.Errorf("check-config of a world-writable file: %d", code)
	}
	real := filepath.Join(dir, "real")
	os.Mkdir(real, 0o700)
	link := filepath.Join(dir, "linked")
	os.Symlink(real, link)
	p2, _ := secureConfig(t, "version = 1\nstate_dir = \""+link+"\"\n")
	if code, _, errs := runHook(t, state, "--config", p2, "teardown"); code != 2 || !strings.Contains(errs, "symlink") {
		t.Errorf("symlinked state dir: %d %q", code, errs)
	}
	p3, _ := secureConfig(t, "version = 1\n[images.ds]\npath = \"/srv/x\"\nfstype = \"squashfs\"\nsize = 1\n")
	if code, _, errs := runHook(t, state, "--config", p3, "teardown"); code != 2 || !strings.Contains(errs, "images.ds.size") {
		t.Errorf("unknown key in an image table: %d %q", code, errs)
	}
}

// Check 20 at the command level, and check 19's status rules for auto.
func TestMalformedStdin(t *testing.T) {
	p, _ := secureConfig(t, "version = 1\nstate_dir = \""+filepath.Join(t.TempDir(), "state")+"\"\n")
	for name, in := range map[string]string{
		"empty": "", "truncated": `{"id":"a","sta`, "dup": `{"id":"a","id":"b","status":"creating","pid":5,"bundle":"/b"}`,
		"id": `{"id":"../../x","status":"stopped","bundle":"/b"}`, "ann": `{"id":"a","status":"creating","pid":5,"bundle":"/b","annotations":{"k":[]}}`,
	} {
		for _, cmd := range []string{"setup", "teardown", "auto"} {
			code, out, errs := runHook(t, in, "--config", p, cmd)
			if code != 2 || out != "" || strings.Count(errs, "\n") != 1 {
				t.Errorf("%s/%s: exit %d stdout %q stderr %q", name, cmd, code, out, errs)
			}
		}
	}
	code, _, errs := runHook(t, `{"id":"a","status":"running","pid":5,"bundle":"/b"}`, "--config", p, "auto")
	if code != 4 || !strings.HasPrefix(errs, "oci-loop-hook: auto: a: ") {
		t.Errorf("auto with status running: %d %q", code, errs)
	}
	// No request at all: exit 0, nothing written.
	code, out, errs := runHook(t, `{"id":"a","status":"creating","pid":5,"bundle":"/b","annotations":{"x":"y"}}`, "--config", p, "setup")
	if code != 0 || out != "" || errs != "" {
		t.Errorf("no request: %d %q %q", code, out, errs)
	}
	// A request under the built-in-like config (no images): refused.
	code, _, errs = runHook(t, `{"id":"a","status":"creating","pid":5,"bundle":"/b","annotations":{"org.ociloop.image":"ds","org.ociloop.dest":"/data"}}`, "--config", p, "createRuntime")
	if code != 3 || !strings.Contains(errs, `image "ds" is not in the catalog`) {
		t.Errorf("request without catalog: %d %q", code, errs)
	}
}

func TestFailLineIsOneLine(t *testing.T) {
	var b bytes.Buffer
	fail(&b, "setup", "a\nb", errString("x\ny"))
	if strings.Count(b.String(), "\n") != 1 || !strings.HasPrefix(b.String(), `oci-loop-hook: setup: "a\nb": x y`) {
		t.Errorf("%q", b.String())
	}
}

type errString string

func (e errString) Error() string { return string(e) }

// TestErrorTexts pins the exact one-line message of the main error paths
// (issue 13: no repeated context, no class named twice, no logrus or Go
// type names, every error names its object).
func TestErrorTexts(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		return p
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: configuration files must be root-owned")
	}
	state := filepath.Join(dir, "state")
	good := write("good.toml", "version = 1\nlog = \"stderr\"\nstate_dir = \""+state+"\"\n[images.ds]\npath = \""+dir+"/x.img\"\nfstype = \"squashfs\"\n", 0o644)
	unknown := write("unknown.toml", "version = 1\nbogus = 1\n", 0o644)
	badValue := write("value.toml", "version = 2\n", 0o644)
	writable := write("writable.toml", "version = 1\n", 0o666)
	stopped := `{"id":"a","status":"stopped","bundle":"/b"}`
	creating := func(ann string) string {
		return `{"id":"a","status":"creating","pid":5,"bundle":"/b","annotations":` + ann + `}`
	}
	long := "/data/" + strings.Repeat("a", 4090)
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		code  int
		want  string
	}{
		{"missing config", stopped, []string{"--config", dir + "/none.toml", "teardown"}, 2,
			"oci-loop-hook: teardown: config file " + dir + "/none.toml does not exist"},
		{"unknown key", stopped, []string{"--config", unknown, "teardown"}, 2,
			"oci-loop-hook: teardown: " + unknown + ": invalid configuration: unknown key bogus"},
		{"bad value", stopped, []string{"--config", badValue, "teardown"}, 2,
			"oci-loop-hook: teardown: " + badValue + ": invalid configuration: version: must be 1, got 2"},
		{"insecure config", stopped, []string{"--config", writable, "teardown"}, 2,
			"oci-loop-hook: teardown: insecure configuration file: " + writable + ": group- or world-writable (mode 0666)"},
		{"log level", stopped, []string{"--log", "loud", "teardown"}, 2,
			`oci-loop-hook: usage: --log "loud": must be debug, info, warn or error`},
		{"unknown command", "", []string{"--config", good, "frob"}, 2,
			`oci-loop-hook: usage: unknown command "frob" (see --help)`},
		{"wrong stage", `{"id":"a","status":"running","pid":5,"bundle":"/b"}`, []string{"--config", good, "auto"}, 4,
			`oci-loop-hook: auto: a: wrong stage: status "running" is neither creating nor stopped`},
		{"state type", `{"id":"a","status":"creating","pid":"5","bundle":"/b"}`, []string{"--config", good, "setup"}, 2,
			`oci-loop-hook: setup: malformed state: field "pid": JSON string where an integer is expected`},
		{"mounts type", creating(`{"org.ociloop.mounts":"{}"}`), []string{"--config", good, "setup"}, 2,
			"oci-loop-hook: setup: a: annotation org.ociloop.mounts: JSON object where an array is expected"},
		{"mounts field type", creating(`{"org.ociloop.mounts":"[{\"image\":1,\"dest\":\"/data\"}]"}`), []string{"--config", good, "setup"}, 2,
			`oci-loop-hook: setup: a: annotation org.ociloop.mounts[0]: field "image": JSON number where a string is expected`},
		{"PATH_MAX", creating(`{"org.ociloop.image":"ds","org.ociloop.dest":"` + long + `"}`), []string{"--config", good, "setup"}, 2,
			"oci-loop-hook: setup: a: destination longer than 4095 bytes (PATH_MAX)"},
		{"nested", creating(`{"org.ociloop.mounts":"[{\"image\":\"ds\",\"dest\":\"/data\"},{\"image\":\"ds\",\"dest\":\"/data/sub\"}]"}`), []string{"--config", good, "setup"}, 2,
			"oci-loop-hook: setup: a: destinations /data and /data/sub are nested; nested destinations are refused"},
		{"missing image", creating(`{"org.ociloop.image":"ds","org.ociloop.dest":"/data"}`), []string{"--config", good, "setup"}, 3,
			`oci-loop-hook: setup: a: image "ds": open ` + dir + `/x.img: does not exist`},
		{"not in catalog", creating(`{"org.ociloop.image":"nope","org.ociloop.dest":"/data"}`), []string{"--config", good, "setup"}, 3,
			`oci-loop-hook: setup: a: image "nope" is not in the catalog`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := runHook(t, tc.stdin, tc.args...)
			var last string
			if lines := strings.Split(strings.TrimSuffix(errs, "\n"), "\n"); len(lines) > 0 {
				last = lines[len(lines)-1] // log = "stderr" puts log lines first
			}
			if code != tc.code || last != tc.want {
				t.Errorf("exit %d, stderr %q\nwant exit %d, %q", code, errs, tc.code, tc.want)
			}
		})
	}
}

// TestLogFIFO (issue 12, finding 7): a FIFO at the log path, with or
// without a reader, neither hangs nor fails the hook: the log goes to
// stderr after one warning.
func TestLogFIFO(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "log")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	p, _ := secureConfig(t, "version = 1\nstate_dir = \""+filepath.Join(dir, "state")+"\"\nlog = \"file:"+fifo+"\"\n")
	state := `{"id":"a","status":"stopped","bundle":"/b"}`
	check := func(what string) {
		done := make(chan struct{})
		var code int
		var errs string
		go func() {
			defer close(done)
			code, _, errs = runHook(t, state, "--config", p, "--log", "debug", "teardown")
		}()
		select {
		case <-done:
		case <-time.After(time.Minute):
			t.Fatalf("%s: the hook hangs on the FIFO log", what)
		}
		if code != 0 || strings.Count(errs, "log file unusable; logging to stderr") != 1 || !strings.Contains(errs, "teardown done") {
			t.Errorf("%s: exit %d, stderr %q", what, code, errs)
		}
	}
	check("no reader")
	r, err := os.OpenFile(fifo, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	check("with a reader")
	if n, _ := r.Read(make([]byte, 1)); n != 0 {
		t.Errorf("the hook wrote %d bytes into the FIFO", n)
	}
}
