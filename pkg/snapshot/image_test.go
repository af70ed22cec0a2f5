package snapshot

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/ext4"
	"github.com/loopkit/loopkit/internal/testfs"
	"github.com/loopkit/loopkit/internal/testutil"
)

// TestTemplate: an empty 1 GiB template is sparse, clean, has 4 KiB blocks
// and no lost+found.
func TestTemplate(t *testing.T) {
	requireTools(t)
	p := filepath.Join(t.TempDir(), "t.img")
	if err := makeTemplate(context.Background(), p, 1<<30); err != nil {
		t.Fatal(err)
	}
	alloc, err := allocated(p)
	if err != nil {
		t.Fatal(err)
	}
	if alloc > 20<<20 {
		t.Errorf("empty 1 GiB template allocates %d bytes, want < 20 MiB", alloc)
	}
	sb, err := ext4.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if bs := 1024 << sb.LogBlockSize; bs != blockSize {
		t.Errorf("block size %d, want %d", bs, blockSize)
	}
	if sb.BlocksCount*blockSize != 1<<30 {
		t.Errorf("filesystem has %d blocks, want %d", sb.BlocksCount, (1<<30)/blockSize)
	}
	if sb.NeedsRecovery() {
		t.Error("fresh template needs recovery")
	}
	if err := run(context.Background(), "e2fsck", "-n", p); err != nil {
		t.Errorf("template does not check clean: %v", err)
	}
	out, err := exec.Command("debugfs", "-R", "ls -l /", p).Output()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(out, []byte("lost+found")) {
		t.Errorf("template root contains lost+found:\n%s", out)
	}
}

// TestClone: on ext4 (no FICLONE) the copy is sparse and equal; on a
// reflink XFS the copy is a FICLONE.
func TestClone(t *testing.T) {
	requireTools(t)
	check := func(t *testing.T, dir string, want cloneMethod) {
		src := filepath.Join(dir, "src.img")
		if err := makeTemplate(context.Background(), src, 512<<20); err != nil {
			t.Fatal(err)
		}
		// Some data in the middle, past holes.
		f, err := os.OpenFile(src, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		payload := bytes.Repeat([]byte("loopkit!"), 1<<17) // 1 MiB
		if _, err := f.WriteAt(payload, 300<<20); err != nil {
			t.Fatal(err)
		}
		f.Close()
		dst := filepath.Join(dir, "dst.img")
		method, err := cloneImage(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		if method != want {
			t.Errorf("clone method %s, want %s", method, want)
		}
		sa, _ := allocated(src)
		da, _ := allocated(dst)
		if want == cloneSparse && da > sa+(1<<20) {
			t.Errorf("sparse copy allocates %d bytes, source %d", da, sa)
		}
		a, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(dst)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Error("clone differs from source")
		}
	}
	t.Run("host", func(t *testing.T) {
		dir := t.TempDir()
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil || st.Type != unix.EXT4_SUPER_MAGIC {
			t.Skip("temp dir is not on ext4")
		}
		check(t, dir, cloneSparse)
	})
	t.Run("xfs-reflink", func(t *testing.T) {
		testutil.RequireBinaries(t, "mkfs.xfs")
		base := t.TempDir()
		testutil.NoLeaks(t, base)
		check(t, testfs.MountReflinkXFS(t, base, 2<<30), cloneReflink)
	})
}

// TestGrowMountedImage: resize2fs refuses to grow a filesystem mounted
// after its last check (s_mtime > s_lastcheck, i.e. every committed layer
// whose mount fell in a later second than its mkfs); growImage must still
// work and must not bring lost+found back.
func TestGrowMountedImage(t *testing.T) {
	requireTools(t)
	p := filepath.Join(t.TempDir(), "t.img")
	ctx := context.Background()
	if err := makeTemplate(ctx, p, 64<<20); err != nil {
		t.Fatal(err)
	}
	// Checked in 2000, mounted in 2020: what resize2fs sees on a layer.
	for _, set := range []string{"ssv lastcheck 20000101", "ssv mtime 20200101"} {
		if err := run(ctx, "debugfs", "-w", "-R", set, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := growImage(ctx, p, 256<<20); err != nil {
		t.Fatal(err)
	}
	sb, err := ext4.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if sb.BlocksCount*blockSize != 256<<20 {
		t.Errorf("grown filesystem has %d blocks", sb.BlocksCount)
	}
	out, err := exec.Command("debugfs", "-R", "ls -l /", p).Output()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(out, []byte("lost+found")) {
		t.Errorf("grow re-created lost+found:\n%s", out)
	}
	if err := run(ctx, "e2fsck", "-fn", p); err != nil {
		t.Errorf("grown image does not check clean: %v", err)
	}
}
