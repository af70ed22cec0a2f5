//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/loopkit/loopkit/internal/hook"
	"github.com/loopkit/loopkit/internal/testutil"
)

// TestHookPodman (check 5): podman 4.3 through hooks.d (one file for
// createRuntime and poststop, "auto"), requests by --annotation. The image
// is mounted; after --rm nothing is left; a failing setup (after which
// podman runs no poststop) leaves nothing either.
func TestHookPodman(t *testing.T) {
	testutil.RequireBinaries(t, "podman")
	w := newHookWorld(t, "")
	hooksDir := w.podmanHooksDir()
	podman := func(args ...string) (string, error) { return w.podman(hooksDir, args...) }

	t.Run("mount", func(t *testing.T) {
		name := hookUniqueID("pm")
		out, err := podman("--name", name, "--annotation", "org.ociloop.image=sq", "--annotation", "org.ociloop.dest=/data",
			"--rootfs", w.rootfs, "/bin/sh", "-c", "grep ' /data ' /proc/self/mountinfo; cat /data/hello.txt")
		if err != nil {
			t.Fatalf("podman run: %v\n%s\n%s", err, out, w.logText())
		}
		if !strings.Contains(out, "hello from the image") || !strings.Contains(out, "ro,nosuid,nodev") {
			t.Errorf("output:\n%s", out)
		}
		if !strings.Contains(w.logText(), "step=teardown") {
			t.Errorf("podman ran no poststop:\n%s", w.logText())
		}
		w.assertClean()
	})
	// Check 22: podman start of a stopped container runs setup again (and
	// poststop at each stop): a fresh record each time, no leak.
	t.Run("restart", func(t *testing.T) {
		name := hookUniqueID("pmre")
		raw := func(args ...string) (string, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			out, err := exec.CommandContext(ctx, "podman", append([]string{"--hooks-dir", hooksDir}, args...)...).CombinedOutput()
			return string(out), err
		}
		defer raw("rm", "-f", name)
		out, err := raw("run", "--name", name, "--network", "none", "--ulimit", "nofile=1024:20000", "--ulimit", "nproc=4096:4096",
			"--annotation", "org.ociloop.image=sq", "--annotation", "org.ociloop.dest=/data",
			"--rootfs", w.rootfs, "/bin/cat", "/data/hello.txt")
		if err != nil || !strings.Contains(out, "hello from the image") {
			t.Fatalf("podman run: %v\n%s", err, out)
		}
		w.assertClean()
		for i := range 2 {
			out, err = raw("start", "--attach", name)
			if err != nil || !strings.Contains(out, "hello from the image") {
				t.Fatalf("podman start #%d: %v\n%s\n%s", i, err, out, w.logText())
			}
			w.assertClean()
		}
		if _, err := raw("rm", name); err != nil {
			t.Error(err)
		}
		w.assertClean()
	})
	t.Run("setup-fails", func(t *testing.T) {
		name := hookUniqueID("pmfail")
		out, err := podman("--name", name, "--annotation", "org.ociloop.image=sq", "--annotation", "org.ociloop.dest=/data/missing",
			"--rootfs", w.rootfs, "/bin/true")
		if err == nil {
			t.Fatalf("podman run succeeded:\n%s", out)
		}
		if !strings.Contains(out, "does not exist in the container") {
			t.Errorf("podman output lacks the hook's reason:\n%s", out)
		}
		exec.Command("podman", "rm", "-f", name).Run()
		w.assertClean()
	})
}

// TestHookContribRuncExample checks that the runc example config.json is a
// valid runtime-spec config whose hooks run setup at createRuntime and
// teardown at poststop, with a request the hook parses.
func TestHookContribRuncExample(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(criRepoRoot(t), "contrib", "runc", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatal(err)
	}
	if spec.Hooks == nil || len(spec.Hooks.CreateRuntime) != 1 || len(spec.Hooks.Poststop) != 1 {
		t.Fatalf("hooks: %+v", spec.Hooks)
	}
	if a := spec.Hooks.CreateRuntime[0].Args; len(a) != 2 || a[1] != "setup" {
		t.Errorf("createRuntime args %v", a)
	}
	if a := spec.Hooks.Poststop[0].Args; len(a) != 2 || a[1] != "teardown" {
		t.Errorf("poststop args %v", a)
	}
	reqs, err := hook.ParseAnnotations(spec.Annotations, "org.ociloop.", 4)
	if err != nil || len(reqs) != 1 {
		t.Errorf("annotations %v: %v", spec.Annotations, err)
	}
}

// podmanHooksDir writes the shipped hooks.d file, with only the binary path
// and the config flag changed (its annotation regex and stages are what is
// tested), into a hooks directory of the world.
func (w *hookWorld) podmanHooksDir() string {
	t := w.t
	t.Helper()
	hooksDir := filepath.Join(w.dir, "hooks.d")
	if err := os.MkdirAll(hooksDir, 0o755); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(criRepoRoot(t), "contrib", "hooks.d", "50-oci-loop-hook.json"))
	if err != nil {
		t.Fatal(err)
	}
	var entry map[string]any
	if err := json.Unmarshal(raw, &entry); err != nil {
		t.Fatal(err)
	}
	h := entry["hook"].(map[string]any)
	if h["path"] != "/usr/local/libexec/oci-loop-hook" || fmt.Sprint(h["args"]) != "[oci-loop-hook auto]" {
		t.Fatalf("contrib hooks.d entry changed: %v", h)
	}
	h["path"] = w.bin
	h["args"] = []string{"oci-loop-hook", "--config", w.config, "--log", "debug", "auto"}
	hookJSON, _ := json.Marshal(entry)
	if err := os.WriteFile(filepath.Join(hooksDir, "50-oci-loop-hook.json"), hookJSON, 0o644); err != nil {
		t.Fatal(err)
	}
	return hooksDir
}

// podman runs "podman run --rm" with the hooks directory and the test's
// resource limits.
func (w *hookWorld) podman(hooksDir string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	all := append([]string{"--hooks-dir", hooksDir, "run", "--rm", "--network", "none",
		"--ulimit", "nofile=1024:20000", "--ulimit", "nproc=4096:4096"}, args...)
	out, err := exec.CommandContext(ctx, "podman", all...).CombinedOutput()
	return string(out), err
}
