package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"time"
)

// blob is one content-addressed object of the benchmark image.
type blob struct {
	mediaType string
	data      []byte
}

func (b blob) digest() string {
	sum := sha256.Sum256(b.data)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func (b blob) descriptor() map[string]any {
	return map[string]any{"mediaType": b.mediaType, "digest": b.digest(), "size": len(b.data)}
}

type benchImage struct {
	ref    string
	layers []blob // uncompressed tars: digest == diff id
	config blob
	man    blob
}

var mtime = time.Unix(1700000000, 0)

// makeImage builds an image of n layers of about layerBytes each, filled
// with incompressible data in files of fileBytes; the first layer also
// carries busybox and applet links so containers can run.
func makeImage(ref, busybox string, n int, layerBytes, fileBytes int64) (*benchImage, error) {
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return nil, err
	}
	rng := rand.NewChaCha8([32]byte{1, 2, 3})
	img := &benchImage{ref: ref}
	for l := range n {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		add := func(h *tar.Header, data []byte) error {
			h.ModTime = mtime
			h.Format = tar.FormatPAX
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			_, err := tw.Write(data)
			return err
		}
		if l == 0 {
			for _, d := range []string{"bin/", "tmp/", "proc/", "sys/", "dev/", "etc/"} {
				if err := add(&tar.Header{Name: d, Mode: 0o755, Typeflag: tar.TypeDir}, nil); err != nil {
					return nil, err
				}
			}
			if err := add(&tar.Header{Name: "bin/busybox", Mode: 0o755, Typeflag: tar.TypeReg, Size: int64(len(bb))}, bb); err != nil {
				return nil, err
			}
			for _, a := range []string{"sh", "true", "sleep", "cat", "ls"} {
				if err := add(&tar.Header{Name: "bin/" + a, Mode: 0o777, Typeflag: tar.TypeSymlink, Linkname: "busybox"}, nil); err != nil {
					return nil, err
				}
			}
		}
		dir := fmt.Sprintf("data%d/", l)
		if err := add(&tar.Header{Name: dir, Mode: 0o755, Typeflag: tar.TypeDir}, nil); err != nil {
			return nil, err
		}
		chunk := make([]byte, fileBytes)
		for i := int64(0); i < layerBytes/fileBytes; i++ {
			rng.Read(chunk)
			if err := add(&tar.Header{Name: fmt.Sprintf("%sf%03d", dir, i), Mode: 0o644, Typeflag: tar.TypeReg, Size: int64(len(chunk))}, chunk); err != nil {
				return nil, err
			}
		}
		if err := tw.Close(); err != nil {
			return nil, err
		}
		img.layers = append(img.layers, blob{"application/vnd.oci.image.layer.v1.tar", buf.Bytes()})
	}
	var diffIDs []string
	var descs []map[string]any
	for _, l := range img.layers {
		diffIDs = append(diffIDs, l.digest())
		descs = append(descs, l.descriptor())
	}
	cfg, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH, "os": "linux", "created": "2023-11-14T22:13:20Z",
		"config": map[string]any{"Env": []string{"PATH=/bin"}, "Cmd": []string{"/bin/true"}},
		"rootfs": map[string]any{"type": "layers", "diff_ids": diffIDs},
	})
	if err != nil {
		return nil, err
	}
	img.config = blob{"application/vnd.oci.image.config.v1+json", cfg}
	man, err := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": img.config.descriptor(), "layers": descs,
	})
	if err != nil {
		return nil, err
	}
	img.man = blob{"application/vnd.oci.image.manifest.v1+json", man}
	return img, nil
}

// writeArchive writes the OCI image layout tar `ctr image import` reads.
func (img *benchImage) writeArchive(path string) error {
	md := img.man.descriptor()
	md["platform"] = map[string]any{"architecture": runtime.GOARCH, "os": "linux"}
	md["annotations"] = map[string]any{"io.containerd.image.name": img.ref, "org.opencontainers.image.ref.name": img.ref}
	idx, err := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []any{md}})
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
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: mtime}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return err
	}
	if err := add("index.json", idx); err != nil {
		return err
	}
	for _, b := range append([]blob{img.config, img.man}, img.layers...) {
		if err := add("blobs/sha256/"+b.digest()[len("sha256:"):], b.data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}

func (img *benchImage) size() int64 {
	var n int64
	for _, l := range img.layers {
		n += int64(len(l.data))
	}
	return n
}
