package snapshot

import (
	"context"
	"errors"
	"runtime"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/loopkit/loopkit/internal/snapadmin"
	"github.com/loopkit/loopkit/internal/testfs"
	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
)

// containerd's mount code mounts an overlay with a long lowerdir from a
// goroutine locked to its thread, which unshares its working directory and
// chdirs into the layers' directory, then exits: Go ends such a thread,
// except the main thread, which it parks for good with that working
// directory, keeping the filesystem under the test's snapshotter root busy
// (its unmount fails with EBUSY until the test binary exits). Keeping the
// main goroutine on the main thread keeps every other goroutine off it.
func init() { runtime.LockOSThread() }

// testConfig is the configuration the tests use: small images (still 4 KiB
// blocks), so 128LayersMount clones 128 small files.
func testConfig(root string) config.Snapshotter {
	return testConfigMode(root, config.ModeFlat)
}

// testConfigMode is testConfig in the given storage mode.
func testConfigMode(root, mode string) config.Snapshotter {
	cfg := config.DefaultSnapshotter()
	cfg.Root = root
	cfg.Mode = mode
	cfg.DefaultSize = 64 << 20
	cfg.MaxSize = 4 << 30
	return cfg
}

func requireTools(t testing.TB) {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "mkfs.ext4", "debugfs", "resize2fs", "e2fsck", "tune2fs", "mkfs.erofs", "fsck.erofs")
}

// suiteFactory runs the snapshotter in-process in mode, as NewSnapshotter
// gives it to an embedder; its cleanup
// detaches every device and unmounts every mount the instance made (the
// suite never removes all snapshots), then closes it.
func suiteFactory(mode string) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		s, err := snapadmin.From(NewSnapshotter(ctx, testConfigMode(root, mode)))
		if err != nil {
			return nil, nil, err
		}
		return s, func() error {
			return errors.Join(s.Purge(ctx), s.Close())
		}, nil
	}
}

// TestSnapshotterSuite runs containerd's conformance suite in-process, in
// both modes, on the host's filesystem (ext4 here: the sparse-copy path) and
// on a loop-mounted XFS with reflink=1 (the FICLONE path).
func TestSnapshotterSuite(t *testing.T) {
	requireTools(t)
	for _, mode := range []string{config.ModeFlat, config.ModeLayered} {
		// The suite's name picks overlayfs's semantics for renaming a
		// directory of a lower layer (EXDEV without redirect_dir; mv falls
		// back to copying), which layered mode shares by design.
		name := "loop"
		if mode == config.ModeLayered {
			name = "overlayfs"
		}
		t.Run(mode, func(t *testing.T) { testfs.SnapshotterSuite(t, name, suiteFactory(mode)) })
	}
}
