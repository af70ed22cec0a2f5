//go:build integration

package integration

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

const ctdImageRef = "loopkit.test/snap-busybox:v1"

// TestContainerdLoopSnapshotter is the end-to-end path of issue 3 on a
// private containerd, 1.6 and 2.x, in every snapshotter mode: import (unpack into loop), `ctr run --snapshotter
// loop`, the size label seen by df and enforced with ENOSPC, a container
// that keeps running while loop-snapshotter is restarted (SIGTERM) and
// killed (SIGKILL) and restarted, and removal plus GC that leave no device,
// file or mount behind.
func TestContainerdLoopSnapshotter(t *testing.T) {
	forEachDaemonMode(t, ctdLoopSnapshotter)
}

func ctdLoopSnapshotter(t *testing.T, d ctdDaemon, mode string) {
	// Layers unpack at default_size; labels grow or shrink the container's
	// copy.
	e := ctdStart(t, d, mode, "default_size = \"128MiB\"\n")
	e.importImage(ctdImageRef)

	// The image's layers were unpacked through Prepare/mount/Commit.
	out := e.ctr(e.runArgs("--rm", ctdImageRef, "ls-test", "sh", "-c",
		"cat /etc/layer4; test -e /etc/layer2 && echo layer2-present; wc -c < /data/blob; head -1 /proc/mounts")...)
	if !strings.Contains(out, "layer 4") || strings.Contains(out, "layer2-present") || !strings.Contains(out, strconv.Itoa(1<<20)) {
		t.Fatalf("container sees the wrong layers:\n%s", out)
	}
	switch mode {
	case config.ModeFlat:
		if !strings.Contains(out, "/dev/loop") || !strings.Contains(out, " / ext4 ") {
			t.Errorf("flat mode: container root is not an ext4 loop device:\n%s", out)
		}
	default:
		if !strings.Contains(out, "overlay / overlay ") || !strings.Contains(out, e.snapRoot) {
			t.Errorf("%s mode: container root is not an overlay of the snapshotter's layers:\n%s", mode, out)
		}
	}

	// df shows the label; without it, default_size.
	label := "containerd.io/snapshot/max-size=268435456"
	if got := ctdDfSize(t, e.ctr(e.runArgs("--rm", "--snapshotter-label", label, ctdImageRef, "df-label", "df", "-B1", "/")...)); got > 256<<20 || got < 220<<20 {
		t.Errorf("df with max-size 256 MiB: %d bytes", got)
	}
	if got := ctdDfSize(t, e.ctr(e.runArgs("--rm", ctdImageRef, "df-default", "df", "-B1", "/")...)); got > 128<<20 || got < 100<<20 {
		t.Errorf("df with default_size 128 MiB: %d bytes", got)
	}
	if got := ctdDfSize(t, e.ctr(e.runArgs("--rm", "--snapshotter-label", "containerd.io/snapshot/max-size=67108864", ctdImageRef, "df-small", "df", "-B1", "/")...)); got > 64<<20 || got < 32<<20 {
		t.Errorf("df with max-size 64 MiB (shrunk from 128 MiB): %d bytes", got)
	}
	// Writing past the limit fails with ENOSPC inside the container.
	out = e.ctr(e.runArgs("--rm", "--snapshotter-label", label, ctdImageRef, "enospc", "sh", "-c",
		"dd if=/dev/zero of=/fill bs=1M count=300 2>&1; echo rc=$?")...)
	if !strings.Contains(out, "No space left on device") || strings.Contains(out, "rc=0") {
		t.Errorf("writing 300 MiB into 256 MiB:\n%s", out)
	}

	// A container keeps writing to its rootfs across snapshotter restarts.
	progress := ctdLiveWriter(t, e, ctdImageRef, "live")
	progress("before restart")
	if err := e.snap.stop(); err != nil {
		t.Fatal(err)
	}
	progress("snapshotter stopped")
	e.restartSnapshotter()
	progress("snapshotter restarted")
	e.snap.kill()
	progress("snapshotter killed")
	e.restartSnapshotter()
	progress("snapshotter restarted after SIGKILL")
	// containerd redials with backoff: wait until it reaches the new process.
	ctdWaitSnapshotter(t, e)
	// The restarted snapshotter adopted the running container's device.
	st := e.status()
	var live int
	for _, s := range st.Snapshots {
		if s.Kind == "Active" && s.Device != "" {
			live++
		}
	}
	if live != 1 || len(st.Orphans) != 0 {
		t.Errorf("status after restarts: %d active snapshots with a device (want 1), orphans %v", live, st.Orphans)
	}

	// Diff of a running container. Flat mode: Mounts of the mounted
	// snapshot is a bind of the container's root, which containerd's
	// read-only temp mount accepts (the block device it refuses, EBUSY).
	// Overlay-based modes: containerd turns the overlay read-only by moving
	// the upper into the lowers.
	out, err := e.try("snapshots", "--snapshotter", "loop", "diff", "live")
	if err != nil {
		t.Errorf("%s mode: diff of a running container: %v", mode, err)
	} else if !slices.Contains(ctdTarNames(t, out), "count") {
		t.Errorf("%s mode: diff of the running container lacks /count", mode)
	}
	progress("after the diff")

	// Stop and remove everything; GC must leave nothing behind.
	e.ctr("task", "kill", "-s", "SIGKILL", "live")
	ctdWaitStopped(t, e, "live")
	e.ctr("task", "delete", "live")
	// Diff of a stopped container: the walking differ
	// mounts the parent as a View and the active snapshot read-only.
	// ctr 1.6 writes the layer (gzip tar) to stdout: it must hold /count.
	if names := ctdTarNames(t, e.ctr("snapshots", "--snapshotter", "loop", "diff", "live")); !slices.Contains(names, "count") {
		t.Errorf("diff of the stopped container lacks /count: %v", names)
	}
	e.ctr("container", "rm", "live")

	// Reboot: a created container's device disappears while the
	// snapshotter is down; the next task start re-attaches it (Mounts).
	e.ctr("container", "create", "--snapshotter", "loop", ctdImageRef, "reboot", "cat", "/etc/layer4")
	if err := e.snap.stop(); err != nil {
		t.Fatal(err)
	}
	// After a reboot nothing is mounted: overlay-based modes keep their
	// layers mounted under the root, so unmount those first.
	criUnmountUnder(t, e.snapRoot)
	if n := snapDetachAll(t, e.snapRoot); n == 0 {
		t.Fatal("no device to detach for the created container")
	}
	e.restartSnapshotter()
	ctdWaitSnapshotter(t, e)
	if out := e.ctr("task", "start", "reboot"); !strings.Contains(out, "layer 4") {
		t.Errorf("task start after the devices vanished: %q", out)
	}
	e.ctr("container", "rm", "reboot")

	e.ctr("image", "rm", "--sync", ctdImageRef)
	if out := strings.TrimSpace(e.ctr("snapshots", "--snapshotter", "loop", "ls")); strings.Count(out, "\n") > 0 {
		t.Errorf("snapshots left after image removal and GC:\n%s", out)
	}
	if left := e.leftovers(); len(left) > 0 {
		t.Errorf("left behind after GC:\n  %s", strings.Join(left, "\n  "))
	}
}

