package loopdev

// Teardown: R15, R16, R17, data safety, name reuse.

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/testutil"
)

// waitUnbound polls (bounded) until rec's attachment is gone.
func waitUnbound(t testing.TB, rec Record, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for stillOurs(rec) {
		if time.Now().After(deadline) {
			t.Fatalf("%s (diskseq %d) still bound", rec.Path, rec.DiskSeq)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ext4Image(t testing.TB, dir, name string, size int64) string {
	t.Helper()
	testutilBins(t, "mkfs.ext4")
	p := newImage(t, dir, name, size)
	runCmd(t, "mkfs.ext4", "-q", "-F", p)
	return p
}

func testutilBins(t testing.TB, names ...string) {
	t.Helper()
	testutil.RequireBinaries(t, names...)
}

func mkdir(t testing.TB, parts ...string) string {
	t.Helper()
	p := filepath.Join(parts...)
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// R15: teardown order. Data written through the device is in the file when
// Detach returns; no partition and no binding survive it; a mount pinning
// the device is reported as deferred.
func TestR15_TeardownOrdering(t *testing.T) {
	dir := rootDir(t)
	img := gptImage(t, dir, "r15.img", 32<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 8192}})
	d := attachT(t, img, Options{Partscan: true})
	if err := d.AddPartition(1, 2048*512, 8192*512); err != nil {
		t.Fatal(err)
	}
	pat := make([]byte, 1<<20)
	_, _ = rand.Read(pat)
	if _, err := d.File().WriteAt(pat, 16<<20); err != nil {
		t.Fatal(err)
	}
	rec, nr := d.Record(), d.Nr()
	if err := detachWait(d); err != nil {
		t.Fatal(err)
	}
	if p := sysPartitions(nr); len(p) != 0 && sysDiskseq(nr) == rec.DiskSeq {
		t.Errorf("partitions %v survive Detach", p)
	}
	if p := sysPartitions(nr); len(p) != 0 {
		if _, bound := sysBacking(nr); !bound {
			t.Errorf("unbound loop%d still carries partitions %v after our Detach", nr, p)
		}
	}
	if stillOurs(rec) {
		t.Errorf("%s still bound right after Detach returned nil", rec.Path)
	}
	got := make([]byte, len(pat))
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 16<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pat) {
		t.Error("pattern written through the device is not in the file after Detach")
	}

	t.Run("remove-device", func(t *testing.T) {
		d := attachT(t, newImage(t, dir, "rm.img", 8<<20), Options{RemoveDevice: true})
		rec, nr := d.Record(), d.Nr()
		if err := detachWait(d); err != nil {
			t.Fatal(err)
		}
		// Gone, unless another allocator already created the number again
		// (then it carries a newer diskseq).
		if _, err := os.Stat(fmt.Sprintf("/sys/block/loop%d", nr)); err == nil && sysDiskseq(nr) == rec.DiskSeq {
			t.Errorf("loop%d still exists with our diskseq after Detach with RemoveDevice", nr)
		}
	})

	t.Run("mount-pins-whole-device", func(t *testing.T) {
		privateMountNS(t)
		img := ext4Image(t, dir, "fs.img", 32<<20)
		d := attachT(t, img, Options{})
		mnt := mkdir(t, dir, "mnt-whole")
		mountT(t, d.Path(), mnt, "ext4", 0, "")
		rec := d.Record()
		err := d.Detach(bg)
		if !errors.Is(err, ErrDetachDeferred) {
			t.Fatalf("Detach with a mount: %v, want ErrDetachDeferred", err)
		}
		if !stillOurs(rec) {
			t.Fatal("mounted device unbound at once")
		}
		if err := os.WriteFile(filepath.Join(mnt, "still-works"), []byte("x"), 0o644); err != nil {
			t.Errorf("mount unusable after a deferred detach: %v", err)
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatal(err)
		}
		waitUnbound(t, rec, 10*time.Second)
	})

	t.Run("mounted-partition", func(t *testing.T) {
		privateMountNS(t)
		testutilBins(t, "mkfs.ext4")
		img := gptImage(t, dir, "p.img", 64<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 65536}})
		d := attachT(t, img, Options{Partscan: true, Lock: LockExclusive})
		if err := d.AddPartition(1, 2048*512, 65536*512); err != nil {
			t.Fatal(err)
		}
		runCmd(t, "mkfs.ext4", "-q", "-F", d.Path()+"p1")
		mnt := mkdir(t, dir, "mnt-part")
		mountT(t, d.Path()+"p1", mnt, "ext4", 0, "")
		rec := d.Record()
		err := d.Detach(bg)
		if !errors.Is(err, unix.EBUSY) && !errors.Is(err, ErrDetachDeferred) {
			t.Fatalf("Detach with a mounted partition: %v, want EBUSY reported and/or deferred", err)
		}
		t.Logf("Detach with a mounted partition: %v", err)
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatal(err)
		}
		waitUnbound(t, rec, 10*time.Second)
		if p := sysPartitions(rec.nrOrMinus()); len(p) != 0 {
			if _, bound := sysBacking(rec.nrOrMinus()); !bound {
				t.Errorf("unbound %s keeps partitions %v", rec.Path, p)
			}
		}
	})
}

