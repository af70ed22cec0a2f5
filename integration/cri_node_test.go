//go:build integration

package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	toml "github.com/pelletier/go-toml/v2"

	"github.com/loopkit/loopkit/internal/testutil"
)

// criNode is a private Kubernetes node runtime: loop-snapshotter plus a
// containerd (1.6 or 2.x) with CRI, both under one temporary directory,
// never the system daemons' paths.
type criNode struct {
	t            *testing.T
	d            ctdDaemon
	mode         string
	shimDir      string
	dir          string
	sock         string // containerd gRPC socket (CRI and ctr)
	ctrdRoot     string
	snapRoot     string
	snapSock     string
	snapshotter  string
	crictl       string
	crictlConfig string
	sandboxImage string
	snapBin      string
	snapCfg      string
	snapStarts   int
	notify       *net.UnixConn
	listen       *os.File // socket passed with LISTEN_FDS (socketActivation)
	ctrdCfg      string
	ctrdStarts   int
	snap, ctrd   *criProc
}

// criContribConfig and criContribConfig2 are the documented containerd 1.6
// and 2.x snippets the tests start from, so the files users copy are the
// files that are tested.
const (
	criContribConfig  = "contrib/containerd/config-v2-containerd-1.6.toml"
	criContribConfig2 = "contrib/containerd/config-v4-containerd-2.x.toml"
)

// criStartNode builds loop-snapshotter, starts it and a containerd whose
// configuration is contrib's 1.6 snippet plus private paths, and waits until
// CRI answers. Every cleanup is registered before the thing it undoes starts.
//
// tweak, when not nil, may change the containerd configuration (the parsed
// TOML document) before it is written.
func criStartNode(t *testing.T, dir, sandboxImage string, tweak func(cfg map[string]any)) *criNode {
	t.Helper()
	d := ctdDaemons(t)[0]
	d.require(t)
	return criStartNodeOn(t, dir, d, "flat", sandboxImage, criNodeOptions{tweak: tweak})
}

// criModeNode is how each CRI test on one containerd release and mode
// begins: its gates (root, its binaries), its directory with the leak
// check (n.dir), and a node on d in mode with the test's sandbox image.
func criModeNode(t *testing.T, d ctdDaemon, mode string, o criNodeOptions) *criNode {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "runc", "busybox", "mkfs.ext4", "go")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	return criStartNodeOn(t, dir, d, mode, criImageRef, o)
}

// criStartNodeMode is criStartNode with loop-snapshotter in the given
// storage mode (containerd 1.6).
func criStartNodeMode(t *testing.T, dir, sandboxImage, mode string, tweak func(cfg map[string]any)) *criNode {
	t.Helper()
	d := ctdDaemons(t)[0]
	d.require(t)
	return criStartNodeOn(t, dir, d, mode, sandboxImage, criNodeOptions{tweak: tweak})
}

// criNodeOptions change how criStartNodeOn starts the node.
type criNodeOptions struct {
	// tweak, when not nil, may change the containerd configuration.
	tweak func(cfg map[string]any)
	// socketActivation: the test binds the snapshotter's socket and holds
	// it, as systemd's loop-snapshotter.socket does, and every snapshotter
	// start serves on it (LISTEN_FDS), so containerd may start first
	// (restartContainerdFirst).
	socketActivation bool
}

