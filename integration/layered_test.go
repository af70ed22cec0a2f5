//go:build integration

package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/internal/ociimage"
	"github.com/loopkit/loopkit/internal/testutil"
)

const layeredImageRef = "loopkit.test/layered-busybox:v1"

// layeredTestImage writes an OCI archive with five layers built from the
// host's static busybox: the binary and its applets; /etc with a hard-link
// pair and a directory /opq; a 1 MiB data file; a layer that deletes a
// file of the second (whiteout) and makes /opq opaque with one new entry;
// and a layer that modifies a file of the second.
func layeredTestImage(t *testing.T, path, ref string) {
	t.Helper()
	bbPath, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal(err)
	}
	bb, err := os.ReadFile(bbPath)
	if err != nil {
		t.Fatal(err)
	}
	base := busyboxEntries(bb, []string{"sh", "sleep", "dd", "df", "sync", "cat", "ls", "stat", "rm", "echo", "test", "touch",
		"head", "wc", "find", "sort", "md5sum", "xargs", "mkdir", "mount"}, "tmp/", "proc/", "sys/", "dev/", "run/")
	etc := []ociimage.Entry{
		{Name: "etc/", Mode: 0o755, Dir: true},
		{Name: "etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/:/bin/sh\n")},
		{Name: "etc/group", Mode: 0o644, Data: []byte("root:x:0:\n")},
		{Name: "etc/layer2", Mode: 0o644, Data: []byte("layer 2\n")},
		{Name: "etc/hl1", Mode: 0o644, Data: []byte("linked\n")},
		{Name: "etc/hl2", Mode: 0o644, Link: "etc/hl1", Hard: true},
		{Name: "etc/motd", Mode: 0o600, Data: []byte("first\n")},
		{Name: "opq/", Mode: 0o755, Dir: true},
		{Name: "opq/old1", Mode: 0o644, Data: []byte("old\n")},
		{Name: "opq/sub/", Mode: 0o755, Dir: true},
		{Name: "opq/sub/old2", Mode: 0o644, Data: []byte("old\n")},
	}
	data := []ociimage.Entry{
		{Name: "data/", Mode: 0o755, Dir: true},
		{Name: "data/blob", Mode: 0o644, Data: bytes.Repeat([]byte("loopkit\n"), 128<<10)},
	}
	top := []ociimage.Entry{
		{Name: "etc/", Mode: 0o755, Dir: true},
		{Name: "etc/.wh.layer2", Mode: 0o644},
		{Name: "etc/layer4", Mode: 0o644, Data: []byte("layer 4\n")},
		{Name: "opq/", Mode: 0o755, Dir: true},
		{Name: "opq/.wh..wh..opq", Mode: 0o644},
		{Name: "opq/new", Mode: 0o644, Data: []byte("new\n")},
	}
	last := []ociimage.Entry{
		{Name: "etc/", Mode: 0o755, Dir: true},
		{Name: "etc/motd", Mode: 0o644, Data: []byte("second\n")},
	}
	ctdWriteImage(t, path, ref, []ociimage.Blob{criTarLayer(t, base), criTarLayer(t, etc), criTarLayer(t, data),
		criTarLayer(t, top), criTarLayer(t, last)}, []string{"/bin/sleep", "1000000"})
}

// layeredTreeScript lists every entry of the container's root filesystem:
// type and mode, owner, mtime; for all but directories also link count and
// size (a directory's are its filesystem's business); content hashes of
// files. The root directory is left out: its mtime is its own upper's.
const layeredTreeScript = `find / -xdev | sort | while read f; do test "$f" = / && continue; ` +
	`if test -d "$f" -a ! -L "$f"; then stat -c '%n %f %u:%g %Y' "$f"; else stat -c '%n %f %u:%g %Y %h %s' "$f"; fi; done; ` +
	`find / -xdev -type f | sort | xargs md5sum`

