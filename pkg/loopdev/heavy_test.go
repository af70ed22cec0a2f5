package loopdev

// R19: systemd's heavy-duty loop test (test-loop-util), ported, then scaled.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

type sfPart struct {
	Start uint64 `json:"start"`
	Size  uint64 `json:"size"`
	Type  string `json:"type"`
	Name  string `json:"name"`
}

// heavyImage is the fixture: a sparse 256 MiB file with a GPT of five 32 MiB
// partitions written by sfdisk; a file-level probe must see the four that
// matter.
func heavyImage(t testing.TB, dir string) (string, []sfPart) {
	t.Helper()
	testutilBins(t, "sfdisk", "partx", "blkid", "mkfs.vfat", "mkfs.ext4")
	img := newImage(t, dir, "heavy.img", 256<<20)
	var script strings.Builder
	script.WriteString("label: gpt\n")
	for _, p := range fivePartitions {
		fmt.Fprintf(&script, "size=32MiB, type=%s, name=%s\n", p.Type, p.Name)
	}
	cmd := exec.Command("sfdisk", "-q", img)
	cmd.Stdin = strings.NewReader(script.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	var dump struct {
		PT struct {
			Partitions []sfPart `json:"partitions"`
		} `json:"partitiontable"`
	}
	if err := json.Unmarshal([]byte(runCmd(t, "sfdisk", "-J", img)), &dump); err != nil {
		t.Fatal(err)
	}
	parts := dump.PT.Partitions
	if len(parts) != 5 {
		t.Fatalf("sfdisk wrote %d partitions", len(parts))
	}
	probe := strings.ToUpper(runCmd(t, "partx", "-g", "-o", "TYPE", img))
	for _, ty := range []string{gptTypeESP, gptTypeXBOOTLDR, gptTypeRootX64, gptTypeHome} {
		if !strings.Contains(probe, ty) {
			t.Fatalf("file-level probe misses partition type %s:\n%s", ty, probe)
		}
	}
	return img, parts
}

// The partitions that are mounted, by number, with their file systems and
// mount points relative to the root partition.
var heavyMounts = []struct {
	nr     int
	fstype string
	label  string
	at     string
}{
	{4, "ext4", "root", ""},
	{5, "ext4", "home", "home"},
	{1, "vfat", "ESP", "efi"},
	{2, "vfat", "XBOOTLDR", "boot"},
}

func blkidType(args ...string) (string, error) {
	out, err := exec.Command("blkid", append([]string{"-p", "-o", "value", "-s", "TYPE"}, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// heavyMain is the main phase: attach read-write with partscan and an
// exclusive lock, add and pin the partitions, format through the partition
// nodes, flush, probe, downgrade, mount everything once, unlock, unmount,
// detach.
func heavyMain(t *testing.T, img string, parts []sfPart, mnt string, udev bool) {
	privateMountNS(t)
	ctx := testCtx(t, 5*time.Minute)
	d, err := Attach(ctx, img, Options{Access: AccessReadWrite, Partscan: true, Lock: LockExclusive})
	if err != nil {
		t.Fatal(err)
	}
	cleanupDevice(t, d)
	pins, err := addAndPin(ctx, d, parts)
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll(pins)
	got, err := d.Partitions()
	if err != nil || len(got) != 5 {
		t.Fatalf("partitions %v, %v", got, err)
	}
	node := map[int]string{}
	for i, p := range got {
		if p.Nr != i+1 || p.Start != parts[i].Start*512 || p.Size != parts[i].Size*512 {
			t.Fatalf("partition %d is %+v, want start %d size %d", i+1, p, parts[i].Start*512, parts[i].Size*512)
		}
		node[p.Nr] = p.Path
	}
	for _, m := range heavyMounts {
		args := []string{"-q", "-F", "-E", "discard", "-U", "random", "-L", m.label, node[m.nr]}
		name := "mkfs.ext4"
		if m.fstype == "vfat" {
			name, args = "mkfs.vfat", []string{"-n", m.label, node[m.nr]}
		}
		runCmd(t, name, args...)
	}
	// Partition and whole-disk buffer caches are separate.
	if err := unix.IoctlSetInt(int(d.File().Fd()), unix.BLKFLSBUF, 0); err != nil {
		t.Fatalf("BLKFLSBUF: %v", err)
	}
	for _, m := range heavyMounts {
		p := parts[m.nr-1]
		ty, err := blkidType("-O", strconv.FormatUint(p.Start*512, 10), "-S", strconv.FormatUint(p.Size*512, 10), d.Path())
		if err != nil || ty != m.fstype {
			t.Errorf("whole-device probe of partition %d: %q (%v), want %s", m.nr, ty, err, m.fstype)
		}
		ty, err = blkidType(node[m.nr])
		if err != nil || ty != m.fstype {
			t.Errorf("probe of %s: %q (%v), want %s", node[m.nr], ty, err, m.fstype)
		}
	}
	if err := d.Flock(ctx, LockShared, false); err != nil {
		t.Fatal(err)
	}
	if err := mountTree(pins, mnt, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := d.Flock(ctx, LockNone, false); err != nil { // mounts pin the partitions
		t.Fatal(err)
	}
	if err := unmountTree(mnt); err != nil {
		t.Fatal(err)
	}
	closeAll(pins)
	if err := d.Detach(bg); !acceptableDetach(err, true) {
		t.Fatal(err)
	}
}

// addAndPin adds the partitions with BLKPG and opens them with the identity
// checks of openVerified; the open fds pin them.
func addAndPin(ctx context.Context, d *Device, parts []sfPart) (map[int]*os.File, error) {
	for i, p := range parts {
		if err := d.AddPartition(i+1, p.Start*512, p.Size*512); err != nil {
			return nil, err
		}
	}
	pins := map[int]*os.File{}
	for _, m := range heavyMounts {
		f, err := d.OpenPartition(ctx, m.nr, unix.O_RDONLY)
		if err != nil {
			closeAll(pins)
			return nil, err
		}
		pins[m.nr] = f
	}
	return pins, nil
}

func closeAll(fs map[int]*os.File) {
	for k, f := range fs {
		f.Close()
		delete(fs, k)
	}
}

// mountTree mounts root, home, ESP and XBOOTLDR under mnt through the pinned
// fds (/proc/self/fd: the mount gets exactly the verified device).
func mountTree(pins map[int]*os.File, mnt string, flags uintptr, mkdirs bool) error {
	var done []string
	for _, m := range heavyMounts {
		at := filepath.Join(mnt, m.at)
		if mkdirs && m.at != "" {
			if err := os.MkdirAll(at, 0o755); err != nil {
				_ = unmountAll(done)
				return err
			}
		}
		if !fsSupported(m.fstype) {
			continue // e.g. a kernel without CONFIG_VFAT_FS: formatted and probed, not mounted
		}
		src := fmt.Sprintf("/proc/self/fd/%d", pins[m.nr].Fd())
		if err := unix.Mount(src, at, m.fstype, flags, ""); err != nil {
			_ = unmountAll(done)
			return fmt.Errorf("mount partition %d (%s) on %s: %w", m.nr, m.fstype, at, err)
		}
		done = append(done, at)
	}
	return nil
}

// fsSupported reports whether the kernel can mount fstype.
func fsSupported(fstype string) bool {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return true
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[len(f)-1] == fstype {
			return true
		}
	}
	return false
}

func unmountTree(mnt string) error {
	var ats []string
	for _, m := range heavyMounts {
		ats = append(ats, filepath.Join(mnt, m.at))
	}
	return unmountAll(ats)
}

// unmountAll unmounts in reverse order.
func unmountAll(ats []string) error {
	var errs []error
	for i := len(ats) - 1; i >= 0; i-- {
		if err := unix.Unmount(ats[i], 0); err != nil && err != unix.EINVAL {
			errs = append(errs, fmt.Errorf("unmount %s: %w", ats[i], err))
		}
	}
	return errors.Join(errs...)
}

// heavyWorker is one parallel-phase worker: attach read-only from the shared
// backing fd with partscan and a shared lock, add and pin the partitions,
// mount the tree read-only in a fresh directory, unlock, unmount, detach.
func heavyWorker(backing *os.File, parts []sfPart, base string, iterations int, udev bool, used *sync.Map) error {
	if err := enterPrivateMountNS(); err != nil {
		return err
	}
	for i := range iterations {
		if err := heavyIteration(backing, parts, base, udev, used); err != nil {
			return fmt.Errorf("iteration %d: %w", i, err)
		}
	}
	return nil
}

func heavyIteration(backing *os.File, parts []sfPart, base string, udev bool, used *sync.Map) (retErr error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	d, err := AttachFile(ctx, backing, Options{Access: AccessReadOnly, Partscan: true, Lock: LockShared})
	heavyStats.add("attach", time.Since(start))
	if err != nil {
		return err
	}
	name := strings.TrimPrefix(d.Path(), "/dev/")
	used.Store(name, true)
	detached := false
	defer func() {
		if !detached {
			_ = d.Detach(bg)
		}
	}()
	if d.Path() == "" || d.BackingPath() == "" {
		return fmt.Errorf("device %q backing %q not set", d.Path(), d.BackingPath())
	}
	pins, err := addAndPin(ctx, d, parts)
	if err != nil {
		return err
	}
	defer closeAll(pins)
	for n := range pins {
		used.Store(fmt.Sprintf("%sp%d", name, n), true)
	}
	mnt, err := os.MkdirTemp(base, "mnt")
	if err != nil {
		return err
	}
	if err := mountTree(pins, mnt, unix.MS_RDONLY|unix.MS_NODEV|unix.MS_NOSUID, false); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(mnt, "home", "lost+found")); err != nil {
		retErr = fmt.Errorf("home not mounted read-only under root: %w", err)
	}
	if err := d.Flock(ctx, LockNone, false); err != nil {
		retErr = errors.Join(retErr, err)
	}
	if err := unmountTree(mnt); err != nil {
		return errors.Join(retErr, err)
	}
	if err := os.Remove(mnt); err != nil {
		retErr = errors.Join(retErr, err)
	}
	closeAll(pins)
	detached = true
	start = time.Now()
	err = d.Detach(bg)
	heavyStats.add("detach", time.Since(start))
	if !acceptableDetach(err, true) {
		return errors.Join(retErr, fmt.Errorf("detach %s: %w", d.Path(), err))
	}
	return retErr
}

// latencies collects attach/detach durations for the log (never asserted).
type latencies struct {
	mu sync.Mutex
	d  map[string][]time.Duration
}

var heavyStats = &latencies{d: map[string][]time.Duration{}}

func (l *latencies) add(k string, d time.Duration) {
	l.mu.Lock()
	l.d[k] = append(l.d[k], d)
	l.mu.Unlock()
}

func (l *latencies) summary() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for _, k := range []string{"attach", "detach"} {
		v := append([]time.Duration(nil), l.d[k]...)
		if len(v) == 0 {
			continue
		}
		sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
		fmt.Fprintf(&b, "%s: n=%d p50=%v p99=%v max=%v; ", k, len(v), v[len(v)/2], v[len(v)*99/100], v[len(v)-1])
	}
	return b.String()
}

// heavyParallel runs workers goroutines sharing one read-only backing fd; one
// worker runs inline, as in systemd.
func heavyParallel(img string, parts []sfPart, base string, workers, iterations int, udev bool, used *sync.Map) error {
	backing, err := os.Open(img)
	if err != nil {
		return err
	}
	defer backing.Close()
	if workers == 1 {
		return heavyWorker(backing, parts, base, iterations, udev, used)
	}
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() { errs[w] = heavyWorker(backing, parts, base, iterations, udev, used) })
	}
	wg.Wait()
	for w, e := range errs {
		if e != nil {
			errs[w] = fmt.Errorf("worker %d: %w", w, e)
		}
	}
	return errors.Join(errs...)
}

