package loopdev

// Regression tests for the audit of the package on the real kernel: each
// reproduces a bug found there and fails without its fix.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fdsOn counts this process's fds open on the block device devnum.
func fdsOn(t testing.TB, devnum Devnum) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && Devnum(st.Rdev) == devnum {
			n++
		}
	}
	return n
}

// Finding 1: an Open whose lock cannot be had left its new lock fd open;
// the leaked fds pinned the device, and the owner's Detach was deferred
// until the process exited. The block-device shortcut leaked the same way.
func TestAuditFailedLockLeaksNoFd(t *testing.T) {
	dir := rootDir(t)
	ctx := testCtx(t, time.Minute)
	for _, via := range []string{"open", "shortcut"} {
		t.Run(via, func(t *testing.T) {
			d := attachT(t, newImage(t, dir, via+".img", 4<<20), Options{})
			before := fdsOn(t, d.Devnum())
			h := holdFlock(t, d.Path(), true)
			for range 5 {
				var err error
				var e *Device
				if via == "open" {
					e, err = Open(ctx, d.Path(), OpenOptions{Lock: LockShared, LockNonBlocking: true})
				} else {
					e, err = Attach(ctx, d.Path(), Options{Lock: LockShared, LockNonBlocking: true})
				}
				if !errors.Is(err, unix.EWOULDBLOCK) {
					if e != nil {
						e.Close()
					}
					t.Fatalf("%s against an outside LOCK_EX: %v, want EWOULDBLOCK", via, err)
				}
			}
			if n := fdsOn(t, d.Devnum()); n != before {
				t.Errorf("%d fds on %s after 5 failed %ss, want %d", n, d.Path(), via, before)
			}
			h.stop()
			// Leaked fds would pin the device until exit: waiting for the
			// unbind (another opener may defer it a moment) would time out.
			if err := detachWait(d); err != nil {
				t.Errorf("owner's Detach after the failed %ss: %v", via, err)
			}
		})
	}
}

// procfsBacking is a regular file the loop driver refuses with EINVAL from
// LOOP_CONFIGURE and LOOP_SET_FD alike (procfs has no read_iter for it).
func procfsBacking(t *testing.T) string {
	for _, p := range []string{"/proc/config.gz", "/proc/cmdline"} {
		if fi, err := os.Stat(p); err == nil && fi.Size() >= 512 {
			return p
		}
	}
	t.Fatal("no procfs file of at least 512 bytes (/proc/config.gz, /proc/cmdline)")
	return ""
}

// Finding 2: one EINVAL from LOOP_CONFIGURE (a backing the kernel refuses)
// switched the whole process to the legacy path for good. Only a legacy
// attach that then works on the same backing proves LOOP_CONFIGURE missing.
func TestAuditEINVALDoesNotForceLegacy(t *testing.T) {
	if forcedLegacy() {
		t.Skip("the legacy path is forced in this run")
	}
	dir := rootDir(t)
	ctx := testCtx(t, time.Minute)
	if configureBroken.Load() {
		t.Fatal("LOOP_CONFIGURE marked broken before the test")
	}
	d, err := Attach(ctx, procfsBacking(t), Options{Access: AccessReadOnly})
	if err == nil {
		cleanupDevice(t, d)
		t.Fatal("attach of a procfs file succeeded")
	}
	if !errors.Is(err, unix.EINVAL) {
		t.Errorf("attach of a procfs file: %v, want EINVAL", err)
	}
	if configureBroken.Load() {
		t.Fatalf("one refused backing (%v) marked LOOP_CONFIGURE broken for the process", err)
	}
	attachT(t, newImage(t, dir, "after.img", 4<<20), Options{})
	if configureBroken.Load() {
		t.Fatal("an ordinary attach after the refusal went the legacy way")
	}
}

