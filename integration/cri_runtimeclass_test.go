//go:build integration

package integration

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestCRIRuntimeClassSnapshotter is docs/kubernetes.md's RuntimeClass setup
// on containerd 2.x: CRI's default snapshotter stays overlayfs and the
// runtime handler runc-loop names snapshotter loop. A pod run with
// --runtime runc-loop (what a RuntimeClass with handler runc-loop makes
// kubelet send) gets a loop-backed root; a pod of the default handler, from
// the same image, gets an overlayfs root.
func TestCRIRuntimeClassSnapshotter(t *testing.T) {
	forEachModeOf(t, 2, func(t *testing.T, d ctdDaemon, mode string) {
		n := criModeNode(t, d, mode, criNodeOptions{tweak: func(cfg map[string]any) {
			images := criTable(t, cfg, "plugins", "io.containerd.cri.v1.images")
			images["snapshotter"] = "overlayfs"
			rts := criTable(t, cfg, "plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes")
			loop := criTable(t, rts, "runc-loop")
			loop["runtime_type"] = "io.containerd.runc.v2"
			loop["snapshotter"] = "loop"
			criTable(t, loop, "options")["Root"] = criTable(t, rts, "runc", "options")["Root"]
			criTable(t, loop, "options")["SystemdCgroup"] = false
		}})
		// The image unpacked into both snapshotters.
		n.importTestImage()
		n.ctr("image", "import", "--snapshotter", "overlayfs", n.dir+"/image.tar")

		loopPod := n.runPod("rc-loop", "runc-loop", "/bin/sleep", "1000000")
		criCheckLoopRoot(t, n, "runc-loop container", loopPod.ctrPid)
		defPod := n.runPod("rc-default", "", "/bin/sleep", "1000000")
		if fstype, opts := criRootMount(t, defPod.ctrPid); fstype != "overlay" || strings.Contains(opts, n.snapRoot) {
			t.Errorf("default-handler container: / is %s (%s), want containerd's overlayfs, not loop's", fstype, opts)
		}
		n.removePod(loopPod)
		n.removePod(defPod)
		n.crictlRun("rmi", criImageRef)
		criWaitFor(t, "no snapshots left in the loop snapshotter", func() (bool, string) {
			out := strings.TrimSpace(n.ctr("snapshots", "--snapshotter", "loop", "ls"))
			return strings.Count(out, "\n") == 0, out
		})
		n.stopContainerd()
		n.stopSnapshotter()
		if left := n.leftovers(); len(left) > 0 {
			t.Errorf("left behind:\n  %s", strings.Join(left, "\n  "))
		}
	})
}

// criRootMount returns the filesystem type and super options of / as
// process pid sees it.
func criRootMount(t *testing.T, pid int) (fstype, options string) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 10 || fields[4] != "/" {
			continue
		}
		for i, fld := range fields {
			if fld == "-" && i+3 < len(fields) {
				return fields[i+1], fields[i+3]
			}
		}
	}
	t.Fatalf("pid %d: no / in mountinfo", pid)
	return "", ""
}
