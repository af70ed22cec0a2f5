//go:build integration

package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/internal/ociimage"
	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
)

// snapshotterModes lists the snapshotter's storage modes every
// containerd-facing test runs in. A mode is the `mode` key of the
// snapshotter's configuration.
var snapshotterModes = []string{config.ModeFlat, config.ModeLayered}

// ctdDaemon is one containerd release the tests run against: its binaries
// and what differs between the 1.x and 2.x configuration formats.
type ctdDaemon struct {
	name       string // "containerd-1.6.20": the subtest name
	major      int    // 1 or 2
	containerd string // path of containerd
	ctr        string // path of the matching ctr
	// binDir, when set, goes first on PATH: containerd starts the shim it
	// finds first there, and 2.x must not start Debian's 1.6 shim.
	binDir string
}

// containerd2Version is the containerd 2.x release `make tools` builds.
const containerd2Version = "2.4.2"

// ctdDaemons returns the containerds to test against: Debian's 1.6 from
// PATH and the 2.x that `make tools` builds into bin/tools (directory in
// LOOPKIT_CONTAINERD2_DIR, set by the Makefile). A missing one is a subtest
// that skips, or fails under `make test`, with how to install it.
func ctdDaemons(t testing.TB) []ctdDaemon {
	t.Helper()
	var out []ctdDaemon
	v1 := ctdDaemon{major: 1, name: "containerd-1.6"}
	if p, err := exec.LookPath("containerd"); err == nil {
		v1.containerd = p
		v1.ctr, _ = exec.LookPath("ctr")
		if b, err := exec.Command(p, "--version").Output(); err == nil {
			if f := strings.Fields(string(b)); len(f) >= 3 {
				v, _, _ := strings.Cut(strings.TrimPrefix(f[2], "v"), "~")
				v1.name = "containerd-" + v
			}
		}
	}
	out = append(out, v1)
	dir := os.Getenv("LOOPKIT_CONTAINERD2_DIR")
	if dir == "" {
		dir = filepath.Join(criRepoRoot(t), "bin", "tools", "containerd-"+containerd2Version)
	}
	v2 := ctdDaemon{major: 2, name: "containerd-" + containerd2Version, binDir: dir}
	if _, err := os.Stat(filepath.Join(dir, "containerd-shim-runc-v2")); err == nil {
		v2.containerd = filepath.Join(dir, "containerd")
		v2.ctr = filepath.Join(dir, "ctr")
	}
	return append(out, v2)
}

// require ends the (sub)test when the daemon's binaries are not installed.
func (d ctdDaemon) require(t *testing.T) {
	t.Helper()
	if d.containerd != "" && d.ctr != "" {
		return
	}
	if d.major == 1 {
		testutil.Missing(t, "containerd", "")
	}
	testutil.Missing(t, "containerd "+containerd2Version+" in "+d.binDir, "make tools")
}

// env is the environment the daemon and its clients run with.
func (d ctdDaemon) env() []string {
	if d.binDir == "" {
		return nil
	}
	return []string{"PATH=" + d.binDir + ":" + os.Getenv("PATH")}
}

// forEachDaemonMode runs fn as one subtest per containerd release and
// snapshotter mode, named "containerd-2.4.2/flat".
func forEachDaemonMode(t *testing.T, fn func(t *testing.T, d ctdDaemon, mode string)) {
	t.Helper()
	forEachModeOf(t, 0, fn)
}

// forEachModeOf is forEachDaemonMode for one containerd major release (0:
// every release): the nerdctl and socket-activation paths need 2.x, and
// 1.6 has its own nerdctl limits.
func forEachModeOf(t *testing.T, major int, fn func(t *testing.T, d ctdDaemon, mode string)) {
	t.Helper()
	for _, d := range ctdDaemons(t) {
		if major != 0 && d.major != major {
			continue
		}
		for _, mode := range snapshotterModes {
			t.Run(d.name+"/"+mode, func(t *testing.T) {
				d.require(t)
				fn(t, d, mode)
			})
		}
	}
}

