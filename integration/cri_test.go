//go:build integration

package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

const criImageRef = "loopkit.test/cri-busybox:v1"

// TestCRIPodOnLoopRootfs is the Kubernetes node path, on containerd 1.6 and
// 2.x in every snapshotter mode: the CRI plugin configured with snapshotter
// = "loop" (contrib's snippet for the release), driven by crictl. A host-network pod runs on a sandbox image the test builds; its
// container's root filesystem must be an ext4 on a loop device of the
// snapshotter, CRI's stats must see the snapshotter's usage, and removing
// the pod and the image must leave no device, mount or process behind.
func TestCRIPodOnLoopRootfs(t *testing.T) {
	forEachDaemonMode(t, func(t *testing.T, d ctdDaemon, mode string) {
		criPodOnLoopRootfs(t, d, mode, criNodeOptions{})
	})
}

func criPodOnLoopRootfs(t *testing.T, d ctdDaemon, mode string, o criNodeOptions) {
	n := criModeNode(t, d, mode, o)

	// What docs/operations.md tells admins to check.
	plugins := n.ctr("plugins", "ls")
	if line := criPluginLine(plugins); line == "" {
		t.Errorf("ctr plugins ls does not show io.containerd.snapshotter.v1 loop ok:\n%s", plugins)
	} else {
		t.Logf("ctr plugins ls: %s", line)
	}

	busybox := n.importTestImage()

	// The container writes 16 MiB into its root filesystem, flushes it to
	// the loop device and marks completion; the usage check waits for it.
	pod := n.runPod("loopkit-cri", "", "/bin/sh", "-c", "dd if=/dev/zero of=/fill bs=1048576 count=16 && sync && touch /done && exec sleep 1000000")
	cid := pod.cid

	// Root filesystems: the container's and the sandbox's.
	ctrDev := criCheckLoopRoot(t, n, "container", pod.ctrPid)
	podDev := criCheckLoopRoot(t, n, "sandbox", pod.podPid)
	if ctrDev == podDev {
		t.Errorf("container and sandbox share root device %s; each snapshot needs its own", ctrDev)
	}

	// The container sees a filesystem of the configured default size
	// (256 MiB), not the host's.
	df := n.crictlRun("exec", "--sync", cid, "df", "-k", "/")
	sizeKiB := criDfSize(t, df)
	if sizeKiB < 200*1024 || sizeKiB > 256*1024 {
		t.Errorf("df / in the container reports %d KiB, want about 256 MiB (default_size):\n%s", sizeKiB, df)
	}
	criWaitFor(t, "the container's 16 MiB write", func() (bool, string) {
		out, err := criTry(30*time.Second, n.crictlArgs("exec", "--sync", cid, "ls", "/done")...)
		return err == nil, strings.TrimSpace(fmt.Sprint(out, " ", err))
	})

	criCheckStats(t, n, cid, busybox)
	criCheckStatusAndRestart(t, n, cid, ctrDev)

	// Orderly teardown, as kubelet does it.
	n.removePod(pod)
	n.crictlRun("rmi", criImageRef)
	criWaitFor(t, "no snapshots left in the loop snapshotter", func() (bool, string) {
		out := strings.TrimSpace(n.ctr("snapshots", "--snapshotter", n.snapshotter, "ls"))
		lines := strings.Split(out, "\n")
		return len(lines) <= 1, out // header only
	})
	// containerd's garbage collector calls Cleanup after removing
	// snapshots: no image may remain on disk (templates are kept).
	criWaitFor(t, "no image files left under the snapshotter root", func() (bool, string) {
		files := criFilesUnder(t, n.snapRoot, "snapshots", "staging", "trash")
		return len(files) == 0, strings.Join(files, " ")
	})
	n.stopContainerd()
	n.stopSnapshotter()
	if left := n.leftovers(); len(left) > 0 {
		t.Errorf("left behind after removing pod and image and stopping the daemons:\n  %s", strings.Join(left, "\n  "))
	}
}

const criWrote = 16 << 20 // bytes the test container writes