// criStartNodeOn is criStartNode for containerd release d and snapshotter
// mode.
func criStartNodeOn(t *testing.T, dir string, d ctdDaemon, mode, sandboxImage string, o criNodeOptions) *criNode {
	t.Helper()
	repo := criRepoRoot(t)
	tweak := o.tweak
	n := &criNode{
		t:            t,
		d:            d,
		mode:         mode,
		shimDir:      ctdShortDir(t),
		dir:          dir,
		sock:         filepath.Join(dir, "run", "containerd.sock"),
		ctrdRoot:     filepath.Join(dir, "root"),
		snapshotter:  "loop",
		sandboxImage: sandboxImage,
	}
	// CRI 1.6 reports <containerd root>/io.containerd.snapshotter.v1.<name>
	// as the image filesystem: the snapshotter's default layout.
	n.snapRoot = filepath.Join(n.ctrdRoot, "io.containerd.snapshotter.v1.loop")
	n.snapSock = filepath.Join(dir, "run", "loop-snapshotter.sock")
	for _, d := range []string{filepath.Join(dir, "run"), filepath.Join(dir, "bin"), filepath.Join(dir, "etc"), filepath.Join(dir, "logs")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	n.crictl = criFindCrictl(t, repo)
	snapBin := criGoBuild(t, repo, "cmd/loop-snapshotter", filepath.Join(dir, "bin"))

	// Runs after the daemons are stopped: on failure, remove what the
	// orderly teardown did not, so one failed run does not poison the next.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		criKillProcessesUnder(t, dir)
		criUnmountUnder(t, dir)
		criDetachUnder(t, dir)
	})

	n.snapBin = snapBin
	n.snapCfg = filepath.Join(dir, "etc", "loop-snapshotter.toml")
	// 256 MiB keeps every mkfs and clone small; images are sparse anyway.
	if err := os.WriteFile(n.snapCfg, []byte(snapModeConfig(t, mode)+"default_size = \"256MiB\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	n.notify = criNotifySocket(t, filepath.Join(dir, "run", "notify.sock"))
	t.Cleanup(func() { n.stopSnapshotter() })
	if o.socketActivation {
		n.listen = criBindSocket(t, n.snapSock)
	}
	n.startSnapshotter()

	n.ctrdCfg = filepath.Join(dir, "etc", "containerd.toml")
	if err := os.WriteFile(n.ctrdCfg, n.containerdConfig(t, repo, tweak), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.stopContainerd() })
	n.startContainerd()

	n.crictlConfig = filepath.Join(dir, "etc", "crictl.yaml")
	ep := "unix://" + n.sock
	if err := os.WriteFile(n.crictlConfig, []byte(fmt.Sprintf("runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: 60\n", ep, ep)), 0o600); err != nil {
		t.Fatal(err)
	}
	// Runs first on failure: let CRI tear down its pods while containerd and
	// the snapshotter still run, then drop the image so GC removes snapshots.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		t.Logf("containerd log tail:\n%s", n.ctrd.tail(60))
		t.Logf("loop-snapshotter log tail:\n%s", n.snap.tail(60))
		if n.ctrd.exited() {
			return
		}
		_, _ = criTry(2*time.Minute, n.crictlArgs("rmp", "--force", "--all")...)
		_, _ = criTry(time.Minute, n.crictlArgs("rmi", "--all")...)
	})
	n.waitCRI()
	return n
}

// startContainerd starts containerd and waits for its socket.
func (n *criNode) startContainerd() {
	n.t.Helper()
	n.ctrdStarts++
	n.ctrd = criStart(n.t, "containerd", filepath.Join(n.dir, "logs", fmt.Sprintf("containerd.%d.log", n.ctrdStarts)), n.d.env(),
		n.d.containerd, "--config", n.ctrdCfg, "--log-level", "debug")
	criWaitSocket(n.t, n.ctrd, n.sock, 60*time.Second)
}

// restartContainerdFirst stops both daemons, then starts containerd (with
// CRI) and waits until it serves before it execs the snapshotter: the boot
// order that loses CRI's images unless the snapshotter's socket already
// accepts. It returns containerd's log from that start.
func (n *criNode) restartContainerdFirst() string {
	n.t.Helper()
	n.stopContainerd()
	n.stopSnapshotter()
	n.startContainerd()
	n.startSnapshotter()
	n.waitCRI()
	return n.ctrd.log
}

// startSnapshotter starts loop-snapshotter as systemd starts the
// Type=notify unit and waits for READY=1, after which the socket must accept
// connections at once: containerd is started right after READY.
func (n *criNode) startSnapshotter() {
	n.t.Helper()
	n.snapStarts++
	logPath := filepath.Join(n.dir, "logs", fmt.Sprintf("loop-snapshotter.%d.log", n.snapStarts))
	argv := []string{n.snapBin, "--config", n.snapCfg, "--root", n.snapRoot, "--address", n.snapSock, "--log-level", "debug"}
	env := []string{"NOTIFY_SOCKET=" + n.notify.LocalAddr().String()}
	if n.listen != nil {
		n.snap = criStartActivated(n.t, "loop-snapshotter", logPath, env, n.listen, argv...)
	} else {
		n.snap = criStart(n.t, "loop-snapshotter", logPath, env, argv...)
	}
	criWaitReady(n.t, n.snap, n.notify, 60*time.Second)
	c, err := net.Dial("unix", n.snapSock)
	if err != nil {
		n.t.Fatalf("loop-snapshotter sent READY=1 but %s does not accept connections: %v", n.snapSock, err)
	}
	c.Close()
}