// ctdLiveWriter starts container id of ref writing a counter to /count
// every 50 ms and returns a check that the counter moved since the last
// call (the first call only reads it).
func ctdLiveWriter(t *testing.T, e *ctdEnv, ref, id string) func(what string) {
	t.Helper()
	e.ctr(e.runArgs("-d", ref, id, "sh", "-c",
		"i=0; while true; do i=$((i+1)); echo $i > /count; sync; sleep 0.05; done")...)
	last := -1
	return func(what string) {
		t.Helper()
		time.Sleep(300 * time.Millisecond)
		var s string
		// `echo $i > /count` truncates before it writes: a read in between
		// sees an empty file, so an empty read is tried again.
		for try := 0; try < 20; try++ {
			s = strings.TrimSpace(e.ctr("task", "exec", "--exec-id", "c"+strconv.FormatInt(time.Now().UnixNano(), 36), id, "cat", "/count"))
			if s != "" {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("read /count: %q", s)
		}
		if n <= last {
			t.Fatalf("%s: container stopped writing (%d -> %d)", what, last, n)
		}
		last = n
	}
}

// layeredImageTree drops the lines of the runtime's own mounts over the
// image's /dev, /proc, /sys and /run: their times are the container's
// start, not the image's.
func layeredImageTree(list string) string {
	var keep []string
	for _, l := range strings.Split(list, "\n") {
		if f := strings.Fields(l); len(f) > 0 && slices.Contains([]string{"/dev", "/proc", "/sys", "/run"}, f[0]) {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}

// TestContainerdLayered is issue 8's end-to-end path on a private
// containerd, 1.6 and 2.x, in layered mode: import a multi-layer image with a
// whiteout, an opaque directory and hard links; run it on an overlay of
// erofs layers; list the same tree as containerd's overlayfs snapshotter;
// df shows the size label and writing past it is ENOSPC; a running
// container survives a snapshotter restart and SIGKILL; diff and
// `ctr snapshots commit` of a running container work; removing everything
// and GC leave no mount, device or file.
func TestContainerdLayered(t *testing.T) {
	for _, d := range ctdDaemons(t) {
		t.Run(d.name, func(t *testing.T) { ctdLayered(t, d) })
	}
}

func ctdLayered(t *testing.T, d ctdDaemon) {
	testutil.RequireBinaries(t, "mkfs.erofs", "fsck.erofs")
	e := ctdStart(t, d, "layered", "default_size = \"128MiB\"\n")
	archive := filepath.Join(e.dir, "layered.tar")
	layeredTestImage(t, archive, layeredImageRef)
	e.ctr("image", "import", "--snapshotter", "loop", archive)

	out := e.ctr(e.runArgs("--rm", layeredImageRef, "content", "sh", "-c",
		"cat /etc/layer4 /etc/motd; test -e /etc/layer2 && echo layer2-present; ls /opq; stat -c 'links=%h' /etc/hl2; grep ' / ' /proc/mounts")...)
	for _, want := range []string{"layer 4", "second", "new", "links=2", " / overlay "} {
		if !strings.Contains(out, want) {
			t.Errorf("container output lacks %q:\n%s", want, out)
		}
	}
	for _, bad := range []string{"layer2-present", "old1", "sub"} {
		if strings.Contains(out, bad) {
			t.Errorf("container output has %q (whiteout or opaque directory lost):\n%s", bad, out)
		}
	}

	// The same tree as containerd's own overlayfs snapshotter.
	loopTree := e.ctr(e.runArgs("--rm", layeredImageRef, "tree-loop", "sh", "-c", layeredTreeScript)...)
	ovlTree := e.ctr("run", "--snapshotter", "overlayfs", "--runc-root", e.runcRoot, "--rm", layeredImageRef, "tree-ovl", "sh", "-c", layeredTreeScript)
	loopTree, ovlTree = layeredImageTree(loopTree), layeredImageTree(ovlTree)
	if loopTree != ovlTree || strings.Count(loopTree, "\n") < 30 {
		t.Errorf("layered tree differs from overlayfs's:\n--- overlayfs\n%s\n--- loop\n%s", ovlTree, loopTree)
	}
	e.ctr("image", "rm", "--sync", layeredImageRef)
	e.ctr("image", "import", "--snapshotter", "loop", archive)

	// df shows the label; without it, default_size; past it, ENOSPC.
	label := "containerd.io/snapshot/max-size=268435456"
	if got := ctdDfSize(t, e.ctr(e.runArgs("--rm", "--snapshotter-label", label, layeredImageRef, "df-label", "df", "-B1", "/")...)); got > 256<<20 || got < 220<<20 {
		t.Errorf("df with max-size 256 MiB: %d bytes", got)
	}
	if got := ctdDfSize(t, e.ctr(e.runArgs("--rm", layeredImageRef, "df-default", "df", "-B1", "/")...)); got > 128<<20 || got < 100<<20 {
		t.Errorf("df with default_size 128 MiB: %d bytes", got)
	}
	out = e.ctr(e.runArgs("--rm", "--snapshotter-label", label, layeredImageRef, "enospc", "sh", "-c",
		"dd if=/dev/zero of=/fill bs=1M count=300 2>&1; echo rc=$?")...)
	if !strings.Contains(out, "No space left on device") || strings.Contains(out, "rc=0") {
		t.Errorf("writing 300 MiB into 256 MiB:\n%s", out)
	}

	// A running container keeps writing across a restart and a SIGKILL.
	progress := ctdLiveWriter(t, e, layeredImageRef, "live")
	progress("started")
	if err := e.snap.stop(); err != nil {
		t.Fatal(err)
	}
	progress("snapshotter stopped")
	e.restartSnapshotter()
	e.snap.kill()
	progress("snapshotter killed")
	e.restartSnapshotter()
	ctdWaitSnapshotter(t, e)
	progress("snapshotter restarted")
	st := e.status()
	var active int
	for _, s := range st.Snapshots {
		if s.Kind == "Active" && s.SizeLimit == 128<<20 {
			active++
		}
	}
	if active != 1 || len(st.Orphans) != 0 {
		t.Errorf("status after restarts: %d active snapshots with a 128 MiB upper (want 1), orphans %v", active, st.Orphans)
	}

	// Diff of a running container works in layered mode: containerd's
	// read-only view moves the upperdir into the lowerdirs.
	if names := ctdTarNames(t, e.ctr("snapshots", "--snapshotter", "loop", "diff", "live")); !slices.Contains(names, "count") {
		t.Errorf("diff of the running container lacks /count: %v", names)
	}
	// Commit of the running container's snapshot: one point in time, the
	// container keeps writing.
	e.ctr("snapshots", "--snapshotter", "loop", "commit", "live-snap", "live")
	progress("after ctr snapshots commit")
	e.ctr("snapshots", "--snapshotter", "loop", "view", "live-view", "live-snap")
	mnt := filepath.Join(e.dir, "live-view")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	mcmd := strings.TrimSpace(e.ctr("snapshots", "--snapshotter", "loop", "mounts", mnt, "live-view"))
	if out, err := exec.Command("sh", "-c", mcmd).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", mcmd, err, out)
	}
	b, err := os.ReadFile(filepath.Join(mnt, "count"))
	if uerr := exec.Command("umount", mnt).Run(); uerr != nil {
		t.Errorf("umount %s: %v", mnt, uerr)
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(string(b))); err != nil || n <= 0 {
		t.Errorf("committed /count: %q %v", b, err)
	}
	e.ctr("snapshots", "--snapshotter", "loop", "rm", "live-view")
	e.ctr("snapshots", "--snapshotter", "loop", "rm", "live-snap")

	e.ctr("task", "kill", "-s", "SIGKILL", "live")
	ctdWaitStopped(t, e, "live")
	e.ctr("task", "delete", "live")
	e.ctr("container", "rm", "live")

	// Reboot: a created container's upper and layers are unmounted and
	// detached while the snapshotter is down; the task still starts.
	e.ctr("container", "create", "--snapshotter", "loop", layeredImageRef, "reboot", "cat", "/etc/layer4")
	if err := e.snap.stop(); err != nil {
		t.Fatal(err)
	}
	criUnmountUnder(t, e.snapRoot)
	snapDetachAll(t, e.snapRoot)
	e.restartSnapshotter()
	ctdWaitSnapshotter(t, e)
	if out := e.ctr("task", "start", "reboot"); !strings.Contains(out, "layer 4") {
		t.Errorf("task start after a reboot: %q", out)
	}
	e.ctr("container", "rm", "reboot")

	e.ctr("image", "rm", "--sync", layeredImageRef)
	if out := strings.TrimSpace(e.ctr("snapshots", "--snapshotter", "loop", "ls")); strings.Count(out, "\n") > 0 {
		t.Errorf("snapshots left after image removal and GC:\n%s", out)
	}
	if left := e.leftovers(); len(left) > 0 {
		t.Errorf("left behind after GC:\n  %s", strings.Join(left, "\n  "))
	}
}

// TestCRILayered is the Kubernetes node path in layered mode: a pod's
// container runs on an overlay whose upper is under the snapshotter root,
// df shows default_size, CRI's stats see the writes through Usage, the
// container survives a snapshotter restart, and removing the pod and the
// image leaves nothing.
func TestCRILayered(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "containerd", "containerd-shim-runc-v2", "runc", "ctr", "busybox", "mkfs.ext4", "mkfs.erofs", "go")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	n := criStartNodeMode(t, dir, criImageRef, "layered", nil)
	busybox := n.importTestImage()
	podCfg := criPodConfig(t, dir, "loopkit-cri-layered", nil)
	ctrCfg := criWriteJSON(t, dir, "container.json", map[string]any{
		"metadata": map[string]any{"name": "writer"},
		"image":    map[string]any{"image": criImageRef},
		"command":  []string{"/bin/sh", "-c", "dd if=/dev/zero of=/fill bs=1048576 count=16 && sync && touch /done && exec sleep 1000000"},
		"log_path": "writer.log",
		"linux":    map[string]any{},
	})
	podID := strings.TrimSpace(n.crictlRun("runp", podCfg))
	cid := strings.TrimSpace(n.crictlRun("create", podID, ctrCfg, podCfg))
	n.crictlRun("start", cid)

	var insp struct {
		Info struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	n.crictlJSON(&insp, "inspect", cid)
	mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", insp.Info.Pid))
	if err != nil {
		t.Fatal(err)
	}
	var root string
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == "/" {
			root = line
		}
	}
	if !strings.Contains(root, " - overlay ") || !strings.Contains(root, "upperdir="+n.snapRoot+"/u/") {
		t.Errorf("container root is not an overlay with its upper under the snapshotter root:\n%s", root)
	}
	df := n.crictlRun("exec", "--sync", cid, "df", "-k", "/")
	if kib := criDfSize(t, df); kib < 200*1024 || kib > 256*1024 {
		t.Errorf("df / in the container reports %d KiB, want about 256 MiB (default_size):\n%s", kib, df)
	}
	criWaitFor(t, "the container's 16 MiB write", func() (bool, string) {
		out, err := criTry(30*time.Second, n.crictlArgs("exec", "--sync", cid, "ls", "/done")...)
		return err == nil, strings.TrimSpace(fmt.Sprint(out, " ", err))
	})
	criCheckStats(t, n, cid, busybox)

	n.stopSnapshotter()
	n.startSnapshotter()
	if out := n.crictlRun("exec", "--sync", cid, "sh", "-c", "echo after > /after && cat /after"); !strings.Contains(out, "after") {
		t.Errorf("container after a snapshotter restart: %q", out)
	}
	var status struct {
		Mode    string `json:"mode"`
		Orphans []any  `json:"orphans"`
	}
	if err := json.Unmarshal([]byte(criRun(t, time.Minute, n.snapBin, "status", "--json", "--config", n.snapCfg, "--address", n.snapSock)), &status); err != nil {
		t.Fatal(err)
	}
	if status.Mode != "layered" || len(status.Orphans) != 0 {
		t.Errorf("status after restart: %+v", status)
	}

	n.crictlRun("stop", cid)
	n.crictlRun("rm", cid)
	n.crictlRun("stopp", podID)
	n.crictlRun("rmp", podID)
	n.crictlRun("rmi", criImageRef)
	criWaitFor(t, "no snapshots left in the loop snapshotter", func() (bool, string) {
		out := strings.TrimSpace(n.ctr("snapshots", "--snapshotter", n.snapshotter, "ls"))
		return len(strings.Split(out, "\n")) <= 1, out
	})
	criWaitFor(t, "no layer or upper files left under the snapshotter root", func() (bool, string) {
		files := criFilesUnder(t, n.snapRoot, "u", "layers", "staging", "trash")
		return len(files) == 0, strings.Join(files, " ")
	})
	n.stopContainerd()
	n.stopSnapshotter()
	if left := n.leftovers(); len(left) > 0 {
		t.Errorf("left behind after removing pod and image and stopping the daemons:\n  %s", strings.Join(left, "\n  "))
	}
}
