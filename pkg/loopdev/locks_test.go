package loopdev

// Locks: R3, R4.

import (
	"context"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// R3: an external LOCK_EX holder on loop-control makes Attach wait, but not
// a Detach without removal: the device lock held until the close protects
// the clear, and only LOOP_CTL_REMOVE needs the control lock (changed from
// "Detach waits too": the wait stalled every Attach on the host behind one
// device's prober). Random external lock holders cause no deadlock.
func TestR03_ControlLockAndLockOrder(t *testing.T) {
	dir := rootDir(t)
	udev := requireUdevIfAsked(t)
	img := newImage(t, dir, "r03.img", 4<<20)

	h := holdFlock(t, "/dev/loop-control", true)
	type res struct {
		d   *Device
		err error
	}
	ch := make(chan res, 1)
	go func() {
		d, err := Attach(testCtx(t, time.Minute), img, Options{})
		ch <- res{d, err}
	}()
	time.Sleep(300 * time.Millisecond)
	select {
	case r := <-ch:
		if r.d != nil {
			cleanupDevice(t, r.d)
		}
		t.Fatalf("Attach finished (%v) while loop-control was locked by another process", r.err)
	default:
	}
	if b := bindingsOf(img); len(b) != 0 {
		t.Fatalf("attached %v while loop-control was locked", b)
	}
	h.stop()
	r := <-ch
	if r.err != nil {
		t.Fatalf("Attach after the holder left: %v", r.err)
	}
	cleanupDevice(t, r.d)
	d := r.d
	rec := d.Record()

	h = holdFlock(t, "/dev/loop-control", true)
	dctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := d.Detach(dctx); !acceptableDetach(err, udev) {
		t.Fatalf("Detach while loop-control was locked by another process: %v", err)
	}
	waitUnbound(t, rec, 10*time.Second)
	h.stop()
	waitNoBindings(t, img, 5*time.Second)

	t.Run("deadlock-hunt", func(t *testing.T) { deadlockHunt(t, img, udev) })
}

// deadlockHunt runs attach/detach workers against chaos actors that take the
// control lock, device locks, and both in the forbidden order (device, then
// control), for short random times. Every attach must complete.
func deadlockHunt(t *testing.T, img string, udev bool) {
	stop := make(chan struct{})
	var chaos sync.WaitGroup
	for range 3 {
		chaos.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				var files []*os.File
				lock := func(path string, how int) bool {
					f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
					if err != nil {
						return false
					}
					files = append(files, f)
					for range 20 {
						if unix.Flock(int(f.Fd()), how|unix.LOCK_NB) == nil {
							return true
						}
						time.Sleep(5 * time.Millisecond)
					}
					return false
				}
				devs := bindingsOf(img)
				switch rand.IntN(3) {
				case 0:
					lock("/dev/loop-control", unix.LOCK_EX)
				case 1, 2:
					if len(devs) > 0 {
						how := unix.LOCK_SH
						if rand.IntN(2) == 0 {
							how = unix.LOCK_EX
						}
						if lock(devs[rand.IntN(len(devs))], how) && rand.IntN(2) == 0 {
							lock("/dev/loop-control", unix.LOCK_EX) // ABBA from outside
						}
					}
				}
				time.Sleep(time.Duration(rand.IntN(10)) * time.Millisecond)
				for _, f := range files {
					f.Close()
				}
			}
		})
	}
	var failures atomic.Int32
	var workers sync.WaitGroup
	for w := range 6 {
		workers.Go(func() {
			for i := range 8 {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				d, err := Attach(ctx, img, Options{Access: AccessReadOnly, Lock: LockState(rand.IntN(3))})
				cancel()
				if err != nil {
					failures.Add(1)
					t.Errorf("worker %d cycle %d: attach: %v", w, i, err)
					continue
				}
				// Chaos actors may hold the device open at the clear.
				if err := d.Detach(bg); !acceptableDetach(err, true) {
					failures.Add(1)
					t.Errorf("worker %d cycle %d: detach: %v", w, i, err)
				}
			}
		})
	}
	workers.Wait()
	close(stop)
	chaos.Wait()
	_ = udev
	settleUdev()
	waitNoBindings(t, img, 10*time.Second)
}

// R4: the lock lives on a separate OFD and is handed back as asked.
func TestR04_DeviceLockSeparateOFD(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r04.img", 4<<20)
	ctx := testCtx(t, time.Minute)

	d := attachT(t, img, Options{Lock: LockShared})
	if !externalFlockFails(d.Path(), true) || externalFlockFails(d.Path(), false) {
		t.Errorf("shared: external -xn must fail and -sn succeed (x fails=%v, s fails=%v)",
			externalFlockFails(d.Path(), true), externalFlockFails(d.Path(), false))
	}
	// The main fd carries no lock of its own: a flock on it is a third OFD's
	// view only if the lock fd is separate, so an exclusive NB flock on the
	// main fd must conflict with our own shared lock fd.
	if err := unix.Flock(int(d.File().Fd()), unix.LOCK_EX|unix.LOCK_NB); err == nil {
		_ = unix.Flock(int(d.File().Fd()), unix.LOCK_UN)
		t.Errorf("main fd could take LOCK_EX while the handle holds LOCK_SH: the lock is not on a separate OFD")
	}
	if err := d.Flock(ctx, LockExclusive, false); err != nil {
		t.Fatal(err)
	}
	if !externalFlockFails(d.Path(), true) || !externalFlockFails(d.Path(), false) {
		t.Errorf("exclusive: external -xn and -sn must both fail")
	}
	if err := d.Flock(ctx, LockNone, false); err != nil {
		t.Fatal(err)
	}
	if !externalFlockFree(d.Path(), true) || !externalFlockFree(d.Path(), false) {
		t.Errorf("unlocked: external -x and -s must both succeed")
	}
	// The main fd stays usable after the lock fd is gone.
	buf := make([]byte, 512)
	if _, err := d.File().ReadAt(buf, 0); err != nil {
		t.Errorf("main fd after unlock: %v", err)
	}

	e := attachT(t, img, Options{Lock: LockExclusive})
	if !externalFlockFails(e.Path(), true) || !externalFlockFails(e.Path(), false) {
		t.Errorf("attach exclusive: external -xn and -sn must both fail")
	}
	n := attachT(t, img, Options{})
	if !externalFlockFree(n.Path(), true) {
		t.Errorf("attach with no lock: device %s is still locked", n.Path())
	}
}
