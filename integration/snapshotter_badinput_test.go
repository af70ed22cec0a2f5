//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/loopkit/loopkit/internal/testutil"
)

// TestSnapshotterBadInput sends malformed requests to the real binary and
// checks the raw gRPC status codes (what containerd and other clients see)
// and that nothing was half-created.
func TestSnapshotterBadInput(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "go", "mkfs.ext4", "debugfs", "resize2fs", "e2fsck")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	bin := snapBuild(t, dir)
	cfg := snapWriteConfig(t, dir, snapTestConfig)
	root := filepath.Join(dir, "root")
	d := startSnapDaemonT(t, bin, cfg, root, filepath.Join(dir, "s.sock"), filepath.Join(dir, "daemon.log"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	raw := snapshotsapi.NewSnapshotsClient(d.conn)
	const name = "loop"

	// A committed parent, an active child and a mounted active snapshot.
	if _, err := d.sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := d.sn.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	ms, err := d.sn.Prepare(ctx, "child", "c")
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt")
	crashMount(t, ms, mnt)
	t.Cleanup(func() { mount.UnmountAll(mnt, 0) })

	size := func(v string) map[string]string { return map[string]string{"containerd.io/snapshot/max-size": v} }
	for _, tc := range []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"stat unknown key", func() error {
			_, err := raw.Stat(ctx, &snapshotsapi.StatSnapshotRequest{Snapshotter: name, Key: "nope"})
			return err
		}, codes.NotFound},
		{"mounts unknown key", func() error {
			_, err := raw.Mounts(ctx, &snapshotsapi.MountsRequest{Snapshotter: name, Key: "nope"})
			return err
		}, codes.NotFound},
		{"remove unknown key", func() error {
			_, err := raw.Remove(ctx, &snapshotsapi.RemoveSnapshotRequest{Snapshotter: name, Key: "nope"})
			return err
		}, codes.NotFound},
		{"commit unknown key", func() error {
			_, err := raw.Commit(ctx, &snapshotsapi.CommitSnapshotRequest{Snapshotter: name, Name: "x", Key: "nope"})
			return err
		}, codes.NotFound},
		{"prepare duplicate key", func() error {
			_, err := raw.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{Snapshotter: name, Key: "child", Parent: "c"})
			return err
		}, codes.AlreadyExists},
		{"commit to an existing name", func() error {
			_, err := raw.Commit(ctx, &snapshotsapi.CommitSnapshotRequest{Snapshotter: name, Name: "c", Key: "child"})
			return err
		}, codes.AlreadyExists},
		{"prepare on an active parent", func() error {
			_, err := raw.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{Snapshotter: name, Key: "x1", Parent: "child"})
			return err
		}, codes.InvalidArgument},
		{"view of an unknown parent", func() error {
			_, err := raw.View(ctx, &snapshotsapi.ViewSnapshotRequest{Snapshotter: name, Key: "x2", Parent: "nope"})
			return err
		}, codes.NotFound},
		{"walk with a bad filter", func() error {
			// upstream snapshotservice returns Walk's error unconverted.
			lc, err := raw.List(ctx, &snapshotsapi.ListSnapshotsRequest{Snapshotter: name, Filters: []string{`labels."unterminated`}})
			if err != nil {
				return err
			}
			for {
				if _, err := lc.Recv(); err != nil {
					return err
				}
			}
		}, codes.InvalidArgument},
		{"remove with children", func() error {
			_, err := raw.Remove(ctx, &snapshotsapi.RemoveSnapshotRequest{Snapshotter: name, Key: "c"})
			return err
		}, codes.FailedPrecondition},
		{"commit while mounted", func() error {
			_, err := raw.Commit(ctx, &snapshotsapi.CommitSnapshotRequest{Snapshotter: name, Name: "c2", Key: "child"})
			return err
		}, codes.FailedPrecondition},
		{"update an immutable field", func() error {
			_, err := d.sn.Update(ctx, snapshots.Info{Name: "c", Parent: "x"}, "parent")
			return err
		}, codes.InvalidArgument},
	} {
		err := tc.call()
		// Update goes through the proxy, which turns codes back into errdefs.
		if st, ok := status.FromError(err); ok && st.Code() == tc.want {
			continue
		}
		if tc.name == "update an immutable field" && err != nil && codeOfNative(err) == tc.want {
			continue
		}
		t.Errorf("%s: got %v, want code %s", tc.name, err, tc.want)
	}

	// The size label is a hint: a bad one falls back to default_size (or
	// max_size), as containerd's erofs snapshotter does.
	for i, v := range []string{"10GiB", "1024", "0", "-5", strconv.FormatInt(1<<50, 10)} {
		key := "hint" + strconv.Itoa(i)
		if _, err := raw.Prepare(ctx, &snapshotsapi.PrepareSnapshotRequest{Snapshotter: name, Key: key, Parent: "c", Labels: size(v)}); err != nil {
			t.Errorf("size label %q: %v, want a snapshot", v, err)
		} else if _, err := raw.Remove(ctx, &snapshotsapi.RemoveSnapshotRequest{Snapshotter: name, Key: key}); err != nil {
			t.Error(err)
		}
	}

	// Nothing half-created: the same two snapshots, no staging leftovers.
	out := criRun(t, time.Minute, bin, "status", "--json", "--config", cfg, "--address", d.sock)
	var st struct {
		Snapshots []struct {
			Key string `json:"key"`
		} `json:"snapshots"`
		Staging int `json:"staging_entries"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.Snapshots) != 2 || st.Staging != 0 {
		t.Errorf("after bad requests: %s", out)
	}
	if info, err := d.sn.Stat(ctx, "child"); err != nil || info.Kind != snapshots.KindActive {
		t.Errorf("child after refused commit: %v %v", info.Kind, err)
	}
}

// codeOfNative maps an errdefs error (as the proxy client returns it) back
// to its gRPC code.
func codeOfNative(err error) codes.Code {
	return status.Code(errgrpc.ToGRPC(err))
}
