package loopdev

// Configuration: R7, R8, R9, R13, R14, R20.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fillPattern writes n random bytes at off of path and returns them.
func fillPattern(t testing.TB, path string, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, _ = rand.Read(b)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return b
}

// readDev reads n bytes at off through a fresh buffered fd on the node.
func readDev(t testing.TB, node string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(node)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %s at %d: %v", node, off, err)
	}
	return b
}

// R7: LOOP_CONFIGURE first, the legacy path when it is unsupported or
// broken, remembered process-wide. The suite runs once more with the legacy
// path forced (LOOPKIT_TEST_FORCE_LEGACY=1); this test also re-runs itself
// that way, so the legacy path is proven even in a single run.
func TestR07_ConfigureFirstLegacyFallback(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r07.img", 64<<20)
	pat := fillPattern(t, img, 1<<20, 4096)
	d := attachT(t, img, Options{Access: AccessReadWrite, Offset: 1 << 20, Size: 8 << 20, SectorSize: 4096})
	if got := blkSSZ(t, d.File()); got != 4096 {
		t.Errorf("BLKSSZGET %d, want 4096", got)
	}
	if got := blkSize64(t, d.File()); got != 8<<20 {
		t.Errorf("BLKGETSIZE64 %d, want 8 MiB", got)
	}
	if got := readDev(t, d.Path(), 0, 4096); !bytes.Equal(got, pat) {
		t.Error("device sector 0 is not the file's bytes at 1 MiB")
	}
	nr := d.Nr()
	for attr, want := range map[string]string{"loop/offset": "1048576", "loop/sizelimit": "8388608", "loop/autoclear": "1", "loop/dio": "1", "ro": "0"} {
		if got := sysAttr(nr, attr); got != want {
			t.Errorf("%s = %q, want %q", attr, got, want)
		}
	}
	if forcedLegacy() {
		if !configureBroken.Load() {
			t.Fatal("legacy path forced but the broken flag is clear")
		}
		return
	}
	if configureBroken.Load() {
		t.Fatal("LOOP_CONFIGURE judged broken on a kernel where it works (a verification false positive)")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestR07_ConfigureFirstLegacyFallback$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "LOOPKIT_TEST_FORCE_LEGACY=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestR07") {
		t.Errorf("legacy re-run: %v\n%s", err, out)
	}
}

// R8: verification uses the expected size (sizelimit capped by the file,
// rounded down), so a sizelimit past EOF is not a kernel bug.
func TestR08_PostConfigureVerification(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r08.img", 256<<20)
	pat := fillPattern(t, img, 1<<20, 4096)
	d := attachT(t, img, Options{SectorSize: 4096, Offset: 1 << 20, Size: 8 << 20})
	if got := blkSSZ(t, d.File()); got != 4096 {
		t.Errorf("BLKSSZGET %d", got)
	}
	if got := blkSize64(t, d.File()); got != 8<<20 || d.Size() != 8<<20 {
		t.Errorf("BLKGETSIZE64 %d, Size() %d, want 8 MiB", got, d.Size())
	}
	if got := readDev(t, d.Path(), 0, 4096); !bytes.Equal(got, pat) {
		t.Error("device sector 0 differs from the file at 1 MiB")
	}
	wasBroken := configureBroken.Load()
	big := attachT(t, img, Options{Size: 512 << 20})
	if got := blkSize64(t, big.File()); got != 256<<20 {
		t.Errorf("size limit past EOF: device %d bytes, want the file's 256 MiB", got)
	}
	if !wasBroken && configureBroken.Load() {
		t.Error("a sizelimit past EOF marked LOOP_CONFIGURE broken")
	}
}

// TestR08_OddTail: a file whose tail is not a whole 4096-byte block, with an
// offset, must not make verification call the kernel broken. It runs in a
// child process: a false "broken" verdict is process-wide and permanent and
// would silently move every later test onto the legacy path.
func TestR08_OddTail(t *testing.T) {
	if os.Getenv("LOOPKIT_TEST_R08_CHILD") == "" {
		rootDir(t)
		cmd := exec.Command(os.Args[0], "-test.run=^TestR08_OddTail$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), "LOOPKIT_TEST_R08_CHILD=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestR08_OddTail") {
			t.Fatalf("child: %v\n%s", err, out)
		}
		return
	}
	dir := rootDir(t)
	wasBroken := configureBroken.Load()
	odd := newImage(t, dir, "odd.img", 64<<20+1536)
	pat := fillPattern(t, odd, 1<<20, 4096)
	o := attachT(t, odd, Options{SectorSize: 4096, Offset: 1 << 20})
	got := blkSize64(t, o.File())
	if got > 63<<20+1536 || got < 63<<20 {
		t.Errorf("odd tail: device %d bytes", got)
	}
	if b := readDev(t, o.Path(), 0, 4096); !bytes.Equal(b, pat) {
		t.Error("device does not start at the file's offset")
	}
	if !wasBroken && configureBroken.Load() {
		t.Error("an odd file tail marked LOOP_CONFIGURE broken")
	}
}