// status runs `loop-snapshotter status --json` against the running daemon.
func (n *criNode) status() criSnapStatus {
	n.t.Helper()
	out := criRun(n.t, time.Minute, n.snapBin, "status", "--json", "--config", n.snapCfg, "--address", n.snapSock)
	var st criSnapStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		n.t.Fatalf("loop-snapshotter status --json: %v\n%s", err, out)
	}
	return st
}

// criSnapStatus is the part of `loop-snapshotter status --json` the test
// reads.
type criSnapStatus struct {
	Root      string             `json:"root"`
	Snapshots []criSnapshotEntry `json:"snapshots"`
	Orphans   []struct {
		Device string `json:"device"`
	} `json:"orphans"`
}

type criSnapshotEntry struct {
	Key       string `json:"key"`
	Kind      string `json:"kind"`
	SizeLimit int64  `json:"size_limit"`
	Usage     int64  `json:"usage"`
	Device    string `json:"device"`
	DiskSeq   uint64 `json:"diskseq"`
}

// containerdConfig returns contrib's 1.6 snippet with the proxy address,
// every daemon path and the CRI test settings replaced or added.
func (n *criNode) containerdConfig(t *testing.T, repo string, tweak func(map[string]any)) []byte {
	t.Helper()
	if n.d.major >= 2 {
		return n.containerdConfig2(t, repo, tweak)
	}
	cfg := n.contribConfig(t, repo, criContribConfig, 2)
	cri := criTable(t, cfg, "plugins", "io.containerd.grpc.v1.cri")
	ctrd := criTable(t, cri, "containerd")
	if ctrd["snapshotter"] != n.snapshotter {
		t.Fatalf("%s: CRI snapshotter = %v, want %q", criContribConfig, ctrd["snapshotter"], n.snapshotter)
	}

	cfg["root"] = n.ctrdRoot
	cfg["state"] = filepath.Join(n.dir, "state")
	cfg["grpc"] = map[string]any{"address": n.sock}
	cfg["ttrpc"] = map[string]any{"address": n.sock + ".ttrpc"}
	cfg["disabled_plugins"] = []string{
		"io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
		"io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
		"io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp",
	}
	criTable(t, cfg, "plugins", "io.containerd.internal.v1.opt")["path"] = filepath.Join(n.dir, "opt")
	cri["sandbox_image"] = n.sandboxImage
	// CRI gives sandboxes oom_score_adj -998; lowering it needs
	// CAP_SYS_RESOURCE, which sandboxed CI hosts (this one) may lack. The
	// restriction clamps to the daemon's own value instead.
	cri["restrict_oom_score_adj"] = true
	// The CRI snapshot syncer polls Usage every stats_collect_period
	// seconds (default 10); 1 s keeps the stats checks short.
	cri["stats_collect_period"] = 1
	// Port 0: never collide with a system containerd's stream server.
	cri["stream_server_address"] = "127.0.0.1"
	cri["stream_server_port"] = "0"
	cni := criTable(t, cri, "cni")
	cni["bin_dir"] = filepath.Join(n.dir, "cni", "bin")
	cni["conf_dir"] = filepath.Join(n.dir, "cni", "conf")
	ctrd["default_runtime_name"] = "runc"
	runc := criTable(t, ctrd, "runtimes", "runc")
	runc["runtime_type"] = "io.containerd.runc.v2"
	// cgroupfs driver: the host has cgroup v1 and no systemd as pid 1.
	criTable(t, runc, "options")["SystemdCgroup"] = false
	criTable(t, runc, "options")["Root"] = filepath.Join(n.dir, "runc")
	if tweak != nil {
		tweak(cfg)
	}
	out, err := toml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// containerdConfig2 returns contrib's 2.x snippet (config version 4, the
// form `containerd config migrate` prints) with the proxy address, every
// daemon path and the CRI test settings replaced or added.
// contribConfig reads the contrib containerd configuration at rel (config
// format version), checks that it points containerd at the snapshotter's
// default socket, and points it at this node's instead.
func (n *criNode) contribConfig(t *testing.T, repo, rel string, version int64) map[string]any {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(repo, rel))
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := toml.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	if v, _ := cfg["version"].(int64); v != version {
		t.Fatalf("%s: version = %v, want %d", rel, cfg["version"], version)
	}
	proxy := criTable(t, cfg, "proxy_plugins", "loop")
	if proxy["type"] != "snapshot" || proxy["address"] != "/run/loop-snapshotter/loop-snapshotter.sock" {
		t.Fatalf("%s: proxy_plugins.loop = %v", rel, proxy)
	}
	proxy["address"] = n.snapSock
	return cfg
}

