package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/rootfs"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/snapshots/blockfile"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/loopkit/loopkit/internal/ociimage"
	"github.com/loopkit/loopkit/internal/snapadmin"
	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/snapshot"
)

// inproc is one snapshotter opened in this process.
type inproc struct {
	name  string
	sn    snapshots.Snapshotter
	close func() error
}

// openInproc opens snapshotter kind on root with images of size bytes
// (loop's default_size, blockfile's scratch file).
func openInproc(ctx context.Context, kind, root string, size int64) (*inproc, error) {
	switch kind {
	case "loop-flat", "loop-layered":
		cfg := config.DefaultSnapshotter()
		cfg.Root = root
		cfg.Mode = strings.TrimPrefix(kind, "loop-")
		cfg.DefaultSize = config.ByteSize(size)
		s, err := snapadmin.From(snapshot.NewSnapshotter(ctx, cfg))
		if err != nil {
			return nil, err
		}
		return &inproc{kind, s, func() error { s.Purge(ctx); return s.Close() }}, nil
	case "overlayfs":
		s, err := overlay.NewSnapshotter(root)
		if err != nil {
			return nil, err
		}
		return &inproc{kind, s, s.Close}, nil
	case "blockfile":
		if err := os.MkdirAll(root, 0o700); err != nil {
			return nil, err
		}
		scratch := filepath.Join(filepath.Dir(root), kind+"-scratch.img")
		// The docs' recipe (dd + mkfs.ext4), with 4 KiB blocks as loop uses.
		if err := os.WriteFile(scratch, nil, 0o600); err != nil {
			return nil, err
		}
		if err := os.Truncate(scratch, size); err != nil {
			return nil, err
		}
		if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", scratch).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("mkfs.ext4: %v: %s", err, out)
		}
		s, err := blockfile.NewSnapshotter(root, blockfile.WithScratchFile(scratch), blockfile.WithFSType("ext4"))
		if err != nil {
			return nil, err
		}
		return &inproc{kind, s, s.Close}, nil
	}
	return nil, fmt.Errorf("unknown snapshotter %q", kind)
}

// contentStore ingests the image's layers into a local content store.
func contentStore(ctx context.Context, dir string, img *ociimage.Image) (content.Store, []rootfs.Layer, error) {
	cs, err := local.NewStore(dir)
	if err != nil {
		return nil, nil, err
	}
	var layers []rootfs.Layer
	for i, l := range img.Layers {
		desc := ocispec.Descriptor{MediaType: l.MediaType, Digest: digest.Digest(l.Digest()), Size: int64(len(l.Data))}
		if err := content.WriteBlob(ctx, cs, fmt.Sprintf("layer-%d", i), bytes.NewReader(l.Data), desc); err != nil {
			return nil, nil, err
		}
		// Uncompressed layers: the diff id is the blob digest.
		layers = append(layers, rootfs.Layer{Diff: desc, Blob: desc})
	}
	return cs, layers, nil
}

// unpackInproc applies the layers into sn the way containerd's unpacker
// does (Prepare, temp mount, apply tar, unmount, Commit per layer).
func unpackInproc(ctx context.Context, sn snapshots.Snapshotter, cs content.Store, layers []rootfs.Layer) (time.Duration, error) {
	ctx = namespaces.WithNamespace(ctx, "snapbench")
	start := time.Now()
	_, err := rootfs.ApplyLayers(ctx, layers, sn, apply.NewFileSystemApplier(cs))
	return time.Since(start), err
}

// layers128 repeats the conformance suite's 128LayersMount: 128 cycles of
// Prepare, mount, write a file, unmount, Commit; then a View of the top,
// mounted, must show all 128 files.
func layers128(ctx context.Context, sn snapshots.Snapshotter, work string) (time.Duration, error) {
	ctx = namespaces.WithNamespace(ctx, "snapbench")
	start := time.Now()
	parent := ""
	for i := range 128 {
		key := fmt.Sprintf("prepare-%d", i)
		ms, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			return 0, fmt.Errorf("layer %d: prepare: %w", i, err)
		}
		dir := filepath.Join(work, key)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return 0, err
		}
		if err := mount.All(ms, dir); err != nil {
			return 0, fmt.Errorf("layer %d: mount: %w", i, err)
		}
		werr := os.WriteFile(filepath.Join(dir, fmt.Sprintf("file-%03d", i)), []byte("layer\n"), 0o644)
		if err := mount.UnmountAll(dir, 0); err != nil {
			return 0, err
		}
		if werr != nil {
			return 0, werr
		}
		name := fmt.Sprintf("layer-%d", i)
		if err := sn.Commit(ctx, name, key); err != nil {
			return 0, fmt.Errorf("layer %d: commit: %w", i, err)
		}
		parent = name
	}
	ms, err := sn.View(ctx, "view", parent)
	if err != nil {
		return 0, err
	}
	dir := filepath.Join(work, "view")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	if err := mount.All(ms, dir); err != nil {
		return 0, err
	}
	es, rerr := os.ReadDir(dir)
	if err := mount.UnmountAll(dir, 0); err != nil {
		return 0, err
	}
	d := time.Since(start)
	if rerr != nil {
		return 0, rerr
	}
	n := 0
	for _, e := range es {
		if len(e.Name()) == 8 && e.Name()[:5] == "file-" {
			n++
		}
	}
	if n != 128 {
		return 0, fmt.Errorf("view shows %d of 128 files", n)
	}
	return d, nil
}

// purgeLoop detaches every device of a loop-snapshotter root (after its
// daemon stopped: devices outlive the process by design).
func purgeLoop(ctx context.Context, root string) {
	cfg := config.DefaultSnapshotter()
	cfg.Root = root
	s, err := snapadmin.From(snapshot.NewSnapshotter(ctx, cfg))
	if err != nil {
		logf("purge %s: %v", root, err)
		return
	}
	if err := s.Purge(ctx); err != nil {
		logf("purge %s: %v", root, err)
	}
	s.Close()
}
