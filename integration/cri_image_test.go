//go:build integration

package integration

import (
	"os"
	"testing"

	"github.com/loopkit/loopkit/internal/ociimage"
)

// criTarLayer builds an uncompressed layer tar (ociimage.Layer).
func criTarLayer(t testing.TB, files []ociimage.Entry) ociimage.Blob {
	t.Helper()
	l, err := ociimage.Layer(files)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// busyboxEntries is the base layer of the test images: the host's static
// busybox bb at bin/busybox, a symlink bin/<a> to it for each applet, then
// the directories dirs (mode 0755).
func busyboxEntries(bb []byte, applets []string, dirs ...string) []ociimage.Entry {
	es := []ociimage.Entry{{Name: "bin/", Mode: 0o755, Dir: true}, {Name: "bin/busybox", Mode: 0o755, Data: bb}}
	for _, a := range applets {
		es = append(es, ociimage.Entry{Name: "bin/" + a, Mode: 0o777, Link: "busybox"})
	}
	for _, d := range dirs {
		es = append(es, ociimage.Entry{Name: d, Mode: 0o755, Dir: true})
	}
	return es
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
	base := busyboxEntries(bb, []string{"sh", "sleep", "dd", "df", "sync", "cat", "ls", "mount", "stat"})
	base = append(base,
		ociimage.Entry{Name: "tmp/", Mode: 0o1777, Dir: true},
		ociimage.Entry{Name: "proc/", Mode: 0o555, Dir: true},
		ociimage.Entry{Name: "sys/", Mode: 0o555, Dir: true},
		ociimage.Entry{Name: "dev/", Mode: 0o755, Dir: true},
		// Mount point for oci-loop-hook's data images.
		ociimage.Entry{Name: "data/", Mode: 0o755, Dir: true},
	)
	top := []ociimage.Entry{
		{Name: "etc/", Mode: 0o755, Dir: true},
		{Name: "etc/loopkit-release", Mode: 0o644, Data: []byte("loopkit cri test image, layer 2\n")},
		{Name: "etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/:/bin/sh\n")},
		{Name: "etc/group", Mode: 0o644, Data: []byte("root:x:0:\n")},
	}
	ctdWriteImage(t, path, ref, []ociimage.Blob{criTarLayer(t, base), criTarLayer(t, top)}, []string{"/bin/sleep", "1000000"})
}
