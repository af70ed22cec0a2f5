//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/loopkit/loopkit/internal/testutil"
)

// TestSnapshotterCrashSafety kills loop-snapshotter with SIGKILL at each
// step of Prepare, Commit and Remove (fault hook LOOP_SNAPSHOTTER_TEST_CRASH_AT),
// restarts it, runs Cleanup and checks: no staging or trash leftovers, no
// orphan device, every image directory belongs to a recorded snapshot, and
// the interrupted operation can be completed with its data intact.
func TestSnapshotterCrashSafety(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "go", "mkfs.ext4", "debugfs", "resize2fs", "e2fsck")
	dir := t.TempDir()
	bin := snapBuild(t, dir)
	cfg := snapWriteConfig(t, dir, snapTestConfig)

	type op int
	const (
		opPrepare op = iota
		opCommit
		opRemove
	)
	for _, tc := range []struct {
		step string
		op   op
	}{
		{"prepare-cloned", opPrepare}, {"prepare-renamed", opPrepare},
		{"prepare-committed", opPrepare}, {"prepare-attached", opPrepare},
		{"commit-detached", opCommit}, {"commit-synced", opCommit}, {"commit-done", opCommit},
		{"remove-recorded", opRemove}, {"remove-detached", opRemove},
	} {
		t.Run(tc.step, func(t *testing.T) {
			t.Parallel()
			base := t.TempDir()
			testutil.NoLeaks(t, base)
			root := filepath.Join(base, "root")
			sock := filepath.Join(base, "s.sock")
			logPath := filepath.Join(base, "daemon.log")
			ctx := context.Background()
			d := startSnapDaemonT(t, bin, cfg, root, sock, logPath, crashEnv+"="+tc.step)
			mnt := filepath.Join(base, "mnt")
			var err error

			// Setup that does not pass the fault step, then the operation
			// that does.
			switch tc.op {
			case opPrepare:
				_, err = d.sn.Prepare(ctx, "a", "")
			case opCommit:
				ms, perr := d.sn.Prepare(ctx, "a", "")
				if perr != nil {
					t.Fatal(perr)
				}
				crashWriteFile(t, ms, mnt, "hello")
				err = d.sn.Commit(ctx, "c", "a")
			case opRemove:
				if _, perr := d.sn.Prepare(ctx, "a", ""); perr != nil {
					t.Fatal(perr)
				}
				err = d.sn.Remove(ctx, "a")
			}
			crashRestart(t, ctx, d, logPath, tc.step, err)
			crashCheckConsistent(t, bin, d, root)

			// Complete the interrupted operation.
			switch tc.op {
			case opPrepare:
				ms, err := d.sn.Mounts(ctx, "a")
				if errdefs.IsNotFound(err) {
					ms, err = d.sn.Prepare(ctx, "a", "")
				}
				if err != nil {
					t.Fatal(err)
				}
				crashWriteFile(t, ms, mnt, "hello")
				if err := d.sn.Commit(ctx, "c", "a"); err != nil {
					t.Fatal(err)
				}
			case opCommit:
				if info, err := d.sn.Stat(ctx, "a"); err == nil && info.Kind == snapshots.KindActive {
					if err := d.sn.Commit(ctx, "c", "a"); err != nil {
						t.Fatalf("commit again: %v", err)
					}
				}
			case opRemove:
				if _, err := d.sn.Stat(ctx, "a"); err == nil {
					if err := d.sn.Remove(ctx, "a"); err != nil {
						t.Fatal(err)
					}
				}
				if err := crashCleanup(ctx, d.sn); err != nil {
					t.Fatal(err)
				}
				crashCheckConsistent(t, bin, d, root)
				return
			}
			ms, err := d.sn.View(ctx, "v", "c")
			if err != nil {
				t.Fatal(err)
			}
			if got := crashReadFile(t, ms, mnt); got != "hello" {
				t.Errorf("committed data after the crash: %q", got)
			}
			if err := d.sn.Remove(ctx, "v"); err != nil {
				t.Fatal(err)
			}
			if err := d.sn.Remove(ctx, "c"); err != nil {
				t.Fatal(err)
			}
			if err := crashCleanup(ctx, d.sn); err != nil {
				t.Fatal(err)
			}
			crashCheckConsistent(t, bin, d, root)
		})
	}
}

