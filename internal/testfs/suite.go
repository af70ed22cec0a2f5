package testfs

import (
	"os"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/loopkit/loopkit/internal/testutil"
)

// SnapshotterSuite runs containerd's snapshotter conformance suite under
// the given name twice, as subtests: on the host's filesystem below a fresh
// t.TempDir (ext4 on these machines: the snapshotter's sparse-copy path),
// and on a loop-mounted XFS with reflink=1 (the FICLONE path). Each run
// checks that no loop device or mount is left below its directory.
func SnapshotterSuite(t *testing.T, name string, fn testsuite.SnapshotterFunc) {
	t.Run("ext4", func(t *testing.T) {
		base := t.TempDir()
		testutil.NoLeaks(t, base)
		setTempDir(t, base)
		testsuite.SnapshotterSuite(t, name, fn)
	})
	t.Run("xfs-reflink", func(t *testing.T) {
		testutil.RequireBinaries(t, "mkfs.xfs")
		base := t.TempDir()
		testutil.NoLeaks(t, base)
		setTempDir(t, MountReflinkXFS(t, base, 4<<30))
		testsuite.SnapshotterSuite(t, name, fn)
	})
}

// setTempDir points os.TempDir (where the suite makes its directories) at
// dir until t's cleanup, which runs after t's parallel subtests. Not
// t.Setenv: it refuses a test whose subtests run in parallel, as the
// suite's do.
func setTempDir(t *testing.T, dir string) {
	old, had := os.LookupEnv("TMPDIR")
	os.Setenv("TMPDIR", dir)
	t.Cleanup(func() {
		if had {
			os.Setenv("TMPDIR", old)
		} else {
			os.Unsetenv("TMPDIR")
		}
	})
}
