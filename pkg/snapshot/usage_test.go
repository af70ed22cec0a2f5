package snapshot

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/loopkit/loopkit/internal/testfs"
	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
)

// TestUsage pins what Usage means (docs/operations.md): Size is the bytes
// of the image no other file shares, so on a reflink filesystem a fresh
// child costs about nothing and an overwrite of its parent's blocks counts
// in full, while a sparse copy costs its whole allocation; a shrunk child
// is never 0; Inodes of a mounted active snapshot come from statfs, not
// from the stale on-disk counters.
func TestUsage(t *testing.T) {
	requireTools(t)
	t.Run("sparse", func(t *testing.T) {
		base := t.TempDir()
		testutil.NoLeaks(t, base)
		testUsage(t, base, false)
	})
	t.Run("xfs-reflink", func(t *testing.T) {
		testutil.RequireBinaries(t, "mkfs.xfs")
		base := t.TempDir()
		testutil.NoLeaks(t, base)
		testUsage(t, testfs.MountReflinkXFS(t, base, 2<<30), true)
	})
}

func testUsage(t *testing.T, base string, reflink bool) {
	ctx := context.Background()
	s := openAt(t, filepath.Join(base, "root"), nil)
	ms, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	m := filepath.Join(base, "m")
	unmount := mountAt(t, ms, m)
	if err := writeZeros(filepath.Join(m, "f"), 8<<20); err != nil {
		t.Fatal(err)
	}
	for i := range 100 {
		if err := os.WriteFile(filepath.Join(m, fmt.Sprint("small", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	u, err := s.Usage(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if u.Inodes < 101 {
		t.Errorf("mounted active usage %+v, want >= 101 inodes (statfs of the mount)", u)
	}
	unmount()
	u, err = s.Usage(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if u.Size < 8<<20 || u.Inodes < 101 {
		t.Errorf("active usage %+v, want >= 8 MiB and >= 101 inodes", u)
	}
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	cu, err := s.Usage(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	if cu.Size < 8<<20 {
		t.Errorf("committed usage %+v, want >= 8 MiB", cu)
	}

	ms, err = s.Prepare(ctx, "child", "c")
	if err != nil {
		t.Fatal(err)
	}
	ch, err := s.Usage(ctx, "child")
	if err != nil {
		t.Fatal(err)
	}
	if reflink && ch.Size >= 1<<20 {
		t.Errorf("fresh reflinked child usage %+v counts its parent's shared bytes", ch)
	}
	if !reflink && ch.Size < 8<<20 {
		t.Errorf("fresh sparse-copied child usage %+v, want its whole allocation (>= 8 MiB): it shares nothing", ch)
	}
	if ch.Inodes != 0 {
		t.Errorf("fresh child inodes %d, want 0 over its parent", ch.Inodes)
	}
	if reflink {
		// Overwrite 4 MiB of the parent's file in place: those blocks are
		// the child's own now, though the image did not grow.
		cm := filepath.Join(base, "child")
		um := mountAt(t, ms, cm)
		f, err := os.OpenFile(filepath.Join(cm, "f"), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4<<20)
		for i := range buf {
			buf[i] = 1
		}
		if _, err := f.WriteAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		um()
		ch, err := s.Usage(ctx, "child")
		if err != nil {
			t.Fatal(err)
		}
		if ch.Size < 4<<20 {
			t.Errorf("child that overwrote 4 MiB of its parent reports %+v", ch)
		}
	}

	label := snapshots.WithLabels(map[string]string{LabelMaxSize: strconv.Itoa(40 << 20)})
	if _, err := s.Prepare(ctx, "shrunk", "c", label); err != nil {
		t.Fatal(err)
	}
	su, err := s.Usage(ctx, "shrunk")
	if err != nil {
		t.Fatal(err)
	}
	if su.Size == 0 {
		t.Errorf("shrunk child reports %+v", su)
	}
}

// openAt opens a snapshotter on root; at cleanup it detaches its devices
// and closes it.
func openAt(t *testing.T, root string, mutate func(*config.Snapshotter)) *snapshotter {
	t.Helper()
	cfg := testConfig(root)
	if mutate != nil {
		mutate(&cfg)
	}
	s, err := newSnapshotter(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Purge(context.Background()); err != nil {
			t.Errorf("purge: %v", err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return s
}
