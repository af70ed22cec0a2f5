package loopdev

// Listing, sweeping and detach-and-wait.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestFindByBackingAndList(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "list.img", 8<<20)
	a := attachT(t, img, Options{FileName: "loopkit-test:list"})
	b := attachT(t, img, Options{Access: AccessReadOnly, Offset: 1 << 20})
	infos, err := FindByBacking(img, a.BackingID())
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]Info{}
	for _, i := range infos {
		found[i.Path] = i
	}
	if len(infos) != 2 || found[a.Path()].Path == "" || found[b.Path()].Path == "" {
		t.Fatalf("FindByBacking: %+v, want %s and %s", infos, a.Path(), b.Path())
	}
	ia, ib := found[a.Path()], found[b.Path()]
	if ia.FileName != "" {
		t.Errorf("FindByBacking read lo_file_name %q: it must not open devices", ia.FileName)
	}
	if ia, err = Inspect(ia); err != nil {
		t.Fatal(err)
	}
	if ia.BackingFile != img || ia.DiskSeq != a.DiskSeq() || ia.Devnum != a.Devnum() || !ia.Autoclear || ia.ReadOnly || ia.FileName != "loopkit-test:list" {
		t.Errorf("info of %s: %+v", a.Path(), ia)
	}
	if !ib.ReadOnly || ib.Offset != 1<<20 {
		t.Errorf("info of %s: %+v", b.Path(), ib)
	}
	if err := Verify(ia.Record()); err != nil {
		t.Errorf("Verify(Info.Record()): %v", err)
	}
	if err := os.Remove(img); err != nil {
		t.Fatal(err)
	}
	if infos, _ := FindByBacking(img, a.BackingID()); len(infos) != 0 {
		t.Errorf("FindByBacking of an unlinked path: %+v, want none", infos)
	}
	infos, _ = List(func(i Info) (bool, bool) { return i.Devnum != a.Devnum() && i.Devnum != b.Devnum(), false })
	if len(infos) != 2 {
		t.Errorf("List with a filter: %+v, want %s and %s", infos, a.Path(), b.Path())
	}
	for _, i := range infos {
		if !i.Deleted || i.BackingFile != img {
			t.Errorf("after unlink: %+v, want Deleted and the path without the suffix", i)
		}
	}
}

func TestSweep(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "sweep.img", 8<<20)
	prefix := fmt.Sprintf("loopkit-test-sweep-%d:", rand.Uint64())
	ctx := testCtx(t, time.Minute)
	orphan := attachT(t, img, Options{Keep: true, FileName: prefix + "orphan"})
	alive := attachT(t, img, Options{Keep: true, FileName: prefix + "alive"})
	other := attachT(t, img, Options{Keep: true, FileName: "someone-else:orphan"})
	for _, d := range []*Device{orphan, alive, other} {
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, d := range []*Device{alive, other} {
			_ = DetachRecord(context.Background(), d.Record(), DetachOptions{})
		}
	})
	if _, err := Sweep(ctx, dir, "", func(Info) bool { return true }); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("empty prefix: %v, want ErrInvalidArgument", err)
	}
	done, err := Sweep(ctx, dir, prefix, func(i Info) bool { return i.FileName == prefix+"orphan" })
	if err != nil {
		t.Fatal(err)
	}
	if len(done) != 1 || done[0].Path != orphan.Path() {
		t.Fatalf("swept %+v, want only %s", done, orphan.Path())
	}
	// Another opener may have deferred the unbind a moment.
	waitUnbound(t, orphan.Record(), 10*time.Second)
	for _, d := range []*Device{alive, other} {
		if err := Verify(d.Record()); err != nil {
			t.Errorf("%s touched by the sweep: %v", d.Path(), err)
		}
	}
}

func TestDetachWithWait(t *testing.T) {
	dir := rootDir(t)
	privateMountNS(t)
	img := ext4Image(t, dir, "wait.img", 32<<20)
	d := attachT(t, img, Options{})
	mnt := mkdir(t, filepath.Join(dir, "m"))
	mountT(t, d.Path(), mnt, "ext4", unix.MS_RDONLY, "")
	rec := d.Record()
	// The mount lives in this thread's namespace: wait in a goroutine,
	// unmount here.
	res := make(chan error, 1)
	wctx := testCtx(t, 30*time.Second)
	go func() { res <- d.DetachWith(wctx, DetachOptions{Wait: true}) }()
	time.Sleep(200 * time.Millisecond)
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err != nil {
		t.Fatalf("DetachWith(Wait): %v", err)
	}
	if stillOurs(rec) {
		t.Fatal("still bound after DetachWith(Wait) returned nil")
	}

	d = attachT(t, img, Options{})
	mountT(t, d.Path(), mnt, "ext4", unix.MS_RDONLY, "")
	short, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := d.DetachWith(short, DetachOptions{Wait: true})
	if !errors.Is(err, ErrDetachDeferred) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("DetachWith(Wait) with the mount kept: %v, want deferred and deadline", err)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	waitUnbound(t, d.Record(), 10*time.Second)
}

// TestListingOpensNothing: List and FindByBacking read sysfs only. An open
// of another owner's device by a lister turns that owner's concurrent
// LOOP_CLR_FD into a lazy autoclear, and a stat of a backing on a hung FUSE
// or NFS mount hangs the lister. inotify reports every open of the device
// node; Inspect, which does open it, proves the watch sees opens.
func TestListingOpensNothing(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "watched.img", 4<<20)
	d := attachT(t, img, Options{})
	settleUdev()
	in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatalf("inotify_init1: %v", err)
	}
	defer unix.Close(in)
	if _, err := unix.InotifyAddWatch(in, d.Path(), unix.IN_OPEN); err != nil {
		t.Fatalf("inotify_add_watch %s: %v", d.Path(), err)
	}
	opens := func() int {
		n := 0
		buf := make([]byte, 4096)
		for {
			m, err := unix.Read(in, buf)
			if err != nil || m <= 0 {
				return n
			}
			for off := 0; off+unix.SizeofInotifyEvent <= m; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				if ev.Mask&unix.IN_OPEN != 0 {
					n++
				}
				off += unix.SizeofInotifyEvent + int(ev.Len)
			}
		}
	}
	// inotify does not tell who opened (and fanotify reports no events on
	// device nodes), and another loop user may open this device meanwhile:
	// make test runs this suite beside a losetup loop, whose get-free can
	// hand it this number just before our attach binds it. Such an open is
	// a one-off; an open by List or FindByBacking happens on every round.
	var all []Info
	for round := 1; ; round++ {
		opens() // drain
		var err error
		if all, err = List(nil); err != nil {
			t.Fatal(err)
		}
		if infos, err := FindByBacking(img, d.BackingID()); err != nil || len(infos) != 1 {
			t.Fatalf("FindByBacking: %v, %v", infos, err)
		}
		n := opens()
		if n == 0 {
			break
		}
		if round == 3 {
			t.Fatalf("List and FindByBacking opened %s in 3 rounds out of 3 (%d times in the last)", d.Path(), n)
		}
		t.Logf("round %d: %s was opened %d times meanwhile; again", round, d.Path(), n)
		time.Sleep(50 * time.Millisecond)
	}
	for _, i := range all {
		if i.Devnum == d.Devnum() {
			if _, err := Inspect(i); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := opens(); n == 0 {
		t.Error("the watch saw no open from Inspect: it proves nothing")
	}
}