// R9: flags and access modes.
func TestR09_FlagsAndAccessModes(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r09.img", 16<<20)

	t.Run("read-only", func(t *testing.T) {
		d := attachT(t, img, Options{Access: AccessReadOnly})
		if !d.ReadOnly() || sysAttr(d.Nr(), "ro") != "1" {
			t.Errorf("ReadOnly()=%v sysfs ro=%q", d.ReadOnly(), sysAttr(d.Nr(), "ro"))
		}
		if _, err := d.File().WriteAt(make([]byte, 512), 0); err == nil {
			t.Error("write to a read-only device succeeded")
		}
		if f, err := os.OpenFile(d.Path(), os.O_WRONLY, 0); err == nil {
			_, werr := f.WriteAt(make([]byte, 512), 0)
			serr := f.Sync()
			f.Close()
			if werr == nil && serr == nil {
				t.Error("write through a new fd on a read-only device succeeded")
			}
		}
		info, err := rawStatus(d.Path())
		if err != nil {
			t.Fatal(err)
		}
		if info.Flags&unix.LO_FLAGS_READ_ONLY == 0 || info.Flags&unix.LO_FLAGS_AUTOCLEAR == 0 {
			t.Errorf("lo_flags %#x, want READ_ONLY|AUTOCLEAR", info.Flags)
		}
	})

	t.Run("read-write", func(t *testing.T) {
		d := attachT(t, img, Options{})
		if d.ReadOnly() || sysAttr(d.Nr(), "ro") != "0" || sysAttr(d.Nr(), "loop/autoclear") != "1" {
			t.Errorf("ReadOnly()=%v ro=%q autoclear=%q", d.ReadOnly(), sysAttr(d.Nr(), "ro"), sysAttr(d.Nr(), "loop/autoclear"))
		}
		fl, err := unix.FcntlInt(d.File().Fd(), unix.F_GETFL, 0)
		if err != nil {
			t.Fatal(err)
		}
		// O_NONBLOCK is no longer asked (changed): it means nothing to a
		// loop device, and os.File would register such an fd with the
		// poller (a failing epoll_ctl on every attach).
		if fl&unix.O_ACCMODE != unix.O_RDWR || fl&unix.O_DIRECT != 0 {
			t.Errorf("main fd flags %#o: want O_RDWR, no O_DIRECT", fl)
		}
		fd, err := unix.FcntlInt(d.File().Fd(), unix.F_GETFD, 0)
		if err != nil || fd&unix.FD_CLOEXEC == 0 {
			t.Errorf("main fd not close-on-exec (%#x, %v)", fd, err)
		}
	})

	t.Run("auto-on-read-only-bind-mount", func(t *testing.T) {
		ro := filepath.Join(dir, "ro")
		if err := os.Mkdir(ro, 0o755); err != nil {
			t.Fatal(err)
		}
		src := filepath.Join(dir, "src")
		if err := os.Mkdir(src, 0o755); err != nil {
			t.Fatal(err)
		}
		inner := newImage(t, src, "inner.img", 8<<20)
		_ = inner
		mountT(t, src, ro, "", unix.MS_BIND, "")
		if err := unix.Mount("", ro, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(ro, "inner.img")
		if _, err := Attach(testCtx(t, time.Minute), p, Options{Access: AccessReadWrite}); err == nil || !errorsIsAny(err, unix.EROFS) {
			t.Errorf("read-write attach on a read-only mount: %v, want EROFS", err)
		}
		d := attachT(t, p, Options{})
		if !d.ReadOnly() || sysAttr(d.Nr(), "ro") != "1" {
			t.Errorf("Auto on a read-only mount: ReadOnly()=%v ro=%q", d.ReadOnly(), sysAttr(d.Nr(), "ro"))
		}
		if err := detachWait(d); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("sigkill-owner", func(t *testing.T) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestR09Child$", "-test.count=1")
		cmd.Env = append(os.Environ(), "LOOPKIT_TEST_R09_CHILD="+img)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		var nr int
		var seq uint64
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if _, err := fmt.Sscanf(sc.Text(), "ATTACHED %d %d", &nr, &seq); err == nil {
				break
			}
		}
		if seq == 0 && nr == 0 {
			t.Fatal("child never attached")
		}
		if bf, ok := sysBacking(nr); !ok || bf != img {
			t.Fatalf("child's loop%d not bound to the image (%q)", nr, bf)
		}
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		go func() { _, _ = io.Copy(io.Discard, out) }()
		deadline := time.Now().Add(10 * time.Second)
		for {
			bf, bound := sysBacking(nr)
			if !bound || bf != img || (seq != 0 && sysDiskseq(nr) != seq) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("loop%d still bound after its owner was killed", nr)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// TestR09Child attaches and waits to be killed (helper of TestR09).
func TestR09Child(t *testing.T) {
	img := os.Getenv("LOOPKIT_TEST_R09_CHILD")
	if img == "" {
		t.Skip("helper process for TestR09_FlagsAndAccessModes")
	}
	d, err := Attach(testCtx(t, time.Minute), img, Options{})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("ATTACHED %d %d\n", d.Nr(), d.DiskSeq())
	os.Stdout.Sync()
	time.Sleep(10 * time.Minute)
}

func errorsIsAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errorsIs(err, t) {
			return true
		}
	}
	return false
}

// R13: direct I/O on by default, switched off by option (never by the environment),
// buffered where the backing refuses it, never half-enabled.
func TestR13_DirectIO(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r13.img", 16<<20)
	f := false
	tr := true

	d := attachT(t, img, Options{})
	if !d.DirectIO() || sysAttr(d.Nr(), "loop/dio") != "1" {
		t.Errorf("default on ext4: DirectIO()=%v dio=%q", d.DirectIO(), sysAttr(d.Nr(), "loop/dio"))
	}
	off := attachT(t, img, Options{DirectIO: &f})
	if off.DirectIO() || sysAttr(off.Nr(), "loop/dio") != "0" {
		t.Errorf("DirectIO=false: DirectIO()=%v dio=%q", off.DirectIO(), sysAttr(off.Nr(), "loop/dio"))
	}
	// The library reads no environment: the variable that once switched
	// the default off must change nothing.
	t.Setenv("LOOPKIT_LOOP_DIRECT_IO", "0")
	env := attachT(t, img, Options{})
	if !env.DirectIO() || sysAttr(env.Nr(), "loop/dio") != "1" {
		t.Errorf("LOOPKIT_LOOP_DIRECT_IO=0 changed the default: dio=%q", sysAttr(env.Nr(), "loop/dio"))
	}
	on := attachT(t, img, Options{DirectIO: &tr})
	if !on.DirectIO() || sysAttr(on.Nr(), "loop/dio") != "1" {
		t.Errorf("DirectIO=true: dio=%q", sysAttr(on.Nr(), "loop/dio"))
	}

	t.Run("filesystem-refuses", func(t *testing.T) {
		// squashfs has no O_DIRECT (tmpfs gained it in 6.6): the O_DIRECT open
		// fails and the attach continues buffered.
		testRequireBins(t, "mksquashfs")
		privateMountNS(t)
		src := filepath.Join(dir, "sqsrc")
		if err := os.Mkdir(src, 0o755); err != nil {
			t.Fatal(err)
		}
		pat := fillPattern(t, newImage(t, src, "t.img", 8<<20), 0, 4096)
		sq := filepath.Join(dir, "sq.img")
		runCmd(t, "mksquashfs", src, sq, "-noappend", "-quiet", "-no-progress")
		lower := attachT(t, sq, Options{Access: AccessReadOnly})
		mnt := filepath.Join(dir, "sq")
		if err := os.Mkdir(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		mountT(t, lower.Path(), mnt, "squashfs", unix.MS_RDONLY, "")
		timg := filepath.Join(mnt, "t.img")
		if fd, err := unix.Open(timg, unix.O_RDONLY|unix.O_DIRECT, 0); err == nil {
			unix.Close(fd)
			t.Skip("squashfs accepts O_DIRECT on this kernel")
		}
		d, err := Attach(testCtx(t, time.Minute), timg, Options{DirectIO: &tr})
		if err != nil {
			t.Fatal(err)
		}
		if d.DirectIO() || sysAttr(d.Nr(), "loop/dio") != "0" {
			t.Errorf("squashfs: DirectIO()=%v dio=%q, want buffered", d.DirectIO(), sysAttr(d.Nr(), "loop/dio"))
		}
		full, err := io.ReadAll(io.NewSectionReader(d.File(), 0, int64(d.Size())))
		if err != nil || len(full) != 8<<20 || !bytes.Equal(full[:4096], pat) {
			t.Errorf("full read of the buffered device: %d bytes, %v", len(full), err)
		}
		if err := detachWait(d); err != nil {
			t.Fatal(err)
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("kernel-refuses", func(t *testing.T) {
		var steps []string
		refused := false
		o := Options{DirectIO: &tr, faultHook: func(step string, nr int) error {
			steps = append(steps, step)
			if step == stepVerified && !refused {
				refused = true
				return fmt.Errorf("injected: DIO not enabled on loop%d: %w", nr, unix.ENOANO)
			}
			return nil
		}}
		d := attachT(t, img, o)
		if d.DirectIO() || sysAttr(d.Nr(), "loop/dio") != "0" {
			t.Errorf("after DIO refusal: DirectIO()=%v dio=%q, want a buffered restart", d.DirectIO(), sysAttr(d.Nr(), "loop/dio"))
		}
		if n := strings.Count(strings.Join(steps, ","), stepGetFree); n < 2 {
			t.Errorf("no restart from get-free: steps %v", steps)
		}
		full, err := io.ReadAll(io.NewSectionReader(d.File(), 0, int64(d.Size())))
		if err != nil || len(full) != 16<<20 {
			t.Errorf("full read: %d bytes, %v", len(full), err)
		}
		bs := bindingsOf(img)
		mine := 0
		for _, b := range bs {
			if b == d.Path() {
				mine++
			}
		}
		if mine != 1 {
			t.Errorf("bindings %v", bs)
		}
	})
}

// R14: the sector size is always explicit.
func TestR14_SectorSize(t *testing.T) {
	dir := rootDir(t)
	plain := newImage(t, dir, "plain.img", 16<<20)
	g512 := gptImage(t, dir, "g512.img", 32<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 8192}})
	g4k := gptImage(t, dir, "g4k.img", 32<<20, 4096, []gptPart{
		{Type: gptTypeLinux, Name: "a", Start: 256, Len: 1024},
		{Type: gptTypeLinux, Name: "b", Start: 1280, Len: 1024},
	})
	for _, c := range []struct {
		name string
		img  string
		ss   uint32
		want uint32
	}{
		{"file-default", plain, 0, 512},
		{"file-512", plain, 512, 512},
		{"file-1024", plain, 1024, 1024},
		{"file-4096", plain, 4096, 4096},
		{"auto-no-gpt", plain, SectorSizeAuto, 512},
		{"auto-gpt-512", g512, SectorSizeAuto, 512},
		{"auto-gpt-4096", g4k, SectorSizeAuto, 4096},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := attachT(t, c.img, Options{SectorSize: c.ss, Partscan: c.img == g4k})
			if got := blkSSZ(t, d.File()); got != c.want || d.SectorSize() != c.want {
				t.Errorf("BLKSSZGET %d, SectorSize() %d, want %d", got, d.SectorSize(), c.want)
			}
			if c.img != g4k {
				return
			}
			if !kernelHasPartitionParser() {
				for i, start := range []uint64{256, 1280} {
					if err := d.AddPartition(i+1, start*4096, 1024*4096); err != nil {
						t.Fatal(err)
					}
				}
			}
			parts, err := d.Partitions()
			if err != nil {
				t.Fatal(err)
			}
			if len(parts) != 2 || parts[0].Start != 256*4096 || parts[1].Start != 1280*4096 || parts[1].Size != 1024*4096 {
				t.Errorf("partitions of the 4096-byte GPT: %v", parts)
			}
			for _, p := range parts {
				f, err := d.OpenPartition(testCtx(t, time.Minute), p.Nr, unix.O_RDONLY)
				if err != nil {
					t.Errorf("open partition %d: %v", p.Nr, err)
					continue
				}
				if ss := blkSSZ(t, f); ss != 4096 {
					t.Errorf("partition %d sector size %d", p.Nr, ss)
				}
				f.Close()
			}
		})
	}
	t.Run("auto-ambiguous", func(t *testing.T) {
		amb := gptImage(t, dir, "amb.img", 32<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 8192}})
		f, err := os.OpenFile(amb, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		hdr := make([]byte, 512)
		if _, err := f.ReadAt(hdr, 512); err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(hdr, 4096); err != nil { // a second "EFI PART" where a 4096-byte GPT sits
			t.Fatal(err)
		}
		f.Close()
		_, err = Attach(testCtx(t, time.Minute), amb, Options{SectorSize: SectorSizeAuto})
		if !errorsIs(err, unix.ENOTUNIQ) {
			t.Errorf("two GPT headers: %v, want ENOTUNIQ", err)
		}
		if b := bindingsOf(amb); len(b) != 0 {
			t.Errorf("attached %v", b)
		}
	})
}

// R20: a block-device backing's discard_max_bytes is mirrored.
func TestR20_DiscardPropagation(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r20.img", 32<<20)
	lower := attachT(t, img, Options{})
	upper := attachT(t, lower.Path(), Options{SectorSize: 4096}) // not the shortcut: sector size differs
	if !upper.Created() {
		t.Fatal("expected a new loop device over the block backing")
	}
	want := sysAttr(lower.Nr(), "queue/discard_max_bytes")
	got := sysAttr(upper.Nr(), "queue/discard_max_bytes")
	if want == "" || got != want {
		t.Errorf("discard_max_bytes: backing %q, loop device %q", want, got)
	}
	t.Logf("discard_max_bytes %s (backing) / %s (loop)", want, got)
}
