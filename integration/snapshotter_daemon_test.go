//go:build integration

package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/loopkit/loopkit/internal/snapadmin"
	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/snapshot"
)

// snapTestConfig is the snapshotter configuration of these tests: small
// sparse images (still 4 KiB blocks) keep 128LayersMount and mkfs cheap.
const snapTestConfig = "mode = \"flat\"\n" + snapTestSizes

const snapTestSizes = "default_size = \"64MiB\"\nmax_size = \"4GiB\"\n"

// snapModes are the storage modes the snapshotter tests run in, with the
// name containerd's suite knows each one's semantics by: layered mode is
// overlayfs (renaming a lower directory is EXDEV).
var snapModes = []struct{ mode, suiteName string }{{"flat", "loop"}, {"layered", "overlayfs"}}

// snapBuild builds cmd/loop-snapshotter into dir.
func snapBuild(t *testing.T, dir string) string {
	t.Helper()
	return criGoBuild(t, criRepoRoot(t), "cmd/loop-snapshotter", dir)
}

// snapWriteConfig writes a configuration file into dir (which must be
// root-owned and not group/world-writable: pkg/config checks it).
func snapWriteConfig(t *testing.T, dir, body string) string {
	t.Helper()
	p := filepath.Join(dir, "loop-snapshotter.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// snapDaemon is one loop-snapshotter process and a proxy client to it.
type snapDaemon struct {
	bin, cfg, root, sock string
	env                  []string
	proc                 *criProc
	conn                 *grpc.ClientConn
	sn                   snapshots.Snapshotter
}

// startSnapDaemon starts the binary and waits until its socket serves. It
// returns an error instead of failing a test, so the conformance-suite
// factory (which has no *testing.T) can use it.
func startSnapDaemon(bin, cfg, root, sock, logPath string, env ...string) (*snapDaemon, error) {
	d := &snapDaemon{bin: bin, cfg: cfg, root: root, sock: sock, env: env}
	return d, d.start(logPath)
}

// startSnapDaemonT is startSnapDaemon for a test: it fails t if the daemon
// does not serve, and stops it (purging its devices) at cleanup.
func startSnapDaemonT(t *testing.T, bin, cfg, root, sock, logPath string, env ...string) *snapDaemon {
	t.Helper()
	d, err := startSnapDaemon(bin, cfg, root, sock, logPath, env...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.close(); err != nil {
			t.Error(err)
		}
	})
	return d
}

func (d *snapDaemon) start(logPath string) error {
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(d.bin, "--config", d.cfg, "--root", d.root, "--address", d.sock, "--log-level", "debug")
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(), d.env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	p := &criProc{name: "loop-snapshotter", cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	d.proc = p
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.DialTimeout("unix", d.sock, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if p.exited() {
			return fmt.Errorf("loop-snapshotter exited before serving: %v\n%s", p.err, p.tail(30))
		}
		if time.Now().After(deadline) {
			p.stop(5 * time.Second)
			return fmt.Errorf("loop-snapshotter not serving %s after 60s\n%s", d.sock, p.tail(30))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if d.conn == nil {
		conn, err := grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			p.stop(5 * time.Second)
			return err
		}
		d.conn = conn
		d.sn = proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "loop")
	}
	return nil
}

// stop sends SIGTERM and requires a clean exit (the documented graceful
// stop); the gRPC connection survives for a later restart.
func (d *snapDaemon) stop() error {
	if d.proc == nil || d.proc.exited() {
		return nil
	}
	if !d.proc.stop(30 * time.Second) {
		return fmt.Errorf("loop-snapshotter ignored SIGTERM for 30s\n%s", d.proc.tail(20))
	}
	if d.proc.err != nil {
		return fmt.Errorf("loop-snapshotter exited with %v on SIGTERM\n%s", d.proc.err, d.proc.tail(20))
	}
	return nil
}

// kill sends SIGKILL and waits.
func (d *snapDaemon) kill() {
	if d.proc != nil && !d.proc.exited() {
		_ = d.proc.cmd.Process.Kill()
		<-d.proc.done
	}
}

// close stops the daemon, closes the client and detaches every device left
// under root (through the in-process snapshotter, which also runs the
// startup reconciliation on the daemon's state).
func (d *snapDaemon) close() error {
	err := d.stop()
	if d.conn != nil {
		d.conn.Close()
	}
	return errors.Join(err, snapPurge(d.root))
}

// snapPurge opens root in-process, detaches every device backed by a file
// under it and closes it again.
func snapPurge(root string) error {
	cfg := config.DefaultSnapshotter()
	cfg.Root = root
	cfg.DefaultSize = 64 << 20
	ctx := context.Background()
	s, err := snapadmin.From(snapshot.NewSnapshotter(ctx, cfg))
	if err != nil {
		return fmt.Errorf("purge %s: %w", root, err)
	}
	return errors.Join(s.Purge(ctx), s.Close())
}