// Finding 3: Detach held the host-wide control lock while it waited up to
// 60 s for the device lock: a LOCK_SH prober on one device stalled every
// cooperating Attach on the host. Now a detach waiting for its device lock
// holds no control lock, and one without removal takes none at all.
func TestAuditDetachHoldsNoControlLock(t *testing.T) {
	dir := rootDir(t)
	udev := requireUdevIfAsked(t)
	ctx := testCtx(t, 2*time.Minute)
	d := attachT(t, newImage(t, dir, "held.img", 4<<20), Options{})
	h := holdFlock(t, d.Path(), false)
	done := make(chan error, 1)
	go func() { done <- d.Detach(ctx) }()
	// The detach now polls for the device lock. Another Attach must not wait.
	actx, cancel := context.WithTimeout(ctx, 20*time.Second)
	e, err := Attach(actx, newImage(t, dir, "other.img", 4<<20), Options{})
	cancel()
	if err != nil {
		t.Fatalf("Attach while a Detach waits for its device lock: %v", err)
	}
	cleanupDevice(t, e)
	select {
	case err := <-done:
		t.Fatalf("Detach returned (%v) while a LOCK_SH holder was on the device", err)
	default:
	}
	h.stop()
	if err := <-done; !acceptableDetach(err, udev) {
		t.Fatalf("Detach after the holder left: %v", err)
	}

	// No removal asked: the control lock is not needed, so an outside
	// holder of it does not delay the detach.
	f := attachT(t, newImage(t, dir, "ctl.img", 4<<20), Options{})
	ctl := holdFlock(t, "/dev/loop-control", true)
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := f.Detach(dctx); !acceptableDetach(err, udev) {
		t.Fatalf("Detach while another process holds /dev/loop-control: %v", err)
	}
	waitUnbound(t, f.Record(), 10*time.Second)

	// With removal the clear still happens; only LOOP_CTL_REMOVE waits for
	// the control lock, bounded by the context.
	ctl.stop()
	g := attachT(t, newImage(t, dir, "rm.img", 4<<20), Options{RemoveDevice: true})
	ctl = holdFlock(t, "/dev/loop-control", true)
	rctx, rcancel := context.WithTimeout(ctx, time.Second)
	defer rcancel()
	err = g.Detach(rctx)
	if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, ErrDetachDeferred) {
		t.Errorf("removing Detach against a held control lock: %v, want the context's deadline", err)
	}
	waitUnbound(t, g.Record(), 10*time.Second)
	ctl.stop()
}

// Finding 4: teardown closed the main fd while RefreshSize, Sync and
// friends used it, and RefreshSize wrote fields without the mutex. Every
// method runs here against a concurrent Detach (run with -race); a method
// that loses the race must fail with os.ErrClosed, never act on a reused fd.
func TestAuditMethodsRaceDetach(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "race.img", 16<<20)
	ctx := testCtx(t, time.Minute)
	for round := range 8 {
		d := attachT(t, img, Options{Lock: LockShared, WaitPartitions: true})
		start := make(chan struct{})
		errs := make(chan error, 64)
		check := func(what string, err error) {
			// Losing the race is an error that says so; acting is not.
			if err != nil && !errors.Is(err, os.ErrClosed) && !errors.Is(err, ErrGone) && !errors.Is(err, ErrReused) {
				errs <- fmt.Errorf("round %d %s: %w", round, what, err)
			}
		}
		var calls = []func(){
			func() { check("Sync", d.Sync()) },
			func() { _, err := d.RefreshSize(ctx, Unchanged, 8<<20); check("RefreshSize", err) },
			func() { _, err := d.SetAutoclear(true); check("SetAutoclear", err) },
			func() { _, err := d.SetFilename("race"); check("SetFilename", err) },
			func() { _, err := d.Partitions(); check("Partitions", err) },
			func() {
				err := d.AddPartition(1, 1<<20, 1<<20)
				if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENXIO) {
					err = nil // a device without partscan may refuse
				}
				check("AddPartition", err)
			},
			func() {
				_, err := d.OpenPartition(ctx, 1, unix.O_RDONLY)
				if errors.Is(err, unix.ENOENT) {
					err = nil
				}
				check("OpenPartition", err)
			},
			func() {
				wctx, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
				defer cancel()
				err := d.WaitPartitions(wctx, []int{7})
				if errors.Is(err, context.DeadlineExceeded) {
					err = nil
				}
				check("WaitPartitions", err)
			},
			func() { check("Flock", d.Flock(ctx, LockShared, true)) },
			func() { _, _ = d.Record(), d.Size() },
			func() { _, _ = d.Offset(), d.Owned() },
			func() { _ = d.File() },
		}
		doneCalls := make(chan struct{})
		go func() {
			defer close(doneCalls)
			<-start
			for i := range 40 {
				calls[i%len(calls)]()
			}
		}()
		close(start)
		time.Sleep(time.Duration(round) * time.Millisecond)
		if err := d.Detach(ctx); !acceptableDetach(err, true) {
			t.Errorf("round %d Detach: %v", round, err)
		}
		<-doneCalls
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		waitUnbound(t, d.Record(), 10*time.Second)
	}
}

