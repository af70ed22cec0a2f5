package loopdev

// Test helpers: fixtures, independent oracles (sysfs and raw ioctls, never
// the package under test), external actors and the kernel log watcher.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/testutil"
)

// TestMain forces the legacy LOOP_SET_FD path for the whole process when
// LOOPKIT_TEST_FORCE_LEGACY=1: the suite runs twice (R7).
func TestMain(m *testing.M) {
	if os.Getenv("LOOPKIT_TEST_FORCE_LEGACY") == "1" {
		configureBroken.Store(true)
	}
	os.Exit(m.Run())
}

func forcedLegacy() bool { return os.Getenv("LOOPKIT_TEST_FORCE_LEGACY") == "1" }

func scaled() bool { return os.Getenv("LOOPKIT_TEST_SCALE") == "1" }

// rootDir gives a fresh directory on a real filesystem (t.TempDir lives
// under TMPDIR; a tmpfs there would defeat direct I/O), registered with
// NoLeaks so any loop device or mount left under it fails the test.
func rootDir(t *testing.T) string {
	t.Helper()
	testutil.RequireRoot(t)
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	return dir
}

// bg is the context of teardowns in cleanups, where t.Context() is
// already cancelled; go test's -timeout bounds them.
var bg = context.Background()

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// newImage creates a sparse file of size bytes.
func newImage(t testing.TB, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

// attachT attaches and registers a cleanup that detaches the attachment if
// it is still the one we made.
func attachT(t testing.TB, path string, o Options) *Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d, err := Attach(ctx, path, o)
	if err != nil {
		t.Fatalf("attach %s: %v", path, err)
	}
	cleanupDevice(t, d)
	return d
}

// detachWait detaches d and, when another opener (udev, a losetup of
// another user that probed the free number) defers the unbind, waits for
// the kernel to finish it: what the test started is then really gone.
func detachWait(d *Device) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return d.DetachWith(ctx, DetachOptions{Wait: true})
}

// cleanupDevice detaches d at cleanup unless the test already did; it never
// touches a binding that is no longer ours. A deferred unbind (ours or the
// test's) is waited for, so that NoLeaks sees the end state.
func cleanupDevice(t testing.TB, d *Device) {
	t.Helper()
	rec := d.Record()
	created := d.Created()
	t.Cleanup(func() {
		if !created || !stillOurs(rec) {
			_ = d.Close()
			return
		}
		err := detachWait(d)
		if errors.Is(err, os.ErrClosed) {
			// The test detached it; the unbind may still be on its way.
			err = nil
			for deadline := time.Now().Add(30 * time.Second); stillOurs(rec) && time.Now().Before(deadline); {
				time.Sleep(10 * time.Millisecond)
			}
		}
		if err != nil || stillOurs(rec) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err2 := DetachRecord(ctx, rec, DetachOptions{Wait: true}); err2 != nil && !errors.Is(err2, ErrGone) {
				t.Logf("cleanup of %s: %v, then %v", rec.Path, err, err2)
			}
		}
	})
}

// stillOurs checks through sysfs alone that rec's attachment still exists.
func stillOurs(rec Record) bool {
	nr, ok := loopNr(rec.Path)
	if !ok {
		return false
	}
	if _, bound := sysBacking(nr); !bound {
		return false
	}
	if rec.DiskSeq != 0 {
		return sysDiskseq(nr) == rec.DiskSeq
	}
	return true
}

var loopNameRE = regexp.MustCompile(`^/dev/loop([0-9]+)$`)

func loopNr(path string) (int, bool) {
	m := loopNameRE.FindStringSubmatch(path)
	if m == nil {
		return -1, false
	}
	n, err := strconv.Atoi(m[1])
	return n, err == nil
}

func sysRead(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(b), "\n")
}

// sysAttr reads /sys/block/loopN/<attr>.
func sysAttr(nr int, attr string) string {
	return sysRead(fmt.Sprintf("/sys/block/loop%d/%s", nr, attr))
}

// sysBacking returns the kernel's backing_file of loopN and whether it is bound.
func sysBacking(nr int) (string, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", nr))
	if err != nil {
		return "", false
	}
	return strings.TrimSuffix(string(b), "\n"), true
}