// criCheckStats checks what CRI reports from the snapshotter: crictl stats
// (the writable layer's usage comes from the snapshotter's Usage, polled
// every stats_collect_period) and crictl imagefsinfo (the image filesystem
// is the snapshotter's root; the committed layers, busybox itself included,
// are counted).
func criCheckStats(t *testing.T, n *criNode, cid, busybox string) {
	t.Helper()
	criWaitFor(t, "crictl stats writable layer >= 16 MiB", func() (bool, string) {
		var st criStats
		n.crictlJSON(&st, "stats", "--id", cid)
		if len(st.Stats) != 1 {
			return false, fmt.Sprintf("%d stats entries", len(st.Stats))
		}
		s := st.Stats[0]
		ok := s.WritableLayer.UsedBytes.Value >= criWrote && s.Memory.WorkingSetBytes.Value > 0 &&
			s.WritableLayer.FsID.Mountpoint == n.snapRoot
		return ok, fmt.Sprintf("%+v", s)
	})
	bbInfo, err := os.Stat(busybox)
	if err != nil {
		t.Fatal(err)
	}
	criWaitFor(t, "crictl imagefsinfo", func() (bool, string) {
		var fsi struct {
			Status struct {
				ImageFilesystems []criFsUsage `json:"imageFilesystems"`
			} `json:"status"`
		}
		n.crictlJSON(&fsi, "imagefsinfo")
		if len(fsi.Status.ImageFilesystems) != 1 {
			return false, fmt.Sprintf("%+v", fsi)
		}
		u := fsi.Status.ImageFilesystems[0]
		return u.FsID.Mountpoint == n.snapRoot && u.UsedBytes.Value >= uint64(bbInfo.Size()) && u.UsedBytes.Value < 1<<30, fmt.Sprintf("%+v", u)
	})
}

// criCheckStatusAndRestart checks the admin view (loop-snapshotter status
// lists the container's snapshot on the device its / is mounted from),
// then restarts the snapshotter under the running pod, as an upgrade does:
// the container keeps its root filesystem, the device is adopted (same
// diskseq, not re-attached), and containerd reconnects on its own.
func criCheckStatusAndRestart(t *testing.T, n *criNode, cid, ctrDev string) {
	t.Helper()
	before := criFindSnapshot(t, n.status(), cid)
	if !strings.EqualFold(before.Kind, "active") || before.Device != ctrDev || before.SizeLimit != 256<<20 || before.Usage < criWrote || before.DiskSeq == 0 {
		t.Errorf("status of the container's snapshot: %+v; want active on %s, size limit %d, usage >= %d, a diskseq", before, ctrDev, 256<<20, criWrote)
	}

	n.stopSnapshotter()
	n.startSnapshotter()
	if out := n.crictlRun("exec", "--sync", cid, "sh", "-c", "echo after-restart > /after && sync && cat /after"); strings.TrimSpace(out) != "after-restart" {
		t.Errorf("write in the container after the snapshotter restart: %q", out)
	}
	after := criFindSnapshot(t, n.status(), cid)
	if after.Device != before.Device || after.DiskSeq != before.DiskSeq {
		t.Errorf("after restart the container's snapshot is on %s diskseq %d, before on %s diskseq %d", after.Device, after.DiskSeq, before.Device, before.DiskSeq)
	}
	criWaitFor(t, "containerd reaches the restarted snapshotter", func() (bool, string) {
		out, err := criTry(30*time.Second, n.d.ctr, "--address", n.sock, "--namespace", "k8s.io", "snapshots", "--snapshotter", "loop", "usage", cid)
		return err == nil, fmt.Sprint(strings.TrimSpace(out), err)
	})
	if st := n.status(); len(st.Orphans) != 0 {
		t.Errorf("orphan devices after restart: %+v", st.Orphans)
	}
}