func (r Record) nrOrMinus() int {
	n, _ := loopNr(r.Path)
	return n
}

// R16: ownership. Relinquished devices go away with their last user unless
// autoclear is off; opened devices are never owned by default.
func TestR16_Ownership(t *testing.T) {
	dir := rootDir(t)
	img := ext4Image(t, dir, "r16.img", 32<<20)
	ctx := testCtx(t, time.Minute)

	t.Run("relinquish-autoclear", func(t *testing.T) {
		privateMountNS(t)
		d := attachT(t, img, Options{})
		mnt := mkdir(t, dir, "m1")
		mountT(t, d.Path(), mnt, "ext4", unix.MS_RDONLY, "")
		d.Relinquish()
		if d.Owned() {
			t.Fatal("still owned after Relinquish")
		}
		rec := d.Record()
		if err := d.Detach(bg); !errors.Is(err, ErrNotOwned) {
			t.Errorf("Detach after Relinquish: %v, want ErrNotOwned", err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if !stillOurs(rec) {
			t.Fatal("unbound by Close while mounted")
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatal(err)
		}
		waitUnbound(t, rec, 5*time.Second)
	})

	t.Run("keep-then-detach", func(t *testing.T) {
		privateMountNS(t)
		d := attachT(t, img, Options{})
		if changed, err := d.SetAutoclear(false); err != nil || !changed {
			t.Fatalf("SetAutoclear(false): %v %v", changed, err)
		}
		d.Relinquish()
		mnt := mkdir(t, dir, "m2")
		mountT(t, d.Path(), mnt, "ext4", unix.MS_RDONLY, "")
		rec := d.Record()
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Fatal(err)
		}
		settleUdev()
		time.Sleep(200 * time.Millisecond)
		if !stillOurs(rec) {
			t.Fatal("a device with autoclear off went away after unmount")
		}
		o, err := Open(ctx, rec.Path, OpenOptions{ExpectDiskSeq: rec.DiskSeq})
		if err != nil {
			t.Fatal(err)
		}
		if o.Owned() || o.Created() {
			t.Errorf("Open took ownership (owned=%v created=%v)", o.Owned(), o.Created())
		}
		if err := o.Detach(bg); !errors.Is(err, ErrNotOwned) {
			t.Errorf("Detach of an opened device: %v, want ErrNotOwned", err)
		}
		if !stillOurs(rec) {
			t.Fatal("Detach of a not-owned handle cleared the device")
		}
		// ErrNotOwned leaves the binding alone but releases the handle
		// (its fd would make the next detach lazy); Close is then a no-op.
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
		o, err = Open(ctx, rec.Path, OpenOptions{ExpectDiskSeq: rec.DiskSeq})
		if err != nil {
			t.Fatal(err)
		}
		if err := o.Unrelinquish(); err != nil {
			t.Fatal(err)
		}
		if err := detachWait(o); err != nil {
			t.Fatal(err)
		}
		waitUnbound(t, rec, 5*time.Second)
	})

	t.Run("option-keep", func(t *testing.T) {
		d := attachT(t, img, Options{Keep: true})
		if d.Owned() || sysAttr(d.Nr(), "loop/autoclear") != "0" {
			t.Errorf("Keep: owned=%v autoclear=%q", d.Owned(), sysAttr(d.Nr(), "loop/autoclear"))
		}
		rec := d.Record()
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		settleUdev()
		if !stillOurs(rec) {
			t.Fatal("kept device went away at Close")
		}
		// Wait: another loop user's open (a losetup handed this number by
		// get-free just before our attach) may defer the unbind.
		if err := DetachRecord(ctx, rec, DetachOptions{Wait: true}); err != nil {
			t.Fatal(err)
		}
		waitUnbound(t, rec, 5*time.Second)
		if err := DetachRecord(ctx, rec, DetachOptions{}); !errors.Is(err, ErrGone) {
			t.Errorf("second DetachRecord: %v, want ErrGone", err)
		}
	})

	t.Run("open-existing-foreign-autoclear", func(t *testing.T) {
		d := attachT(t, img, Options{})
		o, err := Open(ctx, d.Path(), OpenOptions{ExpectDiskSeq: d.DiskSeq()})
		if err != nil {
			t.Fatal(err)
		}
		defer o.Close()
		if o.Nr() != d.Nr() || o.Devnum() != d.Devnum() || o.BackingID() != d.BackingID() {
			t.Errorf("Open sees nr %d devnum %s backing %v, want %d %s %v", o.Nr(), o.Devnum(), o.BackingID(), d.Nr(), d.Devnum(), d.BackingID())
		}
		if changed, _ := o.SetAutoclear(false); changed || sysAttr(d.Nr(), "loop/autoclear") != "1" {
			_, _ = d.SetAutoclear(true)
			t.Errorf("SetAutoclear on a not-owned opened handle changed the device (a no-op on handles not owned)")
		}
	})
}

var errInjected = errors.New("injected fault")

var attachSteps = []string{stepGetFree, stepLocked, stepBeforeAttach, stepAttached, stepVerified, stepPartscan, stepDone}

// R17: an error at any step leaves nothing behind; errors after the bind
// clear the device, errors before it never clear anything.
func TestR17_FailureAtomicity(t *testing.T) {
	dir := rootDir(t)
	img := gptImage(t, dir, "r17.img", 32<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 8192}})
	other := newImage(t, dir, "r17-other.img", 8<<20)
	for _, step := range attachSteps {
		for _, withParts := range []bool{false, true} {
			if withParts && step != stepPartscan && step != stepDone {
				continue
			}
			name := step
			if withParts {
				name += "-with-partitions"
			}
			t.Run(name, func(t *testing.T) {
				nr := -1
				o := Options{Partscan: true, Lock: LockShared, faultHook: func(s string, n int) error {
					if s != step {
						return nil
					}
					nr = n
					if withParts {
						out, err := exec.Command("addpart", fmt.Sprintf("/dev/loop%d", n), "1", "2048", "8192").CombinedOutput()
						if err != nil {
							t.Errorf("addpart: %v %s", err, out)
						}
					}
					return fmt.Errorf("at %s on loop%d: %w", s, n, errInjected)
				}}
				d, err := Attach(testCtx(t, time.Minute), img, o)
				if d != nil {
					cleanupDevice(t, d)
				}
				if !errors.Is(err, errInjected) {
					t.Fatalf("Attach: %v, want the injected error", err)
				}
				if nr < 0 {
					t.Fatal("step never reached")
				}
				// Any other opener at the clear (a udev worker, another
				// package's List) defers the unbind to its close: bounded wait.
				waitNoBindings(t, img, 5*time.Second)
				if bf, bound := sysBacking(nr); bound && bf == img {
					t.Errorf("loop%d left bound to the image", nr)
				}
				if _, bound := sysBacking(nr); !bound {
					if p := sysPartitions(nr); len(p) != 0 {
						t.Errorf("loop%d left with partitions %v", nr, p)
					}
				}
			})
		}
	}
	// Errors before the bind never clear: a foreign binding made at
	// "before-attach" stays intact when the attempt fails there.
	t.Run("before-bind-never-clears", func(t *testing.T) {
		var tn *tenant
		o := Options{faultHook: func(s string, n int) error {
			if s == stepLocked && tn == nil {
				var err error
				tn, err = bindTenant(n, other)
				if errors.Is(err, unix.EBUSY) {
					// Another loop user on the host (make test runs this
					// suite beside a losetup loop) bound n first: the
					// attempt finds it bound and moves on, and the hook
					// tries again on the next number.
					tn = nil
					return nil
				}
				if err != nil {
					t.Errorf("tenant: %v", err)
				}
				return fmt.Errorf("at %s: %w", s, errInjected)
			}
			return nil
		}}
		_, err := Attach(testCtx(t, time.Minute), img, o)
		if !errors.Is(err, errInjected) {
			t.Fatalf("Attach: %v", err)
		}
		if tn == nil {
			t.Fatal("hook never ran")
		}
		defer tn.release()
		if err := tn.intact(); err != nil {
			t.Errorf("failure before our bind touched a foreign binding: %v", err)
		}
	})
	// A retryable error at any step: the attach still succeeds, and the
	// device abandoned on the way is not left bound.
	for _, step := range attachSteps {
		t.Run("retry-"+step, func(t *testing.T) {
			injected := false
			o := Options{faultHook: func(s string, n int) error {
				if s == step && !injected {
					injected = true
					return fmt.Errorf("at %s: %w", s, unix.EBUSY)
				}
				return nil
			}}
			d, err := Attach(testCtx(t, time.Minute), img, o)
			if step == stepPartscan || step == stepDone {
				// After the loop the device is owned: the error is final.
				if err == nil {
					cleanupDevice(t, d)
				}
				if err != nil && !errors.Is(err, unix.EBUSY) {
					t.Fatalf("Attach: %v", err)
				}
				if err != nil {
					waitNoBindings(t, img, 5*time.Second)
					return
				}
			} else if err != nil {
				t.Fatalf("Attach after one retryable %s error: %v", step, err)
			} else {
				cleanupDevice(t, d)
			}
			if b := bindingsOf(img); len(b) != 1 || b[0] != d.Path() {
				t.Errorf("bindings %v, want only %s", b, d.Path())
			}
		})
	}
}