const crashEnv = "LOOP_SNAPSHOTTER_TEST_CRASH_AT"

// crashRestart expects the operation that passed step to have failed
// (err) because the daemon killed itself there, restarts the daemon
// without the hook and runs Cleanup.
func crashRestart(t *testing.T, ctx context.Context, d *snapDaemon, logPath, step string, err error) {
	t.Helper()
	if err == nil {
		t.Fatalf("operation survived the fault at %s", step)
	}
	<-d.proc.done // killed by its own hook
	d.env = nil
	if err := d.start(logPath); err != nil {
		t.Fatal(err)
	}
	if err := crashCleanup(ctx, d.sn); err != nil {
		t.Fatalf("cleanup after restart: %v", err)
	}
}

func crashCleanup(ctx context.Context, sn snapshots.Snapshotter) error {
	return sn.(snapshots.Cleaner).Cleanup(ctx)
}

// crashCheckConsistent compares the daemon's view (status) with the disk
// and the kernel: nothing in staging or trash, no orphan device, and the
// image directories are exactly those of recorded snapshots.
func crashCheckConsistent(t *testing.T, bin string, d *snapDaemon, root string) {
	t.Helper()
	out := criRun(t, time.Minute, bin, "status", "--json", "--config", d.cfg, "--address", d.sock)
	var st struct {
		Snapshots []struct {
			Key  string `json:"key"`
			ID   string `json:"id"`
			Kind string `json:"kind"`
		} `json:"snapshots"`
		Orphans []any `json:"orphans"`
		Trash   int   `json:"trash_entries"`
		Staging int   `json:"staging_entries"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if st.Trash != 0 || st.Staging != 0 || len(st.Orphans) != 0 {
		t.Errorf("after Cleanup: trash %d, staging %d, orphans %v", st.Trash, st.Staging, st.Orphans)
	}
	var want, got []string
	for _, s := range st.Snapshots {
		want = append(want, s.ID)
	}
	es, _ := os.ReadDir(filepath.Join(root, "snapshots"))
	for _, e := range es {
		got = append(got, e.Name())
	}
	sort.Strings(want)
	sort.Strings(got)
	if len(want) != len(got) {
		t.Errorf("snapshot directories %v, recorded ids %v", got, want)
		return
	}
	for i := range want {
		if want[i] != got[i] {
			t.Errorf("snapshot directories %v, recorded ids %v", got, want)
			return
		}
	}
}

func crashMount(t *testing.T, ms []mount.Mount, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mount.All(ms, dir); err != nil {
		t.Fatal(err)
	}
}

func crashWriteFile(t *testing.T, ms []mount.Mount, dir, data string) {
	t.Helper()
	crashMount(t, ms, dir)
	err := os.WriteFile(filepath.Join(dir, "file"), []byte(data), 0o644)
	// UnmountAll retries EBUSY: a parallel subtest forking its daemon
	// briefly holds copies of our fds until it execs.
	if uerr := mount.UnmountAll(dir, 0); uerr != nil {
		t.Fatal(uerr)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func crashReadFile(t *testing.T, ms []mount.Mount, dir string) string {
	t.Helper()
	crashMount(t, ms, dir)
	b, err := os.ReadFile(filepath.Join(dir, "file"))
	// UnmountAll retries EBUSY: a parallel subtest forking its daemon
	// briefly holds copies of our fds until it execs.
	if uerr := mount.UnmountAll(dir, 0); uerr != nil {
		t.Fatal(uerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