// Finding 5: a Record with neither diskseq nor backing identity matched any
// binding, and DetachRecord detached a foreign losetup binding with it.
func TestAuditZeroRecordMatchesNothing(t *testing.T) {
	dir := rootDir(t)
	ctx := testCtx(t, time.Minute)
	img := newImage(t, dir, "foreign.img", 4<<20)
	var tn *tenant
	for nr := 0; tn == nil; nr++ {
		if nr > 4096 {
			t.Fatal("no free loop device for the foreign binding")
		}
		if _, bound := sysBacking(nr); bound {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/dev/loop%d", nr)); err != nil {
			continue
		}
		var err error
		if tn, err = bindTenant(nr, img); err != nil {
			tn = nil
		}
	}
	defer tn.release()
	path := fmt.Sprintf("/dev/loop%d", tn.nr)
	devnum, err := devnumOfNode(path)
	if err != nil {
		t.Fatal(err)
	}
	zero := Record{Path: path, Devnum: devnum}
	if err := DetachRecord(ctx, zero, DetachOptions{}); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("DetachRecord of a zero identity: %v, want ErrInvalidArgument", err)
	}
	if err := Verify(zero); err == nil {
		t.Error("Verify accepted a zero identity")
	}
	if err := tn.intact(); err != nil {
		t.Fatalf("the foreign binding was touched: %v", err)
	}
	// Without diskseq, "still bound" needs our backing path and offset: the
	// foreign binding of another file is not ours.
	ours := &Device{devnum: devnum, backingPath: filepath.Join(dir, "ours.img")}
	if ours.stillBound() {
		t.Error("a diskseq-less handle took a foreign binding for its own")
	}
	ours.backingPath = img
	if !ours.stillBound() {
		t.Error("a diskseq-less handle did not recognise a binding of its backing and offset")
	}
}