func sysDiskseq(nr int) uint64 {
	v, _ := strconv.ParseUint(sysAttr(nr, "diskseq"), 10, 64)
	return v
}

// bindingsOf lists the loop devices whose backing file is path (sysfs).
func bindingsOf(path string) []string {
	abs, _ := filepath.Abs(path)
	var out []string
	entries, _ := filepath.Glob("/sys/block/loop*")
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(e, "loop", "backing_file"))
		if err != nil {
			continue
		}
		s := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), " (deleted)")
		if s == abs {
			out = append(out, "/dev/"+filepath.Base(e))
		}
	}
	sort.Strings(out)
	return out
}

// waitNoBindings polls (bounded) until path has no loop binding; the kernel
// may defer an unbind to the last close of a udev worker.
func waitNoBindings(t testing.TB, path string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		b := bindingsOf(path)
		if len(b) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still bound to %v", path, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sysPartitions lists loopNp* of loopN with their partition numbers.
func sysPartitions(nr int) map[int]string {
	out := map[int]string{}
	name := fmt.Sprintf("loop%d", nr)
	ps, _ := filepath.Glob(filepath.Join("/sys/block", name, name+"p*"))
	for _, p := range ps {
		n, err := strconv.Atoi(sysRead(filepath.Join(p, "partition")))
		if err == nil {
			out[n] = filepath.Base(p)
		}
	}
	return out
}

// rawStatus reads LOOP_GET_STATUS64 of a node through a private fd.
func rawStatus(path string) (*unix.LoopInfo64, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return unix.IoctlLoopGetStatus64(fd)
}

func blkSSZ(t testing.TB, f *os.File) uint32 {
	t.Helper()
	v, err := unix.IoctlGetUint32(int(f.Fd()), unix.BLKSSZGET)
	if err != nil {
		t.Fatalf("BLKSSZGET: %v", err)
	}
	return v
}

func blkSize64(t testing.TB, f *os.File) uint64 {
	t.Helper()
	v, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		t.Fatalf("BLKGETSIZE64: %v", err)
	}
	return v
}

// tenant is an external user that binds a loop device with raw ioctls, as
// another program would, without any of the package's locks.
type tenant struct {
	dev     *os.File
	backing *os.File
	nr      int
}

