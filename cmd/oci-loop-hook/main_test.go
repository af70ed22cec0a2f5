package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runHook(t *testing.T, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(args, strings.NewReader(stdin), &out, &errb)
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
