//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"

	"github.com/loopkit/loopkit/internal/testutil"
)

// TestSnapshotterLayeredCrashSafety kills loop-snapshotter in layered mode
// (layers on loop devices, the backing with the most to leak) with SIGKILL
// at every step of Prepare, Commit (of a container's ext4 upper, frozen
// while the layer is built, and of an unpack's plain directory) and Remove
// (of an active snapshot and of a layer), restarts it, runs Cleanup and
// checks: no staging or trash leftovers, no orphan device or mount, upper
// directories and layer images exactly those of recorded snapshots, and
// the interrupted operation completes with its data intact.
func TestSnapshotterLayeredCrashSafety(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "go", "mkfs.ext4", "mkfs.erofs", "fsck.erofs")
	dir := t.TempDir()
	bin := snapBuild(t, dir)
	cfg := snapWriteConfig(t, dir, "mode = \"layered\"\nlayer_backing = \"loop\"\n"+snapTestSizes)

	type op int
	const (
		opPrepare op = iota
		opCommit
		opCommitUnpack
		opRemove
		opRemoveLayer
	)
	cases := []struct {
		step string
		op   op
	}{
		{"prepare-cloned", opPrepare}, {"prepare-renamed", opPrepare}, {"prepare-committed", opPrepare},
		{"prepare-upper-mounted", opPrepare}, {"prepare-mounted", opPrepare},
		{"commit-frozen", opCommit}, {"commit-built", opCommit}, {"commit-synced", opCommit},
		{"commit-recorded", opCommit}, {"release-unmounted", opCommit}, {"release-detached", opCommit},
		{"commit-done", opCommit},
		{"commit-built", opCommitUnpack}, {"commit-synced", opCommitUnpack}, {"commit-recorded", opCommitUnpack},
		{"remove-recorded", opRemove}, {"release-unmounted", opRemove}, {"release-detached", opRemove},
		{"remove-recorded", opRemoveLayer}, {"remove-unmounted", opRemoveLayer}, {"remove-detached", opRemoveLayer},
	}
	names := map[op]string{opPrepare: "prepare", opCommit: "commit", opCommitUnpack: "commit-unpack", opRemove: "remove", opRemoveLayer: "remove-layer"}
	for _, tc := range cases {
		t.Run(names[tc.op]+"/"+tc.step, func(t *testing.T) {
			t.Parallel()
			base := t.TempDir()
			testutil.NoLeaks(t, base)
			root := filepath.Join(base, "root")
			sock := filepath.Join(base, "s.sock")
			logPath := filepath.Join(base, "daemon.log")
			ctx := context.Background()
			d := startSnapDaemonT(t, bin, cfg, root, sock, logPath)
			mnt := filepath.Join(base, "mnt")
			// A base layer, made before the fault is armed.
			ms, err := d.sn.Prepare(ctx, "extract-base", "")
			if err != nil {
				t.Fatal(err)
			}
			crashWriteFile(t, ms, mnt, "base")
			if err := d.sn.Commit(ctx, "base", "extract-base"); err != nil {
				t.Fatal(err)
			}
			key := "a"
			if tc.op == opCommitUnpack {
				key = "extract-a"
			}
			if tc.op != opPrepare {
				ms, err := d.sn.Prepare(ctx, key, "base")
				if err != nil {
					t.Fatal(err)
				}
				crashWriteFile(t, ms, mnt, "hello")
			}
			if tc.op == opRemoveLayer {
				if err := d.sn.Remove(ctx, key); err != nil {
					t.Fatal(err)
				}
			}
			// Arm the fault: restart with the hook.
			if err := d.stop(); err != nil {
				t.Fatal(err)
			}
			d.env = []string{crashEnv + "=" + tc.step}
			if err := d.start(logPath); err != nil {
				t.Fatal(err)
			}
			switch tc.op {
			case opPrepare:
				_, err = d.sn.Prepare(ctx, key, "base")
			case opCommit, opCommitUnpack:
				err = d.sn.Commit(ctx, "c", key)
			case opRemove:
				err = d.sn.Remove(ctx, key)
			case opRemoveLayer:
				err = d.sn.Remove(ctx, "base")
			}
			crashRestart(t, ctx, d, logPath, tc.step, err)
			layeredCheckConsistent(t, bin, d, root)

			// Complete the interrupted operation and check its data.
			switch tc.op {
			case opPrepare:
				ms, err := d.sn.Mounts(ctx, key)
				if errdefs.IsNotFound(err) {
					ms, err = d.sn.Prepare(ctx, key, "base")
				}
				if err != nil {
					t.Fatal(err)
				}
				crashWriteFile(t, ms, mnt, "hello")
				if err := d.sn.Commit(ctx, "c", key); err != nil {
					t.Fatal(err)
				}
			case opCommit, opCommitUnpack:
				if info, err := d.sn.Stat(ctx, key); err == nil && info.Kind == snapshots.KindActive {
					if err := d.sn.Commit(ctx, "c", key); err != nil {
						t.Fatalf("commit again: %v", err)
					}
				}
			case opRemove, opRemoveLayer:
				victim := key
				if tc.op == opRemoveLayer {
					victim = "base"
				}
				if _, err := d.sn.Stat(ctx, victim); err == nil {
					if err := d.sn.Remove(ctx, victim); err != nil {
						t.Fatal(err)
					}
				}
				if tc.op == opRemove {
					if err := d.sn.Remove(ctx, "base"); err != nil {
						t.Fatal(err)
					}
				}
				if err := crashCleanup(ctx, d.sn); err != nil {
					t.Fatal(err)
				}
				layeredCheckConsistent(t, bin, d, root)
				return
			}
			ms, err = d.sn.View(ctx, "v", "c")
			if err != nil {
				t.Fatal(err)
			}
			if got := crashReadFile(t, ms, mnt); got != "hello" {
				t.Errorf("committed data after the crash: %q", got)
			}
			for _, k := range []string{"v", "c", "base"} {
				if err := d.sn.Remove(ctx, k); err != nil {
					t.Fatal(err)
				}
			}
			if err := crashCleanup(ctx, d.sn); err != nil {
				t.Fatal(err)
			}
			layeredCheckConsistent(t, bin, d, root)
		})
	}
}

