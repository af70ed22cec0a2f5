//go:build integration

package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	toml "github.com/pelletier/go-toml/v2"

	"github.com/loopkit/loopkit/internal/testutil"
)

// TestCRIPodWithHookMount is the Kubernetes path of oci-loop-hook with
// containerd 1.6, as docs/operations.md describes it: containerd's CRI does
// not read hooks.d, so a runtime handler ("loophook", from contrib's
// snippet) gets a base_runtime_spec whose hooks run oci-loop-hook, and
// pod_annotations lets org.ociloop.* pod annotations through to the OCI spec. A pod on that
// handler asks for a catalog image; the container must see the squashfs
// read-only at /data on a loop device, its rootfs still on the snapshotter,
// and the hook's device must be gone once the container is removed.
func TestCRIPodWithHookMount(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "containerd", "containerd-shim-runc-v2", "runc", "ctr", "busybox", "mkfs.ext4", "mksquashfs", "go")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	repo := criRepoRoot(t)

	// The data image and the hook's root-owned catalog.
	for _, d := range []string{"images", "imgsrc", "hookstate", "logs", "etc", "bin"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	const greeting = "hello from a squashfs data image\n"
	if err := os.WriteFile(filepath.Join(dir, "imgsrc", "hello.txt"), []byte(greeting), 0o644); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(dir, "images", "dataset1.sqfs")
	criRun(t, time.Minute, "mksquashfs", filepath.Join(dir, "imgsrc"), image, "-noappend", "-quiet", "-all-root")
	if err := os.Chmod(image, 0o644); err != nil {
		t.Fatal(err)
	}
	hookLog := filepath.Join(dir, "logs", "oci-loop-hook.log")
	hookCfg := filepath.Join(dir, "etc", "oci-loop-hook.toml")
	cfgBody := fmt.Sprintf("version = 1\nstate_dir = %q\nlog = %q\n\n[images.dataset1]\npath = %q\nfstype = \"squashfs\"\n",
		filepath.Join(dir, "hookstate"), "file:"+hookLog, image)
	if err := os.WriteFile(hookCfg, []byte(cfgBody), 0o644); err != nil {
		t.Fatal(err)
	}
	hookBin := criGoBuild(t, repo, "cmd/oci-loop-hook", filepath.Join(dir, "bin"))
	baseSpec := criHookBaseSpec(t, dir, hookBin, hookCfg)

	// contrib's handler snippet, with the base spec and runc root moved
	// into the test directory.
	handler := criHookHandler(t, repo)
	handler["base_runtime_spec"] = baseSpec
	criTable(t, handler, "options")["Root"] = filepath.Join(dir, "runc")
	n := criStartNode(t, dir, criImageRef, func(cfg map[string]any) {
		criTable(t, cfg, "plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes")["loophook"] = handler
	})
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(hookLog)
			t.Logf("oci-loop-hook log:\n%s", b)
		}
	})
	n.importTestImage()

	// Pod annotations, as kubelet passes them; the handler lets them through
	// to the containers.
	podCfg := criPodConfig(t, dir, "loopkit-cri-hook", map[string]string{
		"org.ociloop.image": "dataset1",
		"org.ociloop.dest":  "/data",
	})
	ctrCfg := criWriteJSON(t, dir, "hook-container.json", map[string]any{
		"metadata": map[string]any{"name": "reader"},
		"image":    map[string]any{"image": criImageRef},
		"command":  []string{"/bin/sleep", "1000000"},
		"log_path": "reader.log",
		"linux":    map[string]any{},
	})
	podID := strings.TrimSpace(n.crictlRun("runp", "--runtime", "loophook", podCfg))
	cid := strings.TrimSpace(n.crictlRun("create", podID, ctrCfg, podCfg))
	n.crictlRun("start", cid)

	// crictl adds newlines of its own after the command's output.
	if got := n.crictlRun("exec", "--sync", cid, "cat", "/data/hello.txt"); strings.TrimRight(got, "\n") != strings.TrimRight(greeting, "\n") {
		t.Errorf("/data/hello.txt in the container: %q, want %q", got, greeting)
	}
	if out, err := criTry(30*time.Second, n.crictlArgs("exec", "--sync", cid, "sh", "-c", "echo x > /data/new")...); err == nil {
		t.Errorf("writing to the read-only data image succeeded: %s", out)
	}
	var insp struct {
		Info struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	n.crictlJSON(&insp, "inspect", cid)
	criCheckLoopRoot(t, n, "container", insp.Info.Pid)
	dev := criCheckHookMount(t, insp.Info.Pid, image)

	// One record: the app container's. The sandbox (pause) container, on
	// the same handler and image (which has /data), asks for nothing.
	if recs, _ := filepath.Glob(filepath.Join(dir, "hookstate", "*.json")); len(recs) != 1 {
		t.Errorf("hook state records while the container runs: %v, want exactly one", recs)
	}

	n.crictlRun("stop", cid)
	n.crictlRun("rm", cid)
	// poststop (and autoclear at the last unmount) release the device.
	criWaitFor(t, "the hook's loop device released", func() (bool, string) {
		b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
		if err != nil || strings.TrimSpace(string(b)) != image {
			return true, dev + " no longer backed by the image"
		}
		return false, dev + " still backed by " + image
	})
	// poststop ran the guarded teardown: no state record is left.
	if recs, _ := filepath.Glob(filepath.Join(dir, "hookstate", "*.json")); len(recs) != 0 {
		t.Errorf("hook state records left after the container was removed: %v", recs)
	}
	n.crictlRun("stopp", podID)
	n.crictlRun("rmp", podID)
	n.crictlRun("rmi", criImageRef)
	n.stopContainerd()
	n.stopSnapshotter()
	if left := n.leftovers(); len(left) > 0 {
		t.Errorf("left behind:\n  %s", strings.Join(left, "\n  "))
	}
}

