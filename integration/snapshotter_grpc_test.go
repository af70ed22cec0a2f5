//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/loopkit/loopkit/internal/testfs"
	"github.com/loopkit/loopkit/internal/testutil"
)

// The conformance suites mount overlays with long lowerdirs in this
// process: containerd's mount code does that on a goroutine locked to its
// thread with a working directory inside the snapshotter root, and a main
// thread left like that is never ended, keeping that filesystem busy. The
// main goroutine keeps the main thread (see pkg/snapshot's suite test).
func init() { runtime.LockOSThread() }

// TestSnapshotterGRPCSuite runs containerd's conformance suite through the
// path containerd uses: the real loop-snapshotter binary serving on a unix
// socket, and the core/snapshots/proxy client. Errors cross gRPC (errgrpc),
// so the suite's NotFound/AlreadyExists/FailedPrecondition checks hold only
// if the codes survive. Once on the host filesystem (ext4: sparse copies),
// once on a loop-mounted reflink XFS (FICLONE); in both storage modes.
func TestSnapshotterGRPCSuite(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "go", "mkfs.ext4", "debugfs", "resize2fs", "e2fsck", "mkfs.erofs", "fsck.erofs")
	dir := t.TempDir()
	bin := snapBuild(t, dir)
	for _, m := range snapModes {
		t.Run(m.mode, func(t *testing.T) {
			cfg := snapWriteConfig(t, t.TempDir(), "mode = \""+m.mode+"\"\n"+snapTestSizes)
			factory := func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
				// root is <tmp>/snapshot-suite-*/root: the log goes next to it,
				// inside the directory the suite removes; the socket under the
				// test's top directory, as sun_path holds 107 bytes.
				sockDir, err := os.MkdirTemp(dir, "s")
				if err != nil {
					return nil, nil, err
				}
				d, err := startSnapDaemon(bin, cfg, root, filepath.Join(sockDir, "s.sock"), filepath.Join(filepath.Dir(root), "daemon.log"))
				if err != nil {
					os.RemoveAll(sockDir)
					return nil, nil, err
				}
				return d.sn, func() error { return errors.Join(d.close(), os.RemoveAll(sockDir)) }, nil
			}
			testfs.SnapshotterSuite(t, m.suiteName, factory)
		})
	}
}

// TestSnapshotterDaemonLifecycle: READY=1 only once serving, socket mode
// 0660 in a 0700 directory, a second instance on the same root refused
// while the first keeps serving, SIGTERM exits 0, and a restart replaces
// the stale socket.
func TestSnapshotterDaemonLifecycle(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "go", "mkfs.ext4", "debugfs", "resize2fs", "e2fsck")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	bin := snapBuild(t, dir)
	cfg := snapWriteConfig(t, dir, snapTestConfig)
	root := filepath.Join(dir, "root")
	sock := filepath.Join(dir, "run", "sub", "loop.sock")
	notify := criNotifySocket(t, filepath.Join(dir, "notify.sock"))
	p := criStart(t, "loop-snapshotter", filepath.Join(dir, "daemon.log"), []string{"NOTIFY_SOCKET=" + notify.LocalAddr().String()},
		bin, "--config", cfg, "--root", root, "--address", sock)
	t.Cleanup(func() { p.stop(10 * time.Second) })
	criWaitReady(t, p, notify, time.Minute)
	// READY came after listen: the socket must already serve.
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("READY=1 before the socket served: %v", err)
	}
	c.Close()
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o660 || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("socket mode %v, %v; want socket 0660", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Dir(sock)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("socket directory mode %v, %v; want 0700", fi.Mode(), err)
	}
	out, err := criTry(time.Minute, bin, "--config", cfg, "--root", root, "--address", filepath.Join(dir, "other.sock"))
	if err == nil || !strings.Contains(err.Error(), "in use by another instance") {
		t.Errorf("second instance on the same root: %v\n%s", err, out)
	}
	if c, err := net.Dial("unix", sock); err != nil {
		t.Errorf("first instance stopped serving after a refused second start: %v", err)
	} else {
		c.Close()
	}
	if !p.stop(30*time.Second) || p.err != nil {
		t.Fatalf("SIGTERM: graceful=%v exit=%v\n%s", p.exited(), p.err, p.tail(10))
	}
	// A killed instance leaves its socket file; the next start replaces it.
	d, err := startSnapDaemon(bin, cfg, root, sock, filepath.Join(dir, "daemon2.log"))
	if err != nil {
		t.Fatal(err)
	}
	d.kill()
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("socket gone after SIGKILL: %v", err)
	}
	if err := d.start(filepath.Join(dir, "daemon2.log")); err != nil {
		t.Fatalf("restart over a stale socket: %v", err)
	}
	if err := d.close(); err != nil {
		t.Error(err)
	}
}

// TestSnapshotterMetrics: with metrics_address set, /metrics serves the
// documented series, the Go runtime and process collectors, and they move
// with the calls made.
func TestSnapshotterMetrics(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "go", "mkfs.ext4", "debugfs", "resize2fs", "e2fsck")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	bin := snapBuild(t, dir)
	cfg := snapWriteConfig(t, dir, snapTestConfig+"metrics_address = \"127.0.0.1:0\"\n")
	logPath := filepath.Join(dir, "daemon.log")
	d := startSnapDaemonT(t, bin, cfg, filepath.Join(dir, "root"), filepath.Join(dir, "s.sock"), logPath)
	ctx := context.Background()
	if _, err := d.sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := d.sn.Prepare(ctx, "a", ""); err == nil {
		t.Fatal("duplicate Prepare accepted")
	}
	var addr string
	for _, line := range strings.Split(d.proc.tail(200), "\n") {
		var entry struct {
			Msg     string `json:"msg"`
			Address string `json:"address"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Msg == "serving metrics" {
			addr = entry.Address
		}
	}
	if addr == "" {
		t.Fatalf("no \"serving metrics\" log line:\n%s", d.proc.tail(20))
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`loop_snapshotter_snapshots{kind="Active"} 1`,
		`loop_snapshotter_devices 1`,
		`loop_snapshotter_rpc_duration_seconds_count{method="Prepare"} 2`,
		`loop_snapshotter_rpc_errors_total{method="Prepare"} 1`,
		`loop_snapshotter_clones_total{method=`,
		`loop_snapshotter_lazy_detaches_total`,
		`loop_snapshotter_orphans_detached_total`,
		`loop_snapshotter_resizes_total{direction="shrink"} 0`,
		`loop_snapshotter_data_loss_refusals_total 0`,
		// client_golang's Go runtime and process collectors.
		`go_goroutines `,
		`process_resident_memory_bytes `,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s:\n%s", want, body)
		}
	}
}
