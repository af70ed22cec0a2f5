//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/internal/testutil"
)

// nerdctlRel is where the tests expect nerdctl v2.3.5 (a static build, see
// ../shared/tools/README.md), relative to the repository root.
const nerdctlRel = "../shared/tools/nerdctl"

// nerdctlFind returns the absolute path of nerdctl, or ends the test (skip,
// or failure under `make test`) saying where it was expected.
func nerdctlFind(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join(criRepoRoot(t), nerdctlRel))
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode()&0o111 == 0 {
		testutil.Missing(t, "nerdctl", "expected at "+p+" ("+nerdctlRel+" from the repository root; nerdctl v2.3.5, see ../shared/tools/README.md)")
	}
	return p
}

// nerdctlEnv drives nerdctl against a ctdEnv's private containerd through
// its own NERDCTL_TOML: the env's namespace, a private data root, the
// cgroupfs manager (no systemd as pid 1 here), the loop snapshotter.
type nerdctlEnv struct {
	*ctdEnv
	bin  string
	toml string
}

func newNerdctl(t *testing.T, e *ctdEnv) *nerdctlEnv {
	t.Helper()
	n := &nerdctlEnv{ctdEnv: e, bin: nerdctlFind(t), toml: filepath.Join(e.dir, "etc", "nerdctl.toml")}
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	cfg := strings.Join([]string{
		"address = " + q(e.sock),
		"namespace = " + q(e.ns),
		"snapshotter = \"loop\"",
		"data_root = " + q(filepath.Join(e.dir, "nerdctl")),
		"cni_path = " + q(filepath.Join(e.dir, "cni", "bin")),
		"cni_netconfpath = " + q(filepath.Join(e.dir, "cni", "conf")),
		"cgroup_manager = \"cgroupfs\"",
	}, "\n") + "\n"
	if err := os.WriteFile(n.toml, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// First cleanup to run on failure: remove nerdctl's containers while
	// the daemons still run.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		out, _ := n.try("ps", "-aq")
		for _, id := range strings.Fields(out) {
			_, _ = n.try("rm", "-f", id)
		}
	})
	return n
}

func (n *nerdctlEnv) argv(args ...string) []string {
	return append([]string{"env", "NERDCTL_TOML=" + n.toml, n.bin}, args...)
}

// run runs nerdctl and returns stdout; it fails the test on error.
func (n *nerdctlEnv) run(args ...string) string {
	n.t.Helper()
	return criRun(n.t, 3*time.Minute, n.argv(args...)...)
}

func (n *nerdctlEnv) try(args ...string) (string, error) {
	return criTry(3*time.Minute, n.argv(args...)...)
}

// nerdctlRootfsCheck is the shell line a container runs to report its root
// filesystem: the first /proc/mounts line and df's size in bytes.
const nerdctlRootfsCheck = "head -1 /proc/mounts; cat /etc/layer4; df -B1 /"

// checkRootfs checks what nerdctlRootfsCheck printed: an ext4 on a loop
// device (flat) or an overlay (layered) whose size is about limit.
func (n *nerdctlEnv) checkRootfs(out string, limit int64) {
	n.t.Helper()
	first := strings.SplitN(out, "\n", 2)[0]
	switch n.mode {
	case "flat":
		if !strings.HasPrefix(first, "/dev/loop") || !strings.Contains(first, " / ext4 ") {
			n.t.Errorf("flat mode: container root is not an ext4 loop device: %q", first)
		}
	default:
		if !strings.Contains(first, " / overlay ") {
			n.t.Errorf("%s mode: container root is not an overlay: %q", n.mode, first)
		}
	}
	if got := ctdDfSize(n.t, out); got > limit || got < limit*3/4 {
		n.t.Errorf("df / shows %d bytes, want about %d (default_size):\n%s", got, limit, out)
	}
	if !strings.Contains(out, "layer 4") {
		n.t.Errorf("container does not see the image's top layer:\n%s", out)
	}
}

const nerdctlImage = "loopkit.test/nerdctl-busybox:v1"