// Data safety: what is written through the device, by any fd, is in the
// backing file the moment Detach returns.
func TestDataSafety(t *testing.T) {
	dir := rootDir(t)
	f, tr := false, true
	for _, c := range []struct {
		name string
		o    Options
	}{
		{"dio", Options{DirectIO: &tr}},
		{"buffered", Options{DirectIO: &f}},
		{"offset-4096", Options{Offset: 1 << 20, SectorSize: 4096}},
		{"offset-512-size-limit", Options{Offset: 512, Size: 16 << 20}},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := newImage(t, dir, c.name+".img", 32<<20)
			d := attachT(t, img, c.o)
			pat := make([]byte, 4<<20)
			_, _ = rand.Read(pat)
			if _, err := d.File().WriteAt(pat[:2<<20], 0); err != nil {
				t.Fatal(err)
			}
			// A second writer on its own fd, closed without fsync.
			w, err := os.OpenFile(d.Path(), os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.WriteAt(pat[2<<20:], 2<<20); err != nil {
				t.Fatal(err)
			}
			w.Close()
			if err := detachWait(d); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(pat))
			r, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if _, err := r.ReadAt(got, int64(c.o.Offset)); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, pat) {
				for i := range got {
					if got[i] != pat[i] {
						t.Fatalf("file differs from what was written at byte %d of %d", i, len(pat))
					}
				}
			}
		})
	}
}