// criHookHandler returns the runtime handler table of contrib's CRI hook
// snippet.
func criHookHandler(t *testing.T, repo string) map[string]any {
	t.Helper()
	const name = "contrib/containerd/cri-hook-runtime-containerd-1.6.toml"
	raw, err := os.ReadFile(filepath.Join(repo, name))
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := toml.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	h := criTable(t, cfg, "plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes", "loophook")
	if h["runtime_type"] != "io.containerd.runc.v2" || h["base_runtime_spec"] == nil || h["pod_annotations"] == nil {
		t.Fatalf("%s: handler loophook = %v", name, h)
	}
	return h
}

// criHookBaseSpec writes a base runtime spec (containerd's default spec)
// whose createRuntime and poststop hooks run oci-loop-hook "auto".
func criHookBaseSpec(t *testing.T, dir, hookBin, hookCfg string) string {
	t.Helper()
	out, err := exec.Command("ctr", "oci", "spec").Output()
	if err != nil {
		t.Fatalf("ctr oci spec: %v", err)
	}
	var spec map[string]any
	if err := json.Unmarshal(out, &spec); err != nil {
		t.Fatal(err)
	}
	hook := map[string]any{
		"path":    hookBin,
		"args":    []string{"oci-loop-hook", "--config", hookCfg, "auto"},
		"timeout": 30,
	}
	spec["hooks"] = map[string]any{
		"createRuntime": []any{hook},
		"poststop":      []any{hook},
	}
	return criWriteJSON(t, dir, "loophook-base-spec.json", spec)
}

// criCheckHookMount requires /data in pid's mount namespace to be the
// squashfs image, read-only, from a loop device backed by image, and
// returns the device.
func criCheckHookMount(t *testing.T, pid int, image string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 10 || f[4] != "/data" {
			continue
		}
		sep := -1
		for i, x := range f {
			if x == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+2 >= len(f) {
			t.Fatalf("malformed mountinfo line: %s", line)
		}
		fstype, source, opts := f[sep+1], f[sep+2], f[5]
		if fstype != "squashfs" || !strings.HasPrefix(source, "/dev/loop") || !strings.HasPrefix(opts, "ro") {
			t.Fatalf("/data is %s from %s (%s), want squashfs from /dev/loopN, ro:\n%s", fstype, source, opts, line)
		}
		backing, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(source), "loop", "backing_file"))
		if err != nil || strings.TrimSpace(string(backing)) != image {
			t.Fatalf("%s is backed by %q (%v), want %s", source, backing, err, image)
		}
		t.Logf("/data: %s on %s (%s)", fstype, source, opts)
		return source
	}
	t.Fatalf("no /data mount in the container:\n%s", b)
	return ""
}