// TestR19_HeavyDuty runs the port at systemd's defaults (5 threads x 3
// iterations) always, and the scaled run (32 goroutines x 20 iterations plus
// 4 processes) with LOOPKIT_TEST_SCALE=1. LOOPKIT_TEST_UDEV=1 requires
// udevd to run during it.
func TestR19_HeavyDuty(t *testing.T) {
	dir := rootDir(t)
	udev := requireUdevIfAsked(t)
	if os.Getenv("LOOPKIT_TEST_UDEV") == "1" && len(udevRunning()) == 0 {
		t.Fatal("LOOPKIT_TEST_UDEV=1 but udevd is not running")
	}
	if !fsSupported("vfat") {
		t.Log("kernel without vfat: ESP and XBOOTLDR are formatted and probed but not mounted")
	}
	kmsg := watchKmsg(t)
	img, parts := heavyImage(t, dir)
	used := &sync.Map{}

	t.Run("main", func(t *testing.T) { heavyMain(t, img, parts, mkdir(t, dir, "main"), udev) })
	if t.Failed() {
		return
	}
	t.Run("parallel-5x3", func(t *testing.T) {
		if err := heavyParallel(img, parts, mkdir(t, dir, "par"), 5, 3, udev, used); err != nil {
			t.Fatal(err)
		}
	})
	if scaled() {
		t.Run("scaled-32x20+4proc", func(t *testing.T) {
			base := mkdir(t, dir, "scaled")
			kids := startChildren(t, 4, "TestR19Child", "LOOPKIT_TEST_R19_CHILD",
				fmt.Sprintf("%s|%s|%d|%d", img, base, 8, 20))
			err := heavyParallel(img, parts, base, 32, 20, udev, used)
			for i, c := range kids {
				werr := c.Wait()
				out := c.Stdout.(*strings.Builder).String()
				for _, line := range strings.Split(out, "\n") {
					if devs, ok := strings.CutPrefix(line, "DEVICES "); ok {
						for _, n := range strings.Split(devs, ",") {
							used.Store(n, true)
						}
					}
				}
				if werr != nil || !strings.Contains(out, "\nPASS") {
					t.Errorf("child %d: %v\n%s", i, werr, out)
				}
			}
			if err != nil {
				t.Fatal(err)
			}
		})
	}
	settleUdev()
	waitNoBindings(t, img, 15*time.Second)
	devs := map[string]bool{}
	used.Range(func(k, _ any) bool { devs[k.(string)] = true; return true })
	if len(devs) == 0 {
		t.Fatal("no devices recorded")
	}
	if errs := kmsg.ioErrors(devs); len(errs) > 0 {
		t.Errorf("kernel I/O errors on our devices:\n%s", strings.Join(errs, "\n"))
	}
	names := make([]string, 0, len(devs))
	for n := range devs {
		names = append(names, n)
	}
	sort.Strings(names)
	t.Logf("%d device names used; %s", len(names), heavyStats.summary())
}

// TestR19Child is a helper process of the scaled run (skipped otherwise).
func TestR19Child(t *testing.T) {
	spec := os.Getenv("LOOPKIT_TEST_R19_CHILD")
	if spec == "" {
		t.Skip("helper process for TestR19_HeavyDuty")
	}
	f := strings.Split(spec, "|")
	img, base := f[0], f[1]
	workers, _ := strconv.Atoi(f[2])
	iterations, _ := strconv.Atoi(f[3])
	var dump struct {
		PT struct {
			Partitions []sfPart `json:"partitions"`
		} `json:"partitiontable"`
	}
	if err := json.Unmarshal([]byte(runCmd(t, "sfdisk", "-J", img)), &dump); err != nil {
		t.Fatal(err)
	}
	used := &sync.Map{}
	err := heavyParallel(img, dump.PT.Partitions, base, workers, iterations, len(udevRunning()) > 0, used)
	var names []string
	used.Range(func(k, _ any) bool { names = append(names, k.(string)); return true })
	fmt.Printf("DEVICES %s\n", strings.Join(names, ","))
	if err != nil {
		t.Fatal(err)
	}
}