// Name reuse: our attachment ends, someone else binds another file to the
// same number; our guarded detach leaves their binding intact.
func TestNameReuse(t *testing.T) {
	dir := rootDir(t)
	a := newImage(t, dir, "a.img", 8<<20)
	b := newImage(t, dir, "b.img", 8<<20)
	ctx := testCtx(t, time.Minute)
	for _, c := range []struct {
		name string
		opts Options
		end  func(t *testing.T, d *Device)
	}{
		{"autoclear-close", Options{}, func(t *testing.T, d *Device) {
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
		}},
		{"kept-external-clear", Options{Keep: true}, func(t *testing.T, d *Device) {
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			// Another program clears it with a raw LOOP_CLR_FD.
			f, err := os.OpenFile(d.Path(), os.O_RDONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil {
				t.Fatal(err)
			}
			f.Close()
		}},
		{"no-diskseq", Options{forceNoDiskseq: true}, func(t *testing.T, d *Device) {
			if d.DiskSeq() != 0 {
				t.Fatalf("forceNoDiskseq: DiskSeq() = %d", d.DiskSeq())
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := attachT(t, a, c.opts)
			rec, nr := d.Record(), d.Nr()
			c.end(t, d)
			deadline := time.Now().Add(10 * time.Second)
			for {
				if _, bound := sysBacking(nr); !bound {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("loop%d never unbound", nr)
				}
				time.Sleep(10 * time.Millisecond)
			}
			tn, err := bindTenant(nr, b)
			if err != nil {
				t.Fatal(err)
			}
			defer tn.release()
			if err := Verify(rec); !errors.Is(err, ErrReused) {
				t.Errorf("Verify: %v, want ErrReused", err)
			}
			if err := DetachRecord(ctx, rec, DetachOptions{}); !errors.Is(err, ErrReused) {
				t.Errorf("DetachRecord: %v, want ErrReused", err)
			}
			// The old handle, already closed, must not act either.
			if err := d.Detach(bg); err == nil {
				t.Error("Detach on the closed old handle reported success")
			}
			if rec.DiskSeq != 0 {
				if _, err := Open(ctx, rec.Path, OpenOptions{ExpectDiskSeq: rec.DiskSeq}); !errors.Is(err, ErrReused) {
					t.Errorf("Open with the old diskseq: %v, want ErrReused", err)
				}
			}
			if err := tn.intact(); err != nil {
				t.Fatalf("the other tenant's binding was touched: %v", err)
			}
		})
	}
}
