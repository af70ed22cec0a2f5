package main

import (
	"fmt"
	"math/rand/v2"
	"os"

	"github.com/loopkit/loopkit/internal/ociimage"
)

// makeImage builds an image of n layers of about layerBytes each, filled
// with incompressible data in files of fileBytes; the first layer also
// carries busybox and applet links so containers can run.
func makeImage(ref, busybox string, n int, layerBytes, fileBytes int64) (*ociimage.Image, error) {
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return nil, err
	}
	rng := rand.NewChaCha8([32]byte{1, 2, 3})
	var layers []ociimage.Blob
	for l := range n {
		var es []ociimage.Entry
		if l == 0 {
			for _, d := range []string{"bin/", "tmp/", "proc/", "sys/", "dev/", "etc/"} {
				es = append(es, ociimage.Entry{Name: d, Mode: 0o755, Dir: true})
			}
			es = append(es, ociimage.Entry{Name: "bin/busybox", Mode: 0o755, Data: bb})
			for _, a := range []string{"sh", "true", "sleep", "cat", "ls"} {
				es = append(es, ociimage.Entry{Name: "bin/" + a, Mode: 0o777, Link: "busybox"})
			}
		}
		dir := fmt.Sprintf("data%d/", l)
		es = append(es, ociimage.Entry{Name: dir, Mode: 0o755, Dir: true})
		for i := int64(0); i < layerBytes/fileBytes; i++ {
			chunk := make([]byte, fileBytes)
			rng.Read(chunk)
			es = append(es, ociimage.Entry{Name: fmt.Sprintf("%sf%03d", dir, i), Mode: 0o644, Data: chunk})
		}
		b, err := ociimage.Layer(es)
		if err != nil {
			return nil, err
		}
		layers = append(layers, b)
	}
	return ociimage.New(ref, layers, []string{"/bin/true"})
}