// snapModeConfig is the snapshotter configuration line selecting mode.
// Before the configuration had a mode key, flat was the only mode and
// nothing is written.
func snapModeConfig(t *testing.T, mode string) string {
	t.Helper()
	typ := reflect.TypeOf(config.Snapshotter{})
	for i := 0; i < typ.NumField(); i++ {
		if strings.Split(typ.Field(i).Tag.Get("toml"), ",")[0] == "mode" {
			return fmt.Sprintf("mode = %q\n", mode)
		}
	}
	if mode != "flat" {
		t.Fatalf("snapshotter mode %q: the configuration has no mode key", mode)
	}
	return ""
}

// ctdShortDir returns a short private directory: unix socket paths (the 2.x
// shims' sockets, named by a 64-hex digest) must stay under 108 bytes, which
// t.TempDir's long names exceed.
func ctdShortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "lk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// ctdEnv is a private containerd (1.6 or 2.x) with loop-snapshotter as the
// proxy plugin "loop", everything under one temporary directory: its own
// root, state, sockets, runc root and namespace. It never touches a system
// containerd (CRI is disabled; the CRI path has its own test).
type ctdEnv struct {
	t        *testing.T
	d        ctdDaemon
	mode     string
	dir      string
	sock     string
	ns       string
	runcRoot string
	snapRoot string
	snapBin  string
	shimDir  string
	snap     *snapDaemon
	ctrd     *criProc
}

// ctdStart builds and starts loop-snapshotter (in mode, configuration body
// snapConfig) and containerd d, and registers their orderly stop.
func ctdStart(t *testing.T, d ctdDaemon, mode, snapConfig string) *ctdEnv {
	t.Helper()
	testutil.RequireRoot(t)
	d.require(t)
	testutil.RequireBinaries(t, "runc", "busybox", "mkfs.ext4", "go")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	e := &ctdEnv{
		t:        t,
		d:        d,
		mode:     mode,
		dir:      dir,
		sock:     filepath.Join(dir, "run", "containerd.sock"),
		ns:       fmt.Sprintf("loopkit-e2e-%d", rand.Int63()),
		runcRoot: filepath.Join(dir, "runc"),
		snapRoot: filepath.Join(dir, "root", "io.containerd.snapshotter.v1.loop"),
		shimDir:  ctdShortDir(t),
	}
	for _, d := range []string{"run", "bin", "etc", "logs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	e.snapBin = snapBuild(t, filepath.Join(dir, "bin"))
	// Last cleanup: on failure remove what the orderly teardown did not.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		criKillProcessesUnder(t, dir)
		criUnmountUnder(t, dir)
		criDetachUnder(t, dir)
	})
	cfg := snapWriteConfig(t, filepath.Join(dir, "etc"), snapModeConfig(t, mode)+snapConfig)
	snap, err := startSnapDaemon(e.snapBin, cfg, e.snapRoot, filepath.Join(dir, "run", "loop.sock"), filepath.Join(dir, "logs", "loop-snapshotter.log"))
	if err != nil {
		t.Fatal(err)
	}
	e.snap = snap
	t.Cleanup(func() {
		if err := e.snap.stop(); err != nil {
			t.Error(err)
		}
		e.snap.conn.Close()
	})

	ctrdCfg := filepath.Join(dir, "etc", "containerd.toml")
	if err := os.WriteFile(ctrdCfg, []byte(e.containerdConfig()), 0o600); err != nil {
		t.Fatal(err)
	}
	e.ctrd = criStart(t, "containerd", filepath.Join(dir, "logs", "containerd.log"), d.env(),
		d.containerd, "--config", ctrdCfg, "--log-level", "debug")
	t.Cleanup(func() {
		if !e.ctrd.stop(30 * time.Second) {
			t.Errorf("containerd did not stop on SIGTERM within 30s")
		}
	})
	criWaitSocket(t, e.ctrd, e.sock, 60*time.Second)
	// First cleanup to run: on failure, show the logs and remove tasks
	// while the daemons still run.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		t.Logf("containerd log tail:\n%s", e.ctrd.tail(40))
		t.Logf("loop-snapshotter log tail:\n%s", e.snap.proc.tail(40))
		out, _ := e.try("task", "ls", "-q")
		for _, id := range strings.Fields(out) {
			_, _ = e.try("task", "kill", "-s", "SIGKILL", id)
			time.Sleep(200 * time.Millisecond)
			_, _ = e.try("task", "delete", "-f", id)
		}
		out, _ = e.try("container", "ls", "-q")
		for _, id := range strings.Fields(out) {
			_, _ = e.try("container", "rm", id)
		}
	})
	return e
}

