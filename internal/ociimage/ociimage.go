// Package ociimage builds small OCI images in memory and writes them as
// the OCI image-layout archive `ctr image import` reads: the test and
// benchmark images of the integration tests and bench/snapbench. Layers are
// uncompressed tars, so a layer's digest is also its diff id, which
// containerd accepts for OCI images; every timestamp is fixed, so the same
// input gives the same digests.
package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
)

// Media types of the image's objects.
const (
	MediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"
	MediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	MediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	MediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
)

// ModTime is the modification time of every tar entry.
var ModTime = time.Unix(1700000000, 0)

// Blob is one content-addressed object of an image.
type Blob struct {
	MediaType string
	Data      []byte
}

// Digest is the blob's "sha256:<hex>" digest.
func (b Blob) Digest() string {
	sum := sha256.Sum256(b.Data)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// Descriptor is the blob's OCI descriptor, as JSON would decode it.
func (b Blob) Descriptor() map[string]any {
	return map[string]any{"mediaType": b.MediaType, "digest": b.Digest(), "size": len(b.Data)}
}

// Entry is one entry of a layer: a regular file (Data), a directory (Dir)
// or a link (Link: a symlink, or a hard link to a path in the same layer
// with Hard). A whiteout is a regular file named .wh.<name>.
type Entry struct {
	Name string
	Mode int64
	Data []byte
	Dir  bool
	Link string
	Hard bool
}

// Layer builds an uncompressed layer tar of entries, in their order.
func Layer(entries []Entry) (Blob, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.Name, Mode: e.Mode, ModTime: ModTime, Format: tar.FormatPAX}
		switch {
		case e.Dir:
			h.Typeflag = tar.TypeDir
		case e.Link != "" && e.Hard:
			h.Typeflag, h.Linkname = tar.TypeLink, e.Link
		case e.Link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, e.Link
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(e.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return Blob{}, fmt.Errorf("layer entry %s: %w", e.Name, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(e.Data); err != nil {
				return Blob{}, fmt.Errorf("layer entry %s: %w", e.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return Blob{}, fmt.Errorf("layer: %w", err)
	}
	return Blob{MediaType: MediaTypeLayer, Data: buf.Bytes()}, nil
}

// Image is a single-platform image (the host's architecture, linux).
type Image struct {
	Ref      string
	Layers   []Blob
	Config   Blob
	Manifest Blob
}

// New makes the config (PATH=/bin, cmd) and manifest of an image named ref
// whose layers are layers, bottom first.
func New(ref string, layers []Blob, cmd []string) (*Image, error) {
	diffIDs := make([]string, 0, len(layers))
	descs := make([]map[string]any, 0, len(layers))
	for _, l := range layers {
		diffIDs = append(diffIDs, l.Digest())
		descs = append(descs, l.Descriptor())
	}
	cfg, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH, "os": "linux", "created": ModTime.UTC().Format(time.RFC3339),
		"config": map[string]any{"Env": []string{"PATH=/bin"}, "Cmd": cmd},
		"rootfs": map[string]any{"type": "layers", "diff_ids": diffIDs},
	})
	if err != nil {
		return nil, err
	}
	img := &Image{Ref: ref, Layers: layers, Config: Blob{MediaTypeConfig, cfg}}
	man, err := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": MediaTypeManifest,
		"config": img.Config.Descriptor(), "layers": descs,
	})
	if err != nil {
		return nil, err
	}
	img.Manifest = Blob{MediaTypeManifest, man}
	return img, nil
}

// Size is the sum of the layers' sizes.
func (img *Image) Size() int64 {
	var n int64
	for _, l := range img.Layers {
		n += int64(len(l.Data))
	}
	return n
}

// WriteArchive writes the image as an OCI image-layout tar at path, its
// manifest annotated with the name containerd imports it under.
func (img *Image) WriteArchive(path string) error {
	md := img.Manifest.Descriptor()
	md["platform"] = map[string]any{"architecture": runtime.GOARCH, "os": "linux"}
	md["annotations"] = map[string]any{"io.containerd.image.name": img.Ref, "org.opencontainers.image.ref.name": img.Ref}
	idx, err := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": MediaTypeIndex, "manifests": []any{md}})
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: ModTime}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := add("index.json", idx); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	for _, b := range append([]Blob{img.Config, img.Manifest}, img.Layers...) {
		if err := add("blobs/sha256/"+strings.TrimPrefix(b.Digest(), "sha256:"), b.Data); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}