// criFilesUnder lists the regular files below root/sub for each sub.
func criFilesUnder(t *testing.T, root string, subs ...string) []string {
	t.Helper()
	var out []string
	for _, sub := range subs {
		err := filepath.WalkDir(filepath.Join(root, sub), func(p string, d os.DirEntry, err error) error {
			if err != nil {
				if os.IsNotExist(err) {
					return nil
				}
				return err
			}
			if d.Type().IsRegular() {
				out = append(out, p)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// criCheckLoopRoot reads the mount table of pid and requires its / to be an
// ext4 on a loop device whose backing file lies under the snapshotter root.
// It returns the device.
func criCheckLoopRoot(t *testing.T, n *criNode, what string, pid int) string {
	t.Helper()
	if pid <= 0 {
		t.Fatalf("%s: no pid from crictl inspect", what)
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 10 || fields[4] != "/" {
			continue
		}
		sep := -1
		for i, fld := range fields {
			if fld == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+2 >= len(fields) {
			continue
		}
		fstype, source := fields[sep+1], fields[sep+2]
		if n.mode != "flat" {
			// Overlay-based modes: / is an overlay whose layers and upper
			// live under the snapshotter's root; the upper directory is on
			// the container's own size-limited ext4 loop device.
			if fstype != "overlay" || sep+3 >= len(fields) || !strings.Contains(fields[sep+3], "lowerdir="+n.snapRoot+"/") {
				t.Fatalf("%s (pid %d): / in %s mode is not an overlay of %s's layers:\n%s", what, pid, n.mode, n.snapRoot, s.Text())
			}
			var upper string
			for _, o := range strings.Split(fields[sep+3], ",") {
				if v, ok := strings.CutPrefix(o, "upperdir="); ok {
					upper = v
				}
			}
			dev, mp := criMountOf(t, upper)
			if !strings.HasPrefix(dev, "/dev/loop") {
				t.Fatalf("%s: upper %s is on %s (mounted at %s), not on a loop device", what, upper, dev, mp)
			}
			if b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file")); err != nil || !strings.HasPrefix(strings.TrimSpace(string(b)), n.snapRoot+"/") {
				t.Errorf("%s: upper device %s is backed by %q (%v), not by an image under %s", what, dev, b, err, n.snapRoot)
			}
			t.Logf("%s rootfs: overlay (%s mode), upper on %s at %s", what, n.mode, dev, mp)
			return dev
		}
		if fstype != "ext4" || !strings.HasPrefix(source, "/dev/loop") {
			t.Fatalf("%s (pid %d): / is %s from %s, want ext4 on /dev/loopN:\n%s", what, pid, fstype, source, s.Text())
		}
		if !strings.HasPrefix(fields[2], "7:") {
			t.Errorf("%s: / has devnum %s, want loop major 7", what, fields[2])
		}
		b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(source), "loop", "backing_file"))
		if err != nil {
			t.Fatalf("%s: %s: %v", what, source, err)
		}
		backing := strings.TrimSpace(string(b))
		if !strings.HasPrefix(backing, n.snapRoot+"/") {
			t.Errorf("%s: %s is backed by %s, not by an image under %s", what, source, backing, n.snapRoot)
		}
		t.Logf("%s rootfs: %s (%s) backed by %s", what, source, fields[2], backing)
		return source
	}
	t.Fatalf("%s (pid %d): no / in mountinfo", what, pid)
	return ""
}

// criMountOf returns the source and mount point of the host mount that
// holds path (the longest mount point above it).
func criMountOf(t *testing.T, path string) (source, mountpoint string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 10 {
			continue
		}
		mp := criUnescape(f[4])
		if mp != path && !strings.HasPrefix(path, strings.TrimSuffix(mp, "/")+"/") || len(mp) <= len(mountpoint) {
			continue
		}
		for i, x := range f {
			if x == "-" && i+2 < len(f) {
				source, mountpoint = f[i+2], mp
			}
		}
	}
	return source, mountpoint
}

// criFindSnapshot returns the status entry of the snapshot CRI created for
// container cid (containerd prefixes keys with "<namespace>/<n>/").
func criFindSnapshot(t *testing.T, st criSnapStatus, cid string) criSnapshotEntry {
	t.Helper()
	for _, s := range st.Snapshots {
		if strings.HasSuffix(s.Key, "/"+cid) {
			return s
		}
	}
	t.Fatalf("loop-snapshotter status has no snapshot for container %s: %+v", cid, st.Snapshots)
	return criSnapshotEntry{}
}

// criValue is a protobuf UInt64Value as crictl prints it: {"value": "123"}
// (JSON mapping of uint64 is a string) or a bare number.
type criValue struct{ Value uint64 }

func (v *criValue) UnmarshalJSON(b []byte) error {
	var w struct {
		Value json.Number `json:"value"`
	}
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	if w.Value == "" {
		return nil
	}
	x, err := strconv.ParseUint(w.Value.String(), 10, 64)
	v.Value = x
	return err
}

type criFsUsage struct {
	FsID struct {
		Mountpoint string `json:"mountpoint"`
	} `json:"fsId"`
	UsedBytes  criValue `json:"usedBytes"`
	InodesUsed criValue `json:"inodesUsed"`
}

type criStats struct {
	Stats []struct {
		Memory struct {
			WorkingSetBytes criValue `json:"workingSetBytes"`
		} `json:"memory"`
		WritableLayer criFsUsage `json:"writableLayer"`
	} `json:"stats"`
}

// importTestImage builds the two-layer busybox image, imports it into the
// k8s.io namespace unpacked into the loop snapshotter, checks that CRI lists
// it, and returns the path of the busybox binary it contains.
func (n *criNode) importTestImage() string {
	t := n.t
	t.Helper()
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(n.dir, "image.tar")
	criBusyboxImage(t, archive, criImageRef, busybox)
	n.ctr("image", "import", "--snapshotter", n.snapshotter, archive)
	var images struct {
		Images []criImage `json:"images"`
	}
	n.crictlJSON(&images, "images")
	if !criHasTag(images.Images, criImageRef) {
		t.Fatalf("crictl images does not list %s: %+v", criImageRef, images.Images)
	}
	return busybox
}

// criPodConfig writes a host-network pod sandbox config for crictl runp.
func criPodConfig(t *testing.T, dir, name string, annotations map[string]string) string {
	t.Helper()
	return criWriteJSON(t, dir, name+"-pod.json", map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "default", "uid": name + "-" + strconv.Itoa(os.Getpid()), "attempt": 0},
		"annotations":   annotations,
		"log_directory": filepath.Join(dir, "logs", name),
		"linux": map[string]any{
			// NamespaceMode NODE = 2: host network, so no CNI is needed.
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}},
		},
	})
}

