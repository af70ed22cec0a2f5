package snapshot

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/loopkit/loopkit/internal/testutil"
)

// TestCommitUnderUdev runs the applier's cycle (prepare, mount, write,
// unmount, commit) while systemd-udevd probes every device change, with
// containerd's unpack keys and with plain keys. Every Commit must succeed:
// udev's probe is a transient opener, never a reason to fail an unpack. The
// detach times (Commit waits for udev to close the device) are logged for
// docs/operations.md; they are not asserted (shared machine).
//
// Run it under udevd: scripts/with-udevd.sh env LOOPKIT_TEST_UDEV=1 go test
// -tags integration -run TestCommitUnderUdev -v ./pkg/snapshot/
func TestCommitUnderUdev(t *testing.T) {
	requireTools(t)
	if os.Getenv("LOOPKIT_TEST_UDEV") == "1" {
		if err := exec.Command("pgrep", "-x", "systemd-udevd").Run(); err != nil {
			t.Fatal("LOOPKIT_TEST_UDEV=1 but systemd-udevd is not running (use scripts/with-udevd.sh)")
		}
	} else if testing.Short() {
		t.Skip("set LOOPKIT_TEST_UDEV=1 under scripts/with-udevd.sh")
	}
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	ctx := context.Background()
	var detached time.Time
	hook := func(step string) {
		if step == "commit-detached" {
			detached = time.Now()
		}
	}
	cfg := testConfig(filepath.Join(base, "root"))
	s, err := newSnapshotter(ctx, cfg, withFaultHook(hook))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Purge(ctx); s.Close() })
	const n = 20
	for _, kind := range []string{"unpack", "plain"} {
		var waits []time.Duration
		for i := range n {
			key := kind + "-" + strconv.Itoa(i)
			if kind == "unpack" {
				key = snapshots.UnpackKeyPrefix + "-" + strconv.Itoa(i) + " sha256:layer" + strconv.Itoa(i)
			}
			ms, err := s.Prepare(ctx, key, "")
			if err != nil {
				t.Fatal(err)
			}
			m := filepath.Join(base, "m")
			unmount := mountAt(t, ms, m)
			if err := os.WriteFile(filepath.Join(m, "f"), []byte(key), 0o644); err != nil {
				t.Fatal(err)
			}
			unmount()
			start := time.Now()
			if err := s.Commit(ctx, "c-"+key, key); err != nil {
				t.Fatalf("%s commit %d under udev: %v", kind, i, err)
			}
			waits = append(waits, detached.Sub(start))
		}
		slices.Sort(waits)
		t.Logf("%s: detach at Commit over %d runs: median %v, max %v", kind, n, waits[n/2], waits[n-1])
	}
}