// containerdConfig is the documented proxy-plugin snippet for the daemon's
// release with every daemon path private.
func (e *ctdEnv) containerdConfig() string {
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	if e.d.major >= 2 {
		return ctdConfig2(ctdPaths{dir: e.dir, sock: e.sock, snapSock: e.snap.sock, shimDir: e.shimDir}, false)
	}
	return fmt.Sprintf(`version = 2
root = %s
state = %s
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = %s
[ttrpc]
  address = %s

[proxy_plugins]
  [proxy_plugins.loop]
    type = "snapshot"
    address = %s

[plugins."io.containerd.internal.v1.opt"]
  path = %s
`, q(filepath.Join(e.dir, "root")), q(filepath.Join(e.dir, "state")), q(e.sock), q(e.sock+".ttrpc"),
		q(e.snap.sock), q(filepath.Join(e.dir, "opt")))
}

// ctdPaths are the private paths of a containerd 2.x instance.
type ctdPaths struct {
	dir      string   // root, state, temp and opt live below it
	sock     string   // gRPC socket; ttrpc is sock + ".ttrpc"
	snapSock string   // loop-snapshotter's socket
	proxies  string   // instead of snapSock: the [proxy_plugins] tables
	unpack   []string // snapshotters to unpack for (default loop, overlayfs)
	shimDir  string   // shim sockets (short path)
}

// ctdConfig2 is a containerd 2.x configuration (version 4, as containerd
// config migrate prints it) with every path
// private: what a 2.x instance needs beyond the 1.6 settings. With cri
// false the CRI plugins are disabled.
func ctdConfig2(p ctdPaths, cri bool) string {
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	disabled := `"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"`
	if !cri {
		disabled += `, "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim"`
	}
	if len(p.unpack) == 0 {
		p.unpack = []string{"loop", "overlayfs"}
	}
	var unpack strings.Builder
	for _, sn := range p.unpack {
		fmt.Fprintf(&unpack, "  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n    platform = %s\n    snapshotter = %s\n", q("linux/"+runtime.GOARCH), q(sn))
	}
	proxies := p.proxies
	if proxies == "" {
		proxies = fmt.Sprintf("  [proxy_plugins.loop]\n    type = \"snapshot\"\n    address = %s\n", q(p.snapSock))
	}
	return fmt.Sprintf(`version = 4
root = %s
state = %s
temp = %s
disabled_plugins = [%s]

[proxy_plugins]
%s
[plugins]
  [plugins.'io.containerd.server.v1.grpc']
    address = %s
  [plugins.'io.containerd.server.v1.ttrpc']
    address = %s
  [plugins.'io.containerd.internal.v1.opt']
    path = %s
  # 2.x puts shim sockets in /run/containerd/s otherwise.
  [plugins.'io.containerd.shim.v1.manager']
    socket_dir = %s
  # Keep a private instance off the host's NRI socket.
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  # ctr images import and nerdctl load go through the transfer service in
  # 2.x, which unpacks only for the snapshotters listed here.
%s`, q(filepath.Join(p.dir, "root")), q(filepath.Join(p.dir, "state")), q(filepath.Join(p.dir, "tmp")), disabled,
		proxies, q(p.sock), q(p.sock+".ttrpc"), q(filepath.Join(p.dir, "opt")), q(p.shimDir),
		unpack.String())
}

func (e *ctdEnv) ctrArgs(args ...string) []string {
	return append([]string{e.d.ctr, "--address", e.sock, "--namespace", e.ns}, args...)
}

// ctr runs ctr against the private containerd and returns stdout.
func (e *ctdEnv) ctr(args ...string) string {
	e.t.Helper()
	return criRun(e.t, 3*time.Minute, e.ctrArgs(args...)...)
}

func (e *ctdEnv) try(args ...string) (string, error) {
	return criTry(time.Minute, e.ctrArgs(args...)...)
}

// runArgs are the `ctr run` flags every container of these tests uses.
func (e *ctdEnv) runArgs(extra ...string) []string {
	return append([]string{"run", "--snapshotter", "loop", "--runc-root", e.runcRoot}, extra...)
}

// restartSnapshotter starts loop-snapshotter again on the same root and
// socket (after stop or kill).
func (e *ctdEnv) restartSnapshotter() {
	e.t.Helper()
	if err := e.snap.start(e.snap.proc.log); err != nil {
		e.t.Fatal(err)
	}
}