// layeredCheckConsistent compares the daemon's status with the disk and
// the kernel in layered mode: nothing in staging or trash, no orphan
// device, u/<id> exactly for active snapshots, layers/<id>.erofs exactly
// for committed ones, and mounts under root only for those.
func layeredCheckConsistent(t *testing.T, bin string, d *snapDaemon, root string) {
	t.Helper()
	out := criRun(t, time.Minute, bin, "status", "--json", "--config", d.cfg, "--address", d.sock)
	var st struct {
		Mode      string `json:"mode"`
		Snapshots []struct {
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
	if st.Mode != "layered" || st.Trash != 0 || st.Staging != 0 || len(st.Orphans) != 0 {
		t.Errorf("after Cleanup: mode %q, trash %d, staging %d, orphans %v", st.Mode, st.Trash, st.Staging, st.Orphans)
	}
	var wantU, wantL, wantM []string
	for _, s := range st.Snapshots {
		switch s.Kind {
		case "Active":
			wantU = append(wantU, s.ID)
		case "Committed":
			wantL = append(wantL, s.ID+".erofs")
		}
	}
	list := func(d string) []string {
		var out []string
		es, _ := os.ReadDir(filepath.Join(root, d))
		for _, e := range es {
			out = append(out, e.Name())
		}
		return out
	}
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(root))
	if err != nil {
		t.Fatal(err)
	}
	var gotM []string
	for _, m := range ms {
		rel, _ := filepath.Rel(root, m.Mountpoint)
		gotM = append(gotM, rel)
	}
	for _, id := range wantU {
		wantM = append(wantM, filepath.Join("u", id, "m"))
	}
	same := func(what string, got, want []string, subset bool) {
		sort.Strings(got)
		sort.Strings(want)
		if subset {
			// Layers are mounted on first use; every mount must be wanted.
			for _, g := range got {
				if !strings.HasPrefix(g, "l/") && !slices.Contains(want, g) {
					t.Errorf("%s: %v, want within %v", what, got, want)
				}
			}
			return
		}
		if strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("%s: %v, want %v", what, got, want)
		}
	}
	same("upper directories", list("u"), wantU, false)
	same("layer images", list("layers"), wantL, false)
	for _, l := range gotM {
		if id, ok := strings.CutPrefix(l, "l/"); ok && !slices.Contains(wantL, id+".erofs") {
			t.Errorf("layer %s mounted without a record", id)
		}
	}
	same("mounts", gotM, wantM, true)
}