// Finding 6: Detach on a handle it does not own returned ErrNotOwned and
// closed nothing: its fds kept the device pinned and its lock kept udev out.
func TestAuditNotOwnedDetachReleases(t *testing.T) {
	dir := rootDir(t)
	ctx := testCtx(t, time.Minute)
	d := attachT(t, newImage(t, dir, "owner.img", 4<<20), Options{})
	o, err := Open(ctx, d.Path(), OpenOptions{Lock: LockExclusive, ExpectDiskSeq: d.DiskSeq()})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Detach(ctx); !errors.Is(err, ErrNotOwned) {
		t.Fatalf("Detach of an opened handle: %v, want ErrNotOwned", err)
	}
	if err := o.Sync(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("handle usable after a not-owned Detach: Sync = %v", err)
	}
	// The exclusive lock went with the handle (udev's own LOCK_SH probes
	// may fail a single try, so allow a few).
	for i := 0; externalFlockFails(d.Path(), true); i++ {
		if i == 50 {
			t.Fatal("the not-owned handle's LOCK_EX outlived its Detach")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := fdsOn(t, d.Devnum()); n != 1 {
		t.Errorf("%d fds on %s after the not-owned Detach, want only the owner's", n, d.Path())
	}
	if !stillOurs(d.Record()) {
		t.Fatal("a not-owned Detach cleared the device")
	}
}

// Finding 7: a 4096-byte sector size on a backing whose usable size is not
// a multiple of 4096 left a partial last block: reading it gave EIO and
// "Buffer I/O error" in dmesg.
func TestAuditPartialLastBlock(t *testing.T) {
	dir := rootDir(t)
	kmsg := watchKmsg(t)
	img := newImage(t, dir, "tail.img", 8<<20+2048)
	for _, o := range []Options{{SectorSize: 4096}, {SectorSize: 4096, Offset: 512}} {
		d := attachT(t, img, o)
		if d.Size()%4096 != 0 {
			t.Errorf("%+v: size %d is not a whole number of 4096-byte blocks", o, d.Size())
		}
		f, err := os.Open(d.Path())
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, f)
		f.Close()
		if err != nil {
			t.Errorf("%+v: read to the end: %v after %d bytes", o, err, n)
		}
		if uint64(n) != d.Size() {
			t.Errorf("%+v: read %d bytes, device has %d", o, n, d.Size())
		}
		name := filepath.Base(d.Path())
		if errs := kmsg.ioErrors(map[string]bool{name: true}); len(errs) > 0 {
			t.Errorf("%+v: kernel I/O errors: %v", o, errs)
		}
	}
}

// Finding 8: the direct-I/O restart opened a new file description and
// locked it again, while the lazily cleared first device still held the old
// one with the lock: the exclusive BackingLock then refused our own attach.
func TestAuditDirectIORestartKeepsBackingLock(t *testing.T) {
	dir := rootDir(t)
	ctx := testCtx(t, time.Minute)
	img := newImage(t, dir, "restart.img", 4<<20)
	var pin *os.File
	o := Options{BackingLock: LockExclusive, faultHook: func(step string, nr int) error {
		if step != stepVerified || pin != nil {
			return nil
		}
		// An opener of the bound device makes the clear of this attempt
		// lazy; then the kernel "refuses" direct I/O, as 5.10 dm-crypt did.
		var err error
		if pin, err = os.Open(fmt.Sprintf("/dev/loop%d", nr)); err != nil {
			return err
		}
		return fmt.Errorf("fault: %w", unix.ENOANO)
	}}
	d, err := Attach(ctx, img, o)
	if pin != nil {
		defer pin.Close()
	}
	if err != nil {
		t.Fatalf("attach after a direct-I/O restart with an exclusive BackingLock: %v", err)
	}
	cleanupDevice(t, d)
	if d.DirectIO() {
		t.Error("direct I/O on after the restart, want buffered")
	}
	if !externalFlockFails(img, false) {
		t.Error("the BackingLock is not held after the restart")
	}
}

// Finding 8: the block-device shortcut reopened the backing and dropped the
// BackingLock taken on the first open.
func TestAuditShortcutKeepsBackingLock(t *testing.T) {
	dir := rootDir(t)
	ctx := testCtx(t, time.Minute)
	l := attachT(t, newImage(t, dir, "blk.img", 4<<20), Options{})
	// udev probes the new disk under LOCK_SH, which an exclusive
	// BackingLock (non-blocking by contract) would meet: let it finish.
	settleUdev()
	d, err := Attach(ctx, l.Path(), Options{BackingLock: LockExclusive})
	if err != nil {
		t.Fatal(err)
	}
	if d.Nr() != l.Nr() {
		d.Close()
		t.Fatalf("attach of %s made %s, want the shortcut", l.Path(), d.Path())
	}
	if !externalFlockFails(l.Path(), false) {
		t.Error("BackingLock not held on the shortcut's block device")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	for i := 0; externalFlockFails(l.Path(), true); i++ {
		if i == 50 {
			t.Fatal("BackingLock still held after Close")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Finding 8: a refused read-write open is reported with its own errno, not
// that of the O_DIRECT attempt before it.
func TestAuditOpenErrorIsTheRealOne(t *testing.T) {
	dir := rootDir(t)
	privateMountNS(t)
	ctx := testCtx(t, time.Minute)
	img := newImage(t, dir, "ro.img", 4<<20)
	ro := mkdir(t, dir, "ro")
	if err := unix.Mount(dir, ro, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(ro, unix.MNT_DETACH) })
	if err := unix.Mount("", ro, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	d, err := Attach(ctx, filepath.Join(ro, filepath.Base(img)), Options{Access: AccessReadWrite})
	if err == nil {
		cleanupDevice(t, d)
		t.Fatal("read-write attach on a read-only mount succeeded")
	}
	if !errors.Is(err, unix.EROFS) {
		t.Errorf("read-write attach on a read-only mount: %v, want EROFS", err)
	}
}

// Finding 8: BTRFS_IOC_FORGET_DEV is _IOW(0x94, 5, struct
// btrfs_ioctl_vol_args); the direction bits differ on mips and powerpc.
func TestAuditBtrfsForgetIoctl(t *testing.T) {
	const size = 4096 // sizeof(struct btrfs_ioctl_vol_args)
	want := uint(1)<<30 | size<<16 | 0x94<<8 | 5
	if iocWrite != 1 {
		want = uint(iocWrite)<<29 | size<<16 | 0x94<<8 | 5
	}
	if btrfsIocForgetDev != want {
		t.Errorf("BTRFS_IOC_FORGET_DEV = %#x, want %#x", btrfsIocForgetDev, want)
	}
}