func bindTenant(nr int, backing string) (*tenant, error) {
	b, err := os.OpenFile(backing, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	dev, err := os.OpenFile(fmt.Sprintf("/dev/loop%d", nr), os.O_RDWR, 0)
	if err != nil {
		b.Close()
		return nil, err
	}
	if err := unix.IoctlSetInt(int(dev.Fd()), unix.LOOP_SET_FD, int(b.Fd())); err != nil {
		dev.Close()
		b.Close()
		return nil, fmt.Errorf("LOOP_SET_FD loop%d: %w", nr, err)
	}
	return &tenant{dev: dev, backing: b, nr: nr}, nil
}

// intact reports whether loopN is still bound to the tenant's file.
func (tn *tenant) intact() error {
	info, err := unix.IoctlLoopGetStatus64(int(tn.dev.Fd()))
	if err != nil {
		return fmt.Errorf("tenant loop%d: %w", tn.nr, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(tn.backing.Fd()), &st); err != nil {
		return err
	}
	if info.Inode != st.Ino || info.Device != uint64(st.Dev) { //nolint:unconvert
		return fmt.Errorf("tenant loop%d now bound to dev %d ino %d, want %d/%d", tn.nr, info.Device, info.Inode, st.Dev, st.Ino)
	}
	return nil
}

func (tn *tenant) release() {
	_ = unix.IoctlSetInt(int(tn.dev.Fd()), unix.LOOP_CLR_FD, 0)
	tn.dev.Close()
	name := tn.backing.Name()
	tn.backing.Close()
	// Another opener (udev, a probing losetup) makes the clear lazy: wait
	// for the unbind, bounded, so the leak check sees it done.
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if b, bound := sysBacking(tn.nr); !bound || b != name {
			return
		}
	}
}

// holder is an external process holding a flock until killed.
type holder struct{ cmd *exec.Cmd }

// holdFlock starts `flock <mode> path` running a shell that reports on
// its stdout once the lock is held, and waits for that report. A failing
// `flock -n` probe is no proof: udev's brief LOCK_SH fails it too.
func holdFlock(t testing.TB, path string, exclusive bool) *holder {
	t.Helper()
	mode := "-s"
	if exclusive {
		mode = "-x"
	}
	cmd := exec.Command("flock", mode, path, "sh", "-c", "echo locked; exec sleep 600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &holder{cmd: cmd}
	t.Cleanup(h.stop)
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && line != "locked\n" {
			err = fmt.Errorf("holder said %q", line)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("flock holder on %s: %v", path, err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("flock holder on %s never took the lock", path)
	}
	return h
}

func (h *holder) stop() {
	if h.cmd.Process == nil || h.cmd.ProcessState != nil {
		return
	}
	_ = syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
	_ = h.cmd.Wait()
}

// externalFlockFails runs `flock -n` (exclusive or shared) from another
// process and reports whether it could not take the lock.
func externalFlockFails(path string, exclusive bool) bool {
	mode := "-s"
	if exclusive {
		mode = "-x"
	}
	err := exec.Command("flock", "-n", mode, path, "true").Run()
	return err != nil
}

// externalFlockFree says whether another process gets the lock within a few
// seconds. udevd's probe of a new device holds LOCK_SH for a moment, so a
// single non-blocking try can fail on a device nobody in this test locks;
// a lock this test still holds never goes away and fails the wait.
func externalFlockFree(path string, exclusive bool) bool {
	mode := "-s"
	if exclusive {
		mode = "-x"
	}
	return exec.Command("flock", "-w", "5", mode, path, "true").Run() == nil
}

// kmsgWatch collects kernel log lines written after it was created. It
// uses a raw non-blocking fd: an *os.File would park Read in the poller.
type kmsgWatch struct{ fd int }

func watchKmsg(t testing.TB) *kmsgWatch {
	t.Helper()
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Logf("kernel log not readable: %v", err)
		return &kmsgWatch{fd: -1}
	}
	if _, err := unix.Seek(fd, 0, io.SeekEnd); err != nil {
		t.Logf("seek /dev/kmsg: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return &kmsgWatch{fd: fd}
}

var kmsgDevRE = regexp.MustCompile(`loop[0-9]+(p[0-9]+)?`)

// ioErrors returns new "I/O error" lines for loop devices; when devs is not
// empty only lines naming one of them count.
func (w *kmsgWatch) ioErrors(devs map[string]bool) []string {
	if w.fd < 0 {
		return nil
	}
	var out []string
	buf := make([]byte, 8192)
	for {
		n, err := unix.Read(w.fd, buf)
		if err == unix.EPIPE || err == unix.EINTR { // overwritten records: keep reading
			continue
		}
		if err != nil || n <= 0 {
			break
		}
		rec := string(buf[:n])
		msg := rec
		if i := strings.IndexByte(rec, ';'); i >= 0 {
			msg = rec[i+1:]
		}
		msg = strings.SplitN(msg, "\n", 2)[0]
		if !strings.Contains(msg, "I/O error") {
			continue
		}
		names := kmsgDevRE.FindAllString(msg, -1)
		if len(names) == 0 {
			continue
		}
		if len(devs) == 0 {
			out = append(out, msg)
			continue
		}
		for _, nm := range names {
			if devs[nm] {
				out = append(out, msg)
				break
			}
		}
	}
	return out
}

// kernelHasPartitionParser reports whether the kernel can parse GPT itself
// (CONFIG_EFI_PARTITION); without it partitions only exist through BLKPG.
func kernelHasPartitionParser() bool {
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return true
	}
	defer f.Close()
	out, err := exec.Command("sh", "-c", "zcat /proc/config.gz | grep -q '^CONFIG_EFI_PARTITION=y'").CombinedOutput()
	_ = out
	return err == nil
}

// udevRunning reports whether a systemd-udevd process exists.
func udevRunning() []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm := sysRead(filepath.Join("/proc", e.Name(), "comm"))
		if comm == "systemd-udevd" || comm == "udevd" {
			pids = append(pids, pid)
		}
	}
	return pids
}

// requireUdevIfAsked honours LOOPKIT_TEST_UDEV=1: udevd must run for this
// test; if nobody started it, start it and stop it (by pid) at cleanup. It
// reports whether other openers may hold our devices for a moment, making a
// detach lazy: udevd's probes, or (LOOPKIT_TEST_LOOP_CHURN=1, set by
// scripts/with-losetup-churn.sh) another loop user whose losetup opened a
// number it got from LOOP_CTL_GET_FREE just before we bound it.
func requireUdevIfAsked(t *testing.T) bool {
	t.Helper()
	churn := os.Getenv("LOOPKIT_TEST_LOOP_CHURN") == "1"
	if os.Getenv("LOOPKIT_TEST_UDEV") != "1" {
		return churn || len(udevRunning()) > 0
	}
	if len(udevRunning()) > 0 {
		return true
	}
	before := map[int]bool{}
	for _, p := range udevRunning() {
		before[p] = true
	}
	if err := exec.Command("/lib/systemd/systemd-udevd", "--daemon").Run(); err != nil {
		t.Fatalf("LOOPKIT_TEST_UDEV=1 but udevd is not running and cannot be started: %v", err)
	}
	var started []int
	deadline := time.Now().Add(5 * time.Second)
	for len(started) == 0 && time.Now().Before(deadline) {
		for _, p := range udevRunning() {
			if !before[p] {
				started = append(started, p)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(started) == 0 {
		t.Fatal("LOOPKIT_TEST_UDEV=1 but udevd did not start")
	}
	t.Cleanup(func() {
		_ = exec.Command("udevadm", "settle", "-t", "10").Run()
		for _, p := range started {
			_ = syscall.Kill(p, syscall.SIGTERM)
		}
	})
	return true
}

// settleUdev waits (bounded) for udev's queue when udevd runs.
func settleUdev() {
	if len(udevRunning()) > 0 {
		_ = exec.Command("udevadm", "settle", "-t", "10").Run()
	}
}

// runCmd runs a command and fails the test with its output on error.
func runCmd(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// mountT mounts and registers an unmount at cleanup.
func mountT(t testing.TB, src, dst, fstype string, flags uintptr, data string) {
	t.Helper()
	if err := unix.Mount(src, dst, fstype, flags, data); err != nil {
		t.Fatalf("mount %s on %s: %v", src, dst, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dst, unix.MNT_DETACH) })
}

func execOutput(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

// TestKmsgWatcher checks the kernel-log oracle itself: a line written to
// /dev/kmsg after the watch starts is seen, and filtered by device name.
func TestKmsgWatcher(t *testing.T) {
	testutil.RequireRoot(t)
	w := watchKmsg(t)
	if w.fd < 0 {
		t.Skip("no /dev/kmsg")
	}
	if err := os.WriteFile("/dev/kmsg", []byte("loopkit-test: I/O error, dev loop99999, sector 0 op 0x0:(READ)\n"), 0); err != nil {
		t.Skipf("write /dev/kmsg: %v", err)
	}
	got := w.ioErrors(map[string]bool{"loop99999": true, "loop99998": true})
	if len(got) != 1 {
		t.Fatalf("watcher saw %q", got)
	}
	if got := w.ioErrors(nil); len(got) != 0 {
		t.Fatalf("old lines seen again: %q", got)
	}
}

// enterPrivateMountNS moves the calling goroutine onto a thread of its own
// in a private mount namespace. Mounts made there are invisible to the host
// namespace, so a namespace another program creates meanwhile (a container,
// unshare -m) cannot copy them and keep our partitions busy after we
// unmount. The thread is never unlocked: it exits with the goroutine, and
// its namespace, with any mount left in it, goes with it.
func enterPrivateMountNS() error {
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare mount namespace: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	return nil
}

func privateMountNS(t testing.TB) {
	t.Helper()
	if err := enterPrivateMountNS(); err != nil {
		t.Fatal(err)
	}
}