// criPluginLine returns the line of `ctr plugins ls` that lists the loop
// proxy snapshotter with status ok, or "".
func criPluginLine(out string) string {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "io.containerd.snapshotter.v1" && f[1] == "loop" && f[len(f)-1] == "ok" {
			return line
		}
	}
	return ""
}

// criImage is one entry of `crictl images -o json`.
type criImage struct {
	ID       string   `json:"id"`
	RepoTags []string `json:"repoTags"`
}

func criHasTag(images []criImage, ref string) bool {
	for _, im := range images {
		for _, tag := range im.RepoTags {
			if tag == ref {
				return true
			}
		}
	}
	return false
}

func criWriteJSON(t *testing.T, dir, name string, v any) string {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// criDfSize parses the size column (KiB) of `df -k /`.
func criDfSize(t *testing.T, out string) uint64 {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	fields := strings.Fields(lines[len(lines)-1])
	if len(fields) < 2 {
		t.Fatalf("cannot parse df output:\n%s", out)
	}
	v, err := strconv.ParseUint(fields[1], 10, 64)
	if err != nil {
		t.Fatalf("cannot parse df output: %v\n%s", err, out)
	}
	return v
}

// criWaitFor polls cond until it holds or a generous bound passes (the
// bound guards against hangs; it is not a performance assertion).
func criWaitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		ok, state := cond()
		if ok {
			t.Logf("%s: %s", what, state)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached; last state: %s", what, state)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
