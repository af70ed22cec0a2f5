//go:build integration

package integration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/internal/testutil"
)

// hookWorld is one test's installation of oci-loop-hook: the static binary,
// root-owned images, a config, a state directory, a log, a runc root and
// bundles, all under one temp dir that NoLeaks watches.
type hookWorld struct {
	t        *testing.T
	dir      string
	bin      string
	config   string
	state    string
	log      string
	images   string
	runcRoot string
	rootfs   string // shared busybox rootfs template
	cfgBody  string
}

// hookBuild builds the hook statically (CGO_ENABLED=0) into dir; ldflags
// may set test-only variables.
func hookBuild(t *testing.T, dir, name string, ldflags string) string {
	t.Helper()
	out := filepath.Join(dir, name)
	args := []string{"build", "-o", out}
	if ldflags != "" {
		args = append(args, "-ldflags", ldflags)
	}
	cmd := exec.Command("go", append(args, "./cmd/oci-loop-hook")...)
	cmd.Dir = criRepoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return out
}

// newHookWorld gates on root, loop devices and the tools, and builds the
// images squashfs/erofs/ext4 (catalog names sq, erofs, ext4).
func newHookWorld(t *testing.T, extraConfig string) *hookWorld {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "runc", "busybox", "mksquashfs", "mkfs.erofs", "mkfs.ext4", "go")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	w := &hookWorld{
		t: t, dir: dir, state: filepath.Join(dir, "state"), log: filepath.Join(dir, "hook.log"),
		images: filepath.Join(dir, "images"), runcRoot: filepath.Join(dir, "runc"),
	}
	for _, d := range []string{w.images, w.runcRoot, filepath.Join(dir, "bin")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	w.bin = hookBuild(t, filepath.Join(dir, "bin"), "oci-loop-hook", "")
	src := filepath.Join(dir, "src")
	os.MkdirAll(src, 0o755)
	if err := os.WriteFile(filepath.Join(src, "hello.txt"), []byte("hello from the image\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	hookRun(t, "mksquashfs", src, filepath.Join(w.images, "sq.sqfs"), "-noappend", "-quiet", "-no-progress")
	hookRun(t, "mkfs.erofs", "--quiet", filepath.Join(w.images, "e.erofs"), src)
	hookRun(t, "mkfs.ext4", "-q", "-F", "-d", src, filepath.Join(w.images, "x.ext4"), "8M")
	for _, f := range []string{"sq.sqfs", "e.erofs", "x.ext4"} {
		os.Chmod(filepath.Join(w.images, f), 0o644)
	}
	w.cfgBody = fmt.Sprintf(`version = 1
state_dir = %q
log = "file:%s"
timeout_seconds = 20
%s
[images.sq]
path = %q
fstype = "squashfs"

[images.erofs]
path = %q
fstype = "erofs"

[images.ext4]
path = %q
fstype = "ext4"
`, w.state, w.log, extraConfig, filepath.Join(w.images, "sq.sqfs"), filepath.Join(w.images, "e.erofs"), filepath.Join(w.images, "x.ext4"))
	w.config = filepath.Join(dir, "config.toml")
	if err := os.WriteFile(w.config, []byte(w.cfgBody), 0o644); err != nil {
		t.Fatal(err)
	}
	w.rootfs = filepath.Join(dir, "rootfs")
	hookBusyboxRootfs(t, w.rootfs)
	return w
}

func hookRun(t *testing.T, argv ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", argv, err, out)
	}
	return string(out)
}

func hookBusyboxRootfs(t *testing.T, rootfs string) {
	t.Helper()
	for _, d := range []string{"bin", "proc", "sys", "dev", "data", "mnt", "tmp", "etc"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"sh", "ls", "cat", "grep", "sleep", "stat", "touch", "true", "mount", "echo"} {
		os.Symlink("busybox", filepath.Join(rootfs, "bin", c))
	}
}

func hookUniqueID(prefix string) string {
	var b [4]byte
	rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

// bundleOpts shape a runc bundle.
type bundleOpts struct {
	args        []string
	annotations map[string]string
	setupArgs   []string // hook args after argv[0]; default --config C setup
	setupEnv    []string
	noMountNS   bool
	propagation string
	prepare     func(rootfs string)
	hookPath    string
	extraMounts []map[string]any
	hookTimeout int    // createRuntime entry timeout in seconds; 0 = 30
	dir         string // bundle directory name under bundles/; "" = the id
	prestart    bool   // register the setup entry as prestart too
	userNS      bool   // a user namespace of its own (ids mapped 1:1), with CAP_SYS_ADMIN in it
	uid         int    // process user and group; 0 = root
}

// bundle writes a runc bundle (config.json from "runc spec", own rootfs copy
// with busybox) whose createRuntime/poststop hooks run the hook.
func (w *hookWorld) bundle(id string, o bundleOpts) string {
	t := w.t
	t.Helper()
	name := id
	if o.dir != "" {
		name = o.dir
	}
	b := filepath.Join(w.dir, "bundles", name)
	rootfs := filepath.Join(b, "rootfs")
	hookBusyboxRootfs(t, rootfs)
	if o.prepare != nil {
		o.prepare(rootfs)
	}
	hookRun(t, "runc", "spec", "--bundle", b)
	raw, err := os.ReadFile(filepath.Join(b, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var spec map[string]any
	if err := json.Unmarshal(raw, &spec); err != nil {
		t.Fatal(err)
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = o.args
	proc["rlimits"] = []any{map[string]any{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}}
	if o.annotations != nil {
		spec["annotations"] = o.annotations
	}
	hookPath := w.bin
	if o.hookPath != "" {
		hookPath = o.hookPath
	}
	setupArgs := o.setupArgs
	if setupArgs == nil {
		setupArgs = []string{"--config", w.config, "--log", "debug", "setup"}
	}
	env := o.setupEnv
	if env == nil {
		env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	timeout := o.hookTimeout
	if timeout == 0 {
		timeout = 30
	}
	setupEntry := map[string]any{"path": hookPath, "args": append([]string{"oci-loop-hook"}, setupArgs...), "env": env, "timeout": timeout}
	hooks := map[string]any{
		"createRuntime": []any{setupEntry},
		"poststop": []any{map[string]any{"path": hookPath, "args": []string{"oci-loop-hook", "--config", w.config, "--log", "debug", "teardown"},
			"env": env, "timeout": 30}},
	}
	if o.prestart {
		hooks["prestart"] = []any{setupEntry}
	}
	spec["hooks"] = hooks
	if o.uid != 0 {
		proc["user"] = map[string]any{"uid": o.uid, "gid": o.uid}
	}
	linux := spec["linux"].(map[string]any)
	if o.userNS {
		linux["namespaces"] = append(linux["namespaces"].([]any), map[string]any{"type": "user"})
		idmap := []any{map[string]any{"containerID": 0, "hostID": 0, "size": 65536}}
		linux["uidMappings"], linux["gidMappings"] = idmap, idmap
		caps := proc["capabilities"].(map[string]any)
		for _, set := range []string{"bounding", "effective", "permitted"} {
			caps[set] = append(caps[set].([]any), "CAP_SYS_ADMIN")
		}
	}
	if o.noMountNS {
		var ns []any
		for _, n := range linux["namespaces"].([]any) {
			if n.(map[string]any)["type"] != "mount" {
				ns = append(ns, n)
			}
		}
		linux["namespaces"] = ns
		// Without a mount namespace runc would make these mounts on the host;
		// masked/readonly paths need a private namespace.
		spec["mounts"] = []any{}
		delete(linux, "maskedPaths")
		delete(linux, "readonlyPaths")
		spec["root"].(map[string]any)["readonly"] = false
	}
	for _, m := range o.extraMounts {
		spec["mounts"] = append(spec["mounts"].([]any), m)
	}
	if o.propagation != "" {
		linux["rootfsPropagation"] = o.propagation
	}
	out, _ := json.MarshalIndent(spec, "", " ")
	if err := os.WriteFile(filepath.Join(b, "config.json"), out, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.runcForceDelete(id) })
	return b
}

func (w *hookWorld) runc(args ...string) *exec.Cmd {
	return exec.Command("runc", append([]string{"--root", w.runcRoot}, args...)...)
}

// withConfig writes a variant of the world's config: top-level keys extra
// (before the image tables) and tables appended after them.
func (w *hookWorld) withConfig(name, extra, tables string) string {
	w.t.Helper()
	i := strings.Index(w.cfgBody, "[images.")
	body := w.cfgBody[:i] + extra + "\n" + w.cfgBody[i:] + "\n" + tables
	p := filepath.Join(w.dir, name+".toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		w.t.Fatal(err)
	}
	return p
}

// setupWith returns hook args for setup under config path.
func setupWith(path string) []string { return []string{"--config", path, "--log", "debug", "setup"} }

// runcRun runs the container in the foreground and returns its combined
// output and error.
func (w *hookWorld) runcRun(id, bundle string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "runc", "--root", w.runcRoot, "run", "--bundle", bundle, id)
	cmd.Stdin = nil
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// runcDetached creates and starts a container whose process keeps running.
// Its stdio goes to a file: a pipe would be inherited by the container's
// process and keep CombinedOutput waiting until the container exits.
func (w *hookWorld) runcDetached(id, bundle string) error {
	return w.runcDetachedIn(w.runcRoot, id, bundle)
}

// runcDetachedIn is runcDetached under another runc root.
func (w *hookWorld) runcDetachedIn(root, id, bundle string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	logf, err := os.CreateTemp(w.dir, "runc-out-*")
	if err != nil {
		return err
	}
	defer os.Remove(logf.Name())
	defer logf.Close()
	cmd := exec.CommandContext(ctx, "runc", "--root", root, "run", "--detach", "--bundle", bundle, id)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Run(); err != nil {
		out, _ := os.ReadFile(logf.Name())
		return fmt.Errorf("runc run -d %s: %v: %s", id, err, out)
	}
	return nil
}

func (w *hookWorld) runcExec(id string, argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "runc", append([]string{"--root", w.runcRoot, "exec", id}, argv...)...).CombinedOutput()
	return string(out), err
}

// runcStop kills and deletes a container (poststop runs at delete).
func (w *hookWorld) runcStop(id string) {
	w.t.Helper()
	w.runcStopIn(w.runcRoot, id)
}

// runcStopIn is runcStop under another runc root.
func (w *hookWorld) runcStopIn(root, id string) {
	w.t.Helper()
	_ = exec.Command("runc", "--root", root, "kill", id, "KILL").Run()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out []byte
	var err error
	for range 100 {
		out, err = exec.CommandContext(ctx, "runc", "--root", root, "delete", id).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "running") {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil && !strings.Contains(string(out), "does not exist") {
		w.t.Errorf("runc delete %s: %v %s", id, err, out)
	}
}

func (w *hookWorld) runcForceDelete(id string) {
	_ = w.runc("delete", "--force", id).Run()
}

// record reads the state record of id (keyed by id and bundle, so found by
// its "id" field), or nil.
func (w *hookWorld) record(id string) map[string]any {
	files, _ := filepath.Glob(filepath.Join(w.state, "*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			w.t.Fatalf("record %s: %v", f, err)
		}
		if m["id"] == id {
			return m
		}
	}
	return nil
}

// recordLoops lists the loop device names (loopN) of a record.
func recordLoops(rec map[string]any) []string {
	var out []string
	if rec == nil {
		return nil
	}
	for _, m := range rec["mounts"].([]any) {
		out = append(out, strings.TrimPrefix(m.(map[string]any)["device"].(string), "/dev/"))
	}
	return out
}

// assertClean fails unless no loop device is bound to an image, no record
// exists and no hook process is alive.
func (w *hookWorld) assertClean() {
	t := w.t
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var bound []string
		for _, f := range []string{"sq.sqfs", "e.erofs", "x.ext4"} {
			bound = append(bound, testutil.BoundTo(filepath.Join(w.images, f))...)
		}
		if len(bound) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("still bound: %v", bound)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Neither records nor lock files: after a container's poststop the
	// state directory holds nothing of it (issue 12, finding 9).
	entries, _ := os.ReadDir(w.state)
	for _, e := range entries {
		t.Errorf("state left: %s", e.Name())
	}
	if p := hookProcesses(w.bin); len(p) > 0 {
		t.Errorf("hook processes left: %v", p)
	}
}

// hookProcesses lists pids whose executable is bin.
func hookProcesses(bin string) []string {
	var out []string
	exes, _ := filepath.Glob("/proc/[0-9]*/exe")
	for _, e := range exes {
		if l, err := os.Readlink(e); err == nil && strings.TrimSuffix(l, " (deleted)") == bin {
			out = append(out, filepath.Base(filepath.Dir(e)))
		}
	}
	return out
}

func (w *hookWorld) logText() string {
	b, _ := os.ReadFile(w.log)
	return string(b)
}

// hookState builds an OCI state JSON.
func hookState(id, status string, pid int, bundle string, ann map[string]string) string {
	m := map[string]any{"ociVersion": "1.0.2", "id": id, "status": status, "bundle": bundle}
	if pid > 0 {
		m["pid"] = pid
	}
	if ann != nil {
		m["annotations"] = ann
	}
	b, _ := json.Marshal(m)
	return string(b)
}

// runHook runs the binary directly with the given stdin, env and cwd.
func runHookBin(t *testing.T, bin, stdin string, env []string, cwd string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Args[0] = "oci-loop-hook"
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Env = env
	if cmd.Env == nil {
		cmd.Env = []string{}
	}
	cmd.Dir = cwd
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run hook: %v", err)
	}
	return code, stderr.String()
}

func annFor(image, dest string) map[string]string {
	return map[string]string{"org.ociloop.image": image, "org.ociloop.dest": dest}
}

// hookHostMountsUnder returns the host mountinfo lines whose mount point is
// at or below one of dirs (the rest of the host changes under other tests).
func hookHostMountsUnder(dirs ...string) string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 5 {
			continue
		}
		for _, d := range dirs {
			if f[4] == d || strings.HasPrefix(f[4], d+"/") {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "\n")
}