func (n *criNode) containerdConfig2(t *testing.T, repo string, tweak func(map[string]any)) []byte {
	t.Helper()
	cfg := n.contribConfig(t, repo, criContribConfig2, 4)
	// CRI 2.x reports exports.root as the image filesystem.
	criTable(t, criTable(t, cfg, "proxy_plugins", "loop"), "exports")["root"] = n.snapRoot
	images := criTable(t, cfg, "plugins", "io.containerd.cri.v1.images")
	if images["snapshotter"] != n.snapshotter {
		t.Fatalf("%s: CRI snapshotter = %v, want %q", criContribConfig2, images["snapshotter"], n.snapshotter)
	}
	if criTable(t, images, "pinned_images")["sandbox"] == nil {
		t.Fatalf("%s: no pinned_images.sandbox", criContribConfig2)
	}
	if len(criUnpackSnapshotters(t, cfg)) == 0 {
		t.Fatalf("%s: no transfer unpack_config entry", criContribConfig2)
	}

	cfg["root"] = n.ctrdRoot
	cfg["state"] = filepath.Join(n.dir, "state")
	cfg["temp"] = filepath.Join(n.dir, "tmp")
	plugins := criTable(t, cfg, "plugins")
	criTable(t, plugins, "io.containerd.server.v1.grpc")["address"] = n.sock
	criTable(t, plugins, "io.containerd.server.v1.ttrpc")["address"] = n.sock + ".ttrpc"
	cfg["disabled_plugins"] = []string{
		"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
		"io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp",
	}
	criTable(t, plugins, "io.containerd.internal.v1.opt")["path"] = filepath.Join(n.dir, "opt")
	criTable(t, plugins, "io.containerd.shim.v1.manager")["socket_dir"] = n.shimDir
	criTable(t, plugins, "io.containerd.nri.v1.nri")["disable"] = true
	criTable(t, images, "pinned_images")["sandbox"] = n.sandboxImage
	images["stats_collect_period"] = 1
	rt := criTable(t, plugins, "io.containerd.cri.v1.runtime")
	// As in 1.6: clamp oom_score_adj where CAP_SYS_RESOURCE is missing
	// (the snippet's commented setting).
	rt["restrict_oom_score_adj"] = true
	cni := criTable(t, rt, "cni")
	cni["bin_dirs"] = []string{filepath.Join(n.dir, "cni", "bin")}
	cni["conf_dir"] = filepath.Join(n.dir, "cni", "conf")
	ctrd := criTable(t, rt, "containerd")
	ctrd["default_runtime_name"] = "runc"
	runc := criTable(t, ctrd, "runtimes", "runc")
	runc["runtime_type"] = "io.containerd.runc.v2"
	criTable(t, runc, "options")["SystemdCgroup"] = false
	criTable(t, runc, "options")["Root"] = filepath.Join(n.dir, "runc")
	cri := criTable(t, plugins, "io.containerd.grpc.v1.cri")
	cri["stream_server_address"] = "127.0.0.1"
	cri["stream_server_port"] = "0"
	if tweak != nil {
		tweak(cfg)
	}
	out, err := toml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// criUnpackSnapshotters lists the snapshotters of the transfer service's
// unpack_config entries.
func criUnpackSnapshotters(t *testing.T, cfg map[string]any) []string {
	t.Helper()
	entries, _ := criTable(t, cfg, "plugins", "io.containerd.transfer.v1.local")["unpack_config"].([]any)
	var out []string
	for _, e := range entries {
		if m, ok := e.(map[string]any); ok {
			out = append(out, fmt.Sprint(m["snapshotter"]))
		}
	}
	return out
}

// criPod is a pod sandbox with one running container, started by runPod.
type criPod struct {
	id, cid        string
	podPid, ctrPid int // the sandbox's and the container's init processes
	config         string
}

// runPod starts a host-network pod named name with one container on the
// test image running command, with CRI runtime handler handler ("" for
// the default), and returns its ids and processes.
func (n *criNode) runPod(name, handler string, command ...string) criPod {
	n.t.Helper()
	p := criPod{config: criPodConfig(n.t, n.dir, name, nil)}
	ctrCfg := criWriteJSON(n.t, n.dir, name+"-container.json", map[string]any{
		"metadata": map[string]any{"name": name + "-main"},
		"image":    map[string]any{"image": criImageRef},
		"command":  command,
		"log_path": name + ".log",
		"linux":    map[string]any{},
	})
	args := []string{"runp"}
	if handler != "" {
		args = append(args, "--runtime", handler)
	}
	p.id = strings.TrimSpace(n.crictlRun(append(args, p.config)...))
	p.cid = strings.TrimSpace(n.crictlRun("create", p.id, ctrCfg, p.config))
	n.crictlRun("start", p.cid)
	var insp struct {
		Info struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	n.crictlJSON(&insp, "inspect", p.cid)
	p.ctrPid = insp.Info.Pid
	insp.Info.Pid = 0
	n.crictlJSON(&insp, "inspectp", p.id)
	p.podPid = insp.Info.Pid
	return p
}

// removePod stops and removes the pod and its container, as kubelet does.
func (n *criNode) removePod(p criPod) {
	n.t.Helper()
	n.crictlRun("stop", "--timeout", "0", p.cid)
	n.crictlRun("rm", p.cid)
	n.crictlRun("stopp", p.id)
	n.crictlRun("rmp", p.id)
}

// criTable walks (and creates) nested TOML tables.
func criTable(t *testing.T, m map[string]any, keys ...string) map[string]any {
	t.Helper()
	for _, k := range keys {
		next, ok := m[k]
		if !ok {
			nm := map[string]any{}
			m[k] = nm
			m = nm
			continue
		}
		nm, ok := next.(map[string]any)
		if !ok {
			t.Fatalf("config key %s is %T, not a table", k, next)
		}
		m = nm
	}
	return m
}

func (n *criNode) crictlArgs(args ...string) []string {
	return append([]string{n.crictl, "--config", n.crictlConfig}, args...)
}

// crictl runs crictl against the private containerd and returns stdout.
func (n *criNode) crictlRun(args ...string) string {
	n.t.Helper()
	return criRun(n.t, 2*time.Minute, n.crictlArgs(args...)...)
}

// crictlJSON runs crictl with -o json and decodes the output.
func (n *criNode) crictlJSON(v any, args ...string) {
	n.t.Helper()
	// urfave/cli stops parsing flags at the first positional argument.
	full := append([]string{args[0], "-o", "json"}, args[1:]...)
	out := n.crictlRun(full...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		n.t.Fatalf("crictl %s: decode %q: %v", strings.Join(args, " "), out, err)
	}
}

func (n *criNode) ctr(args ...string) string {
	n.t.Helper()
	return criRun(n.t, 2*time.Minute, append([]string{n.d.ctr, "--address", n.sock, "--namespace", "k8s.io"}, args...)...)
}

// waitCRI waits until the CRI runtime reports RuntimeReady (network
// readiness is not needed: the test's pod uses the host network).
func (n *criNode) waitCRI() {
	n.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := criTry(10*time.Second, n.crictlArgs("info", "-o", "json")...)
		if err == nil {
			var info struct {
				Status struct {
					Conditions []struct {
						Type   string `json:"type"`
						Status bool   `json:"status"`
					} `json:"conditions"`
				} `json:"status"`
			}
			if json.Unmarshal([]byte(out), &info) == nil {
				for _, c := range info.Status.Conditions {
					if c.Type == "RuntimeReady" && c.Status {
						return
					}
				}
			}
		}
		if n.ctrd.exited() || time.Now().After(deadline) {
			n.t.Fatalf("CRI not ready: %v\n%s\ncontainerd log:\n%s", err, out, n.ctrd.tail(40))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (n *criNode) stopContainerd() {
	if n.ctrd != nil && !n.ctrd.stop(30*time.Second) {
		n.t.Errorf("containerd did not stop on SIGTERM within 30s")
	}
}

// stopSnapshotter stops loop-snapshotter and requires a clean exit: SIGTERM
// is its documented graceful stop.
func (n *criNode) stopSnapshotter() {
	if n.snap == nil || n.snap.exited() {
		return
	}
	if !n.snap.stop(30 * time.Second) {
		n.t.Errorf("loop-snapshotter did not stop on SIGTERM within 30s\n%s", n.snap.tail(20))
		return
	}
	if n.snap.err != nil {
		n.t.Errorf("loop-snapshotter exited with %v on SIGTERM\n%s", n.snap.err, n.snap.tail(20))
	}
}

// leftovers lists what the node left behind: loop devices backed by files
// under the test directory, mounts below it, and processes naming it.
func (n *criNode) leftovers() []string {
	var out []string
	for k := range testutil.Snapshot(n.dir) {
		out = append(out, k)
	}
	for _, p := range criProcessesUnder(n.dir) {
		out = append(out, "process "+p)
	}
	return out
}