// ctdDfSize parses the 1B-blocks column of `df -B1 /`.
func ctdDfSize(t *testing.T, out string) int64 {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) < 2 {
		t.Fatalf("df output: %q", out)
	}
	f := strings.Fields(lines[len(lines)-1])
	if len(f) < 2 {
		t.Fatalf("df output: %q", out)
	}
	n, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		t.Fatalf("df output: %q", out)
	}
	return n
}

func ctdWaitStopped(t *testing.T, e *ctdEnv, id string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _ := e.try("task", "ls")
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line)
			if len(f) >= 3 && f[0] == id && f[2] == "STOPPED" {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("task %s not stopped after 30s:\n%s", id, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ctdWaitSnapshotter waits until containerd's proxy client reaches
// loop-snapshotter again (it redials with backoff after a restart).
func ctdWaitSnapshotter(t *testing.T, e *ctdEnv) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := e.try("snapshots", "--snapshotter", "loop", "ls")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd cannot reach loop-snapshotter after restart: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// snapDetachAll detaches every loop device backed by a file under root, as
// a reboot would drop them, and returns how many it detached.
func snapDetachAll(t *testing.T, root string) int {
	t.Helper()
	infos, err := loopdev.List(nil)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, i := range infos {
		if !strings.HasPrefix(i.BackingFile, root+"/") {
			continue
		}
		// Deferred: a lazily unmounted layer's last reference goes away
		// after the call; the device unbinds then.
		if err := loopdev.DetachRecord(context.Background(), i.Record(), loopdev.DetachOptions{}); err != nil && !errors.Is(err, loopdev.ErrDetachDeferred) {
			t.Fatalf("detach %s: %v", i.Path, err)
		}
		n++
	}
	return n
}

// ctdTarNames lists the entries of a gzip-compressed tar.
func ctdTarNames(t *testing.T, data string) []string {
	t.Helper()
	zr, err := gzip.NewReader(strings.NewReader(data))
	if err != nil {
		t.Fatalf("diff output is not gzip: %v", err)
	}
	tr := tar.NewReader(zr)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return names
		}
		if err != nil {
			t.Fatalf("diff output: %v", err)
		}
		names = append(names, strings.TrimPrefix(h.Name, "/"))
	}
}
