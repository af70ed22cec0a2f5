package snapshot

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/config"
)

// treeLayers is a three-layer image with everything a layer can carry:
// hard links, symlinks, device nodes, a FIFO, setuid, owners, modes,
// xattrs, mtimes, file and directory whiteouts, and an opaque directory.
func treeLayers(t *testing.T) [][]byte {
	mt := time.Date(2021, 5, 6, 7, 8, 9, 0, time.UTC)
	type ent struct {
		name     string
		typ      byte
		mode     int64
		uid, gid int
		body     string
		link     string
		maj, min int64
		xattr    map[string]string
	}
	mk := func(ents []ent) []byte {
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		for _, e := range ents {
			h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid, ModTime: mt,
				Linkname: e.link, Devmajor: e.maj, Devminor: e.min, Format: tar.FormatPAX}
			if e.typ == tar.TypeReg {
				h.Size = int64(len(e.body))
			}
			if len(e.xattr) > 0 {
				h.PAXRecords = map[string]string{}
				for k, v := range e.xattr {
					h.PAXRecords["SCHILY.xattr."+k] = v
				}
			}
			if err := tw.WriteHeader(h); err != nil {
				t.Fatal(err)
			}
			if e.typ == tar.TypeReg {
				if _, err := tw.Write([]byte(e.body)); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	dir := func(n string, mode int64) ent { return ent{name: n, typ: tar.TypeDir, mode: mode} }
	reg := func(n, body string, mode int64) ent { return ent{name: n, typ: tar.TypeReg, mode: mode, body: body} }
	wh := func(n string) ent { return ent{name: n, typ: tar.TypeReg, mode: 0o644} }
	l1 := []ent{
		dir("etc/", 0o755), reg("etc/a", "aaa", 0o644), reg("etc/b", "bbb", 0o640),
		dir("d/", 0o755),
		{name: "d/x", typ: tar.TypeReg, mode: 0o644, body: "xx", xattr: map[string]string{"user.k": "v"}},
		{name: "d/h", typ: tar.TypeLink, link: "d/x", mode: 0o644},
		{name: "s", typ: tar.TypeSymlink, link: "d/x", mode: 0o777},
		{name: "fifo", typ: tar.TypeFifo, mode: 0o600},
		{name: "null", typ: tar.TypeChar, mode: 0o666, maj: 1, min: 3},
		{name: "blk", typ: tar.TypeBlock, mode: 0o600, maj: 7, min: 200},
		{name: "suid", typ: tar.TypeReg, mode: 0o4755, uid: 1000, gid: 1000, body: "#!/bin/sh\n"},
		{name: "keep/", typ: tar.TypeDir, mode: 0o700, uid: 1234, gid: 4321},
		dir("o/", 0o755), reg("o/y", "y", 0o644), dir("o/sub/", 0o755), reg("o/sub/q", "q", 0o644),
		dir("rmdir/", 0o755), reg("rmdir/f", "f", 0o644),
	}
	l2 := []ent{
		dir("etc/", 0o755), wh("etc/.wh.a"), reg("etc/c", "ccc", 0o600),
		dir("o/", 0o755), wh("o/.wh..wh..opq"), reg("o/z", "z", 0o644),
		wh(".wh.rmdir"),
		dir("d/", 0o755), reg("d/n", "nn", 0o644), {name: "d/n2", typ: tar.TypeLink, link: "d/n", mode: 0o644},
	}
	l3 := []ent{
		dir("etc/", 0o755), reg("etc/b", "bbb", 0o600),
		{name: "keep/", typ: tar.TypeDir, mode: 0o750, uid: 1234, gid: 4321},
		reg("big", strings.Repeat("0123456789abcdef", 1<<14), 0o644),
	}
	return [][]byte{mk(l1), mk(l2), mk(l3)}
}

// unpackTree applies the layers through containerd's real applier (which
// writes overlay whiteouts straight into an overlay mount's upperdir), the
// way containerd's unpacker names the snapshots, and lists the tree of a
// container snapshot on top.
func unpackTree(t *testing.T, ctx context.Context, sn snapshots.Snapshotter, cs content.Store, blobs [][]byte, work string) []string {
	t.Helper()
	applier := apply.NewFileSystemApplier(cs)
	parent := ""
	for i, b := range blobs {
		desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromBytes(b), Size: int64(len(b))}
		if err := content.WriteBlob(ctx, cs, "layer-"+strconv.Itoa(i), bytes.NewReader(b), desc); err != nil {
			t.Fatal(err)
		}
		key := fmt.Sprintf("extract-%d", i)
		ms, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := applier.Apply(ctx, desc, ms); err != nil {
			t.Fatalf("apply layer %d: %v", i, err)
		}
		name := fmt.Sprintf("layer-%d", i)
		if err := sn.Commit(ctx, name, key); err != nil {
			t.Fatal(err)
		}
		parent = name
	}
	ms, err := sn.Prepare(ctx, "container", parent)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(work, "rootfs")
	mountAll(t, ms, dir)
	return listTree(t, dir)
}

// listTree prints every entry: path, type and mode, owner, link count of
// regular files, size, content hash, symlink target, device number, mtime
// and xattrs.
func listTree(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		line := fmt.Sprintf("%s mode=%o owner=%d:%d", rel, st.Mode, st.Uid, st.Gid)
		// The root directory is the container snapshot's own upper, made
		// at Prepare: its mtime is that moment in every snapshotter.
		if rel != "." {
			line += fmt.Sprintf(" mtime=%d", st.Mtim.Sec)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			line += fmt.Sprintf(" nlink=%d size=%d sha256=%s", st.Nlink, st.Size, hex.EncodeToString(sum[:8]))
		case unix.S_IFLNK:
			target, _ := os.Readlink(p)
			line += " -> " + target
		case unix.S_IFCHR, unix.S_IFBLK:
			line += fmt.Sprintf(" rdev=%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		buf := make([]byte, 4096)
		if n, err := unix.Llistxattr(p, buf); err == nil && n > 0 {
			names := strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00")
			sort.Strings(names)
			for _, x := range names {
				v := make([]byte, 4096)
				m, _ := unix.Lgetxattr(p, x, v)
				line += fmt.Sprintf(" %s=%q", x, v[:max(m, 0)])
			}
		}
		out = append(out, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestTreeIdentity: the same image unpacked by containerd's applier onto
// containerd's overlayfs snapshotter and onto this snapshotter in both
// modes lists the same tree.
func TestTreeIdentity(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	blobs := treeLayers(t)
	base := t.TempDir()
	testutil.NoLeaks(t, base)
	cs, err := local.NewStore(filepath.Join(base, "content"))
	if err != nil {
		t.Fatal(err)
	}
	trees := map[string][]string{}
	for _, name := range []string{"overlayfs", config.ModeFlat, config.ModeLayered} {
		t.Run(name, func(t *testing.T) {
			work := filepath.Join(base, name)
			var sn snapshots.Snapshotter
			if name == "overlayfs" {
				o, err := overlay.NewSnapshotter(filepath.Join(work, "root"))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { o.Close() })
				sn = o
			} else {
				s, err := newSnapshotter(ctx, testConfigMode(filepath.Join(work, "root"), name))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					if err := s.Purge(ctx); err != nil {
						t.Errorf("purge: %v", err)
					}
					s.Close()
				})
				sn = s
			}
			trees[name] = unpackTree(t, ctx, sn, cs, blobs, work)
		})
	}
	want := trees["overlayfs"]
	if len(want) < 15 {
		t.Fatalf("overlayfs tree too small:\n%s", strings.Join(want, "\n"))
	}
	for _, mode := range []string{config.ModeFlat, config.ModeLayered} {
		if got := trees[mode]; strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("%s mode lists a different tree than overlayfs:\n--- overlayfs\n%s\n--- %s\n%s", mode, strings.Join(want, "\n"), mode, strings.Join(got, "\n"))
		}
	}
}
