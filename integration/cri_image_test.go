//go:build integration

package integration

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"
)

// criLayerFile is one entry of an image layer: a regular file (Data), a
// directory (Dir) or a symlink (Link).
type criLayerFile struct {
	Name string
	Mode int64
	Data []byte
	Dir  bool
	Link string
	// Hard makes Link a hard link (to a path in the same layer) rather
	// than a symlink.
	Hard bool
}

type criBlob struct {
	mediaType string
	data      []byte
}

func (b criBlob) digest() string {
	sum := sha256.Sum256(b.data)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func (b criBlob) descriptor() map[string]any {
	return map[string]any{"mediaType": b.mediaType, "digest": b.digest(), "size": len(b.data)}
}

// criTarLayer builds an uncompressed layer tar. Uncompressed layers keep the
// digest and the diff id equal, which containerd accepts for OCI images.
func criTarLayer(t testing.TB, files []criLayerFile) criBlob {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(1700000000, 0)
	for _, f := range files {
		h := &tar.Header{Name: f.Name, Mode: f.Mode, ModTime: mtime, Format: tar.FormatPAX}
		switch {
		case f.Dir:
			h.Typeflag = tar.TypeDir
		case f.Link != "" && f.Hard:
			h.Typeflag = tar.TypeLink
			h.Linkname = f.Link
		case f.Link != "":
			h.Typeflag = tar.TypeSymlink
			h.Linkname = f.Link
		default:
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("layer header %s: %v", f.Name, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.Data); err != nil {
				t.Fatalf("layer data %s: %v", f.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatalf("close layer: %v", err)
	}
	return criBlob{mediaType: "application/vnd.oci.image.layer.v1.tar", data: buf.Bytes()}
}

func criJSONBlob(t testing.TB, mediaType string, v any) criBlob {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("marshal %s: %v", mediaType, err)
	}
	return criBlob{mediaType: mediaType, data: data}
}

// criBusyboxImage writes an OCI image archive (the format `ctr image import`
// reads) named ref with two layers made from the host's static busybox: the
// binary with a few applet links, then a small second layer, so that the
// snapshotter has to clone a committed parent. The default command sleeps,
// which makes the image usable as the pod sandbox (pause) image: CRI stops a
// sandbox with SIGKILL.
func criBusyboxImage(t *testing.T, path, ref, busyboxPath string) {
	t.Helper()
	bb, err := os.ReadFile(busyboxPath)
	if err != nil {
		t.Fatalf("read busybox: %v", err)
	}
	base := []criLayerFile{
		{Name: "bin/", Mode: 0o755, Dir: true},
		{Name: "bin/busybox", Mode: 0o755, Data: bb},
	}
	for _, applet := range []string{"sh", "sleep", "dd", "df", "sync", "cat", "ls", "mount", "stat"} {
		base = append(base, criLayerFile{Name: "bin/" + applet, Mode: 0o777, Link: "busybox"})
	}
	base = append(base,
		criLayerFile{Name: "tmp/", Mode: 0o1777, Dir: true},
		criLayerFile{Name: "proc/", Mode: 0o555, Dir: true},
		criLayerFile{Name: "sys/", Mode: 0o555, Dir: true},
		criLayerFile{Name: "dev/", Mode: 0o755, Dir: true},
		// Mount point for oci-loop-hook's data images.
		criLayerFile{Name: "data/", Mode: 0o755, Dir: true},
	)
	top := []criLayerFile{
		{Name: "etc/", Mode: 0o755, Dir: true},
		{Name: "etc/loopkit-release", Mode: 0o644, Data: []byte("loopkit cri test image, layer 2\n")},
		{Name: "etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/:/bin/sh\n")},
		{Name: "etc/group", Mode: 0o644, Data: []byte("root:x:0:\n")},
	}
	layers := []criBlob{criTarLayer(t, base), criTarLayer(t, top)}
	diffIDs := make([]string, 0, len(layers))
	layerDescs := make([]map[string]any, 0, len(layers))
	for _, l := range layers {
		diffIDs = append(diffIDs, l.digest())
		layerDescs = append(layerDescs, l.descriptor())
	}
	config := criJSONBlob(t, "application/vnd.oci.image.config.v1+json", map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"created":      "2023-11-14T22:13:20Z",
		"config": map[string]any{
			"Env": []string{"PATH=/bin"},
			"Cmd": []string{"/bin/sleep", "1000000"},
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": diffIDs},
	})
	manifest := criJSONBlob(t, "application/vnd.oci.image.manifest.v1+json", map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        config.descriptor(),
		"layers":        layerDescs,
	})
	mdesc := manifest.descriptor()
	mdesc["platform"] = map[string]any{"architecture": runtime.GOARCH, "os": "linux"}
	mdesc["annotations"] = map[string]any{
		"io.containerd.image.name":          ref,
		"org.opencontainers.image.ref.name": ref,
	}
	index := map[string]any{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []any{mdesc}}

	f, err := os.Create(path)
	if err != nil {
		t.Fatalf("create image archive: %v", err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(name string, data []byte) {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: time.Unix(1700000000, 0)}); err != nil {
			t.Fatalf("archive header %s: %v", name, err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatalf("archive data %s: %v", name, err)
		}
	}
	add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`))
	idx, err := json.Marshal(index)
	if err != nil {
		t.Fatalf("marshal index: %v", err)
	}
	add("index.json", idx)
	for _, b := range append([]criBlob{config, manifest}, layers...) {
		d := b.digest()
		add(fmt.Sprintf("blobs/sha256/%s", d[len("sha256:"):]), b.data)
	}
	if err := tw.Close(); err != nil {
		t.Fatalf("close image archive: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close image archive: %v", err)
	}
}
