//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loopkit/loopkit/internal/testfs"
	"github.com/loopkit/loopkit/internal/testutil"
)

// TestSnapshotterErrorCodes runs the real binary with its root on a small
// tmpfs: a clone that does not fit is ResourceExhausted over gRPC (it was
// Unknown), a Commit of an image that lost its writes is DataLoss naming
// the image, and every failed call leaves one warn line with method, key,
// code and error in the daemon's log.
func TestSnapshotterErrorCodes(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "go", "mkfs.ext4", "debugfs", "resize2fs", "e2fsck")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	bin := snapBuild(t, dir)
	cfg := snapWriteConfig(t, dir, snapTestConfig)
	small := filepath.Join(dir, "small")
	testfs.MountTmpfs(t, small, 48<<20)
	logPath := filepath.Join(dir, "daemon.log")
	d := startSnapDaemonT(t, bin, cfg, filepath.Join(small, "root"), filepath.Join(dir, "s.sock"), logPath)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	raw := snapshotsapi.NewSnapshotsClient(d.conn)
	const name = "loop"

	// 30 MiB of data: a sparse copy of it does not fit in what is left.
	ms, err := d.sn.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt")
	crashMount(t, ms, mnt)
	f, err := os.Create(filepath.Join(mnt, "data"))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for range 30 {
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := mount.UnmountAll(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if err := d.sn.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	_, err = raw.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{Snapshotter: name, Key: "child", Parent: "c"})
	if st, _ := status.FromError(err); st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), "no space left on device") {
		t.Errorf("clone that does not fit: %v, want ResourceExhausted", err)
	}

	// The failed Prepare is in the log, once, with its fields.
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(logPath)
		var found int
		for _, line := range strings.Split(string(b), "\n") {
			var e map[string]any
			if json.Unmarshal([]byte(line), &e) != nil || e["msg"] != "rpc failed" {
				continue
			}
			if e["level"] == "warning" && e["method"] == "Prepare" && e["key"] == "child" && e["code"] == "ResourceExhausted" &&
				strings.Contains(e["error"].(string), "no space left on device") {
				found++
			}
		}
		if found == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d warn lines for the failed Prepare, want 1:\n%s", found, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