// status runs `loop-snapshotter status --json`.
func (e *ctdEnv) status() snapStatus {
	e.t.Helper()
	out := criRun(e.t, time.Minute, e.snapBin, "status", "--json", "--config", e.snap.cfg, "--address", e.snap.sock)
	var st snapStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		e.t.Fatalf("status: %v\n%s", err, out)
	}
	return st
}

type snapStatus struct {
	Snapshots []struct {
		Key       string `json:"key"`
		Kind      string `json:"kind"`
		SizeLimit int64  `json:"size_limit"`
		Usage     int64  `json:"usage"`
		Device    string `json:"device"`
		DiskSeq   uint64 `json:"diskseq"`
	} `json:"snapshots"`
	Orphans []struct {
		Device string `json:"device"`
	} `json:"orphans"`
	Trash   int `json:"trash_entries"`
	Staging int `json:"staging_entries"`
}

// importImage builds and imports the test image, unpacking it into loop.
func (e *ctdEnv) importImage(ref string) {
	e.t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		e.t.Fatal(err)
	}
	archive := filepath.Join(e.dir, "image.tar")
	ctdLayeredImage(e.t, archive, ref, bb)
	e.ctr("image", "import", "--snapshotter", "loop", archive)
}

// ctdLayeredImage writes an OCI archive named ref with four layers built
// from the host's static busybox: the binary and applet links; /etc files;
// a 1 MiB data file; and a layer that deletes a file of the second
// (whiteout) and adds another. Each layer's snapshot is cloned from its
// parent, so unpacking exercises clone, commit and the whiteout path.
func ctdLayeredImage(t *testing.T, path, ref, busyboxPath string) {
	t.Helper()
	bb, err := os.ReadFile(busyboxPath)
	if err != nil {
		t.Fatal(err)
	}
	base := busyboxEntries(bb, []string{"sh", "sleep", "dd", "df", "sync", "cat", "ls", "mount", "stat", "rm", "echo", "test", "touch", "seq", "head", "wc"},
		"tmp/", "proc/", "sys/", "dev/", "run/")
	etc := []ociimage.Entry{
		{Name: "etc/", Mode: 0o755, Dir: true},
		{Name: "etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/:/bin/sh\n")},
		{Name: "etc/group", Mode: 0o644, Data: []byte("root:x:0:\n")},
		{Name: "etc/layer2", Mode: 0o644, Data: []byte("layer 2\n")},
	}
	data := []ociimage.Entry{
		{Name: "data/", Mode: 0o755, Dir: true},
		{Name: "data/blob", Mode: 0o644, Data: bytes.Repeat([]byte("loopkit\n"), 128<<10)},
	}
	top := []ociimage.Entry{
		{Name: "etc/", Mode: 0o755, Dir: true},
		{Name: "etc/.wh.layer2", Mode: 0o644, Data: nil},
		{Name: "etc/layer4", Mode: 0o644, Data: []byte("layer 4\n")},
	}
	ctdWriteImage(t, path, ref, []ociimage.Blob{criTarLayer(t, base), criTarLayer(t, etc), criTarLayer(t, data), criTarLayer(t, top)},
		[]string{"/bin/sleep", "1000000"})
}

// ctdWriteImage writes an OCI image archive (what `ctr image import` reads).
func ctdWriteImage(t testing.TB, path, ref string, layers []ociimage.Blob, cmd []string) {
	t.Helper()
	img, err := ociimage.New(ref, layers, cmd)
	if err == nil {
		err = img.WriteArchive(path)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// leftovers lists loop devices backed by files under the snapshotter
// root, mounts below the test directory, and files left in the root's
// snapshots, staging and trash directories (flat mode) and upper
// directories, layer images and layer mount points (layered mode).
func (e *ctdEnv) leftovers() []string {
	var out []string
	for k := range testutil.Snapshot(e.dir) {
		out = append(out, k)
	}
	for _, d := range []string{"snapshots", "staging", "trash", "u", "layers", "l"} {
		es, _ := os.ReadDir(filepath.Join(e.snapRoot, d))
		for _, x := range es {
			out = append(out, filepath.Join(d, x.Name()))
		}
	}
	return out
}