// TestNerdctl is the nerdctl user's path on containerd 2.x in every mode:
// load of a locally built image, run --rm on the loop snapshotter with the
// size limit visible to df, commit of a running and of a stopped container
// (the committed image runs), then rm and rmi leave no snapshot, device,
// mount or file.
func TestNerdctl(t *testing.T) {
	forEachModeOf(t, 2, func(t *testing.T, d ctdDaemon, mode string) {
		e := ctdStart(t, d, mode, "default_size = \"128MiB\"\n")
		n := newNerdctl(t, e)
		bb := testutilBusybox(t)
		archive := filepath.Join(e.dir, "image.tar")
		ctdLayeredImage(t, archive, nerdctlImage, bb)
		// nerdctl 2.x loads through containerd's transfer service, which
		// unpacks only for the snapshotters in unpack_config.
		n.run("load", "-i", archive)
		n.checkRootfs(n.run("run", "--rm", "--snapshotter", "loop", "--net", "none", nerdctlImage, "sh", "-c", nerdctlRootfsCheck), 128<<20)

		n.run("run", "-d", "--name", "committer", "--snapshotter", "loop", "--net", "none", nerdctlImage,
			"sh", "-c", "echo committed > /committed && sync && exec sleep 1000000")
		criWaitFor(t, "the container's write", func() (bool, string) {
			out, err := n.try("exec", "committer", "cat", "/committed")
			return err == nil && strings.TrimSpace(out) == "committed", fmt.Sprint(out, err)
		})
		nerdctlCommit(t, n, "running", "committer")
		n.run("stop", "--time", "0", "committer")
		nerdctlCommit(t, n, "stopped", "committer")

		n.run("rm", "-f", "committer")
		for _, tag := range []string{"running", "stopped"} {
			_, _ = n.try("rmi", "loopkit.test/committed:"+tag)
		}
		n.run("rmi", nerdctlImage)
		// containerd 2.x's transfer import also records the archive's
		// index as "import@sha256:..."; nerdctl lists it untagged.
		if rest := strings.Fields(n.run("images", "-a", "-q")); len(rest) > 0 {
			t.Logf("images left after rmi %s: %v (%s)", nerdctlImage, rest, e.ctr("images", "ls", "-q"))
			n.run(append([]string{"rmi", "-f"}, rest...)...)
		}
		criWaitFor(t, "no snapshots left in the loop snapshotter", func() (bool, string) {
			out := strings.TrimSpace(e.ctr("snapshots", "--snapshotter", "loop", "ls"))
			return strings.Count(out, "\n") == 0, out + "\nimages:\n" + e.ctr("images", "ls") + "\nleases:\n" + e.ctr("leases", "ls")
		})
		if left := e.leftovers(); len(left) > 0 {
			t.Errorf("left behind after rm, rmi and GC:\n  %s", strings.Join(left, "\n  "))
		}
	})
}

// nerdctlCommit commits the container (state is "running" or "stopped")
// and runs the committed image, which must hold the container's write, in
// every mode. containerd's differ mounts the active snapshot read-only:
// layered mode's overlay it turns read-only by moving the upper into the
// lowers; flat mode's Mounts of a container whose ext4 is mounted (running,
// or stopped: `nerdctl stop` keeps the task and its root filesystem) is a
// bind of that mount, since the kernel refuses the block device a second,
// read-only mount.
func nerdctlCommit(t *testing.T, n *nerdctlEnv, state, container string) {
	t.Helper()
	ref := "loopkit.test/committed:" + state
	out, err := n.try("commit", container, ref)
	if err != nil {
		t.Errorf("commit of a %s container in %s mode: %v\n%s", state, n.mode, err, out)
		return
	}
	got := n.run("run", "--rm", "--snapshotter", "loop", "--net", "none", ref, "cat", "/committed")
	if strings.TrimSpace(got) != "committed" {
		t.Errorf("the image committed from a %s container in %s mode lacks /committed: %q", state, n.mode, got)
	}
}

// TestNerdctlContainerd16: nerdctl 2.x on containerd 1.6 runs an image that
// ctr imported into the loop snapshotter; `nerdctl load` is not possible
// there (nerdctl 2.x always loads through the transfer service's streaming
// API, which 1.6 lacks), and the error says so.
func TestNerdctlContainerd16(t *testing.T) {
	forEachModeOf(t, 1, func(t *testing.T, d ctdDaemon, mode string) {
		e := ctdStart(t, d, mode, "default_size = \"128MiB\"\n")
		n := newNerdctl(t, e)
		e.importImage(ctdImageRef)
		n.checkRootfs(n.run("run", "--rm", "--snapshotter", "loop", "--net", "none", ctdImageRef, "sh", "-c", nerdctlRootfsCheck), 128<<20)
		_, err := n.try("load", "-i", filepath.Join(e.dir, "image.tar"))
		// nerdctl 2.3.5 reports the unknown streaming service (at
		// times only "EOF", when 1.6 closes the stream first).
		if err == nil || !(strings.Contains(err.Error(), "containerd.services.streaming.v1.Streaming") || strings.Contains(err.Error(), "msg=EOF")) {
			t.Errorf("nerdctl load on containerd 1.6: %v; want the documented unknown-service error", err)
		}
		e.ctr("image", "rm", "--sync", ctdImageRef)
		if left := e.leftovers(); len(left) > 0 {
			t.Errorf("left behind:\n  %s", strings.Join(left, "\n  "))
		}
	})
}

// testutilBusybox returns the host's static busybox.
func testutilBusybox(t *testing.T) string {
	t.Helper()
	testutil.RequireBinaries(t, "busybox")
	p, _ := exec.LookPath("busybox")
	return p
}
