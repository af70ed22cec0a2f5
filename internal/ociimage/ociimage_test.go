package ociimage

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The archive holds the layout file, an index naming the image, and every
// blob under its digest; the config's diff ids are the layer digests; a
// hard link and a whiteout come out as tar types a layer applier knows.
func TestWriteArchive(t *testing.T) {
	l, err := Layer([]Entry{
		{Name: "etc/", Mode: 0o755, Dir: true},
		{Name: "etc/a", Mode: 0o644, Data: []byte("a\n")},
		{Name: "etc/b", Mode: 0o644, Link: "etc/a", Hard: true},
		{Name: "etc/s", Mode: 0o777, Link: "a"},
		{Name: "etc/.wh.gone", Mode: 0o644},
	})
	if err != nil {
		t.Fatal(err)
	}
	types := map[string]byte{}
	readTar(t, bytes.NewReader(l.Data), func(h *tar.Header, _ []byte) { types[h.Name] = h.Typeflag })
	want := map[string]byte{"etc/": tar.TypeDir, "etc/a": tar.TypeReg, "etc/b": tar.TypeLink, "etc/s": tar.TypeSymlink, "etc/.wh.gone": tar.TypeReg}
	for n, ty := range want {
		if types[n] != ty {
			t.Errorf("%s: type %q, want %q", n, types[n], ty)
		}
	}
	img, err := New("example.test/x:v1", []Blob{l}, []string{"/bin/true"})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "img.tar")
	if err := img.WriteArchive(path); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files := map[string][]byte{}
	readTar(t, f, func(h *tar.Header, b []byte) { files[h.Name] = b })
	for _, b := range []Blob{img.Config, img.Manifest, l} {
		if got := files["blobs/sha256/"+strings.TrimPrefix(b.Digest(), "sha256:")]; string(got) != string(b.Data) {
			t.Errorf("blob %s missing or different", b.MediaType)
		}
	}
	var idx struct {
		Manifests []struct {
			Digest      string            `json:"digest"`
			Annotations map[string]string `json:"annotations"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &idx); err != nil || len(idx.Manifests) != 1 {
		t.Fatalf("index %s: %v", files["index.json"], err)
	}
	if m := idx.Manifests[0]; m.Digest != img.Manifest.Digest() || m.Annotations["io.containerd.image.name"] != img.Ref {
		t.Errorf("index names %+v", m)
	}
	var cfg struct {
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(img.Config.Data, &cfg); err != nil || len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != l.Digest() {
		t.Errorf("config diff ids %v (%v), want the layer digest", cfg.RootFS.DiffIDs, err)
	}
	if _, ok := files["oci-layout"]; !ok {
		t.Error("no oci-layout file")
	}
}

// readTar calls fn with each entry of the tar in r and its content.
func readTar(t *testing.T, r io.Reader, fn func(*tar.Header, []byte)) {
	t.Helper()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		fn(h, b)
	}
}
