package loopdev

// R18: runtime API.

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestR18_RuntimeAPI(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r18.img", 64<<20)
	ctx := testCtx(t, time.Minute)
	d := attachT(t, img, Options{})
	nr := d.Nr()
	expect := func(what string, changed bool, err error, want bool) {
		t.Helper()
		if err != nil || changed != want {
			t.Errorf("%s: changed=%v err=%v, want changed=%v", what, changed, err, want)
		}
	}
	attr := func(a, want string) {
		t.Helper()
		if got := sysAttr(nr, a); got != want {
			t.Errorf("%s = %q, want %q", a, got, want)
		}
	}

	t.Run("refresh-size", func(t *testing.T) {
		c, err := d.RefreshSize(ctx, Unchanged, Unchanged)
		expect("all unchanged", c, err, false)
		c, err = d.RefreshSize(ctx, Unchanged, 8<<20)
		expect("size 8 MiB", c, err, true)
		attr("loop/sizelimit", "8388608")
		if got := blkSize64(t, d.File()); got != 8<<20 || d.Size() != 8<<20 {
			t.Errorf("size %d / Size() %d after refresh", got, d.Size())
		}
		c, err = d.RefreshSize(ctx, Unchanged, 8<<20)
		expect("same size again", c, err, false)
		c, err = d.RefreshSize(ctx, 1<<20, Unchanged)
		expect("offset 1 MiB", c, err, true)
		attr("loop/offset", "1048576")
		attr("loop/sizelimit", "8388608")
		if d.Offset() != 1<<20 {
			t.Errorf("Offset() %d", d.Offset())
		}
		c, err = d.RefreshSize(ctx, 1<<20, 8<<20)
		expect("both equal", c, err, false)
		c, err = d.RefreshSize(ctx, 0, 0)
		expect("back to the whole file", c, err, true)
		attr("loop/offset", "0")
		attr("loop/sizelimit", "0")
		if got := blkSize64(t, d.File()); got != 64<<20 {
			t.Errorf("size %d after reset", got)
		}
	})

	t.Run("autoclear", func(t *testing.T) {
		c, err := d.SetAutoclear(true)
		expect("autoclear already on", c, err, false)
		c, err = d.SetAutoclear(false)
		expect("autoclear off", c, err, true)
		attr("loop/autoclear", "0")
		c, err = d.SetAutoclear(false)
		expect("autoclear off again", c, err, false)
		c, err = d.SetAutoclear(true)
		expect("autoclear on", c, err, true)
		attr("loop/autoclear", "1")
	})

	t.Run("filename", func(t *testing.T) {
		name := func() string {
			info, err := rawStatus(d.Path())
			if err != nil {
				t.Fatal(err)
			}
			return cStr(info.File_name[:])
		}
		c, err := d.SetFilename("loopkit:test:r18")
		expect("set tag", c, err, true)
		if got := name(); got != "loopkit:test:r18" {
			t.Errorf("lo_file_name %q", got)
		}
		c, err = d.SetFilename("loopkit:test:r18")
		expect("same tag", c, err, false)
		if _, err := d.SetFilename(strings.Repeat("x", 64)); !errors.Is(err, unix.ENOBUFS) {
			t.Errorf("64-byte tag: %v, want ENOBUFS", err)
		}
		if got := name(); got != "loopkit:test:r18" {
			t.Errorf("failed SetFilename changed the tag to %q", got)
		}
		long := strings.Repeat("y", 63)
		c, err = d.SetFilename(long)
		expect("63-byte tag", c, err, true)
		if got := name(); got != long {
			t.Errorf("63-byte tag read back as %q", got)
		}
		c, err = d.SetFilename("")
		expect("clear tag", c, err, true)
		if got := name(); got != "" {
			t.Errorf("cleared tag reads %q", got)
		}
		tagged := attachT(t, img, Options{FileName: "loopkit:test:configure"})
		info, err := rawStatus(tagged.Path())
		if err != nil {
			t.Fatal(err)
		}
		if got := cStr(info.File_name[:]); got != "loopkit:test:configure" {
			t.Errorf("Options.FileName: lo_file_name %q", got)
		}
	})

	t.Run("flock", func(t *testing.T) {
		h := holdFlock(t, d.Path(), true)
		if err := d.Flock(ctx, LockShared, true); !errors.Is(err, unix.EWOULDBLOCK) {
			t.Errorf("non-blocking shared lock against an external LOCK_EX: %v, want EWOULDBLOCK", err)
		}
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		err := d.Flock(short, LockExclusive, false)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("blocking lock against a holder: %v, want DeadlineExceeded", err)
		}
		h.stop()
		if err := d.Flock(ctx, LockShared, false); err != nil {
			t.Fatal(err)
		}
		if !externalFlockFails(d.Path(), true) || externalFlockFails(d.Path(), false) {
			t.Error("shared lock not in effect")
		}
		// Blocking: the holder's close makes udev probe the disk under
		// LOCK_SH for a moment (non-blocking was checked above).
		if err := d.Flock(ctx, LockExclusive, false); err != nil {
			t.Fatal(err)
		}
		if !externalFlockFails(d.Path(), false) {
			t.Error("exclusive lock not in effect")
		}
		if err := d.Flock(ctx, LockNone, false); err != nil {
			t.Fatal(err)
		}
		if !externalFlockFree(d.Path(), true) {
			t.Error("unlock left a lock")
		}
	})

	t.Run("sync", func(t *testing.T) {
		if err := d.Sync(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("foreign-partition-resize", func(t *testing.T) {
		pimg := gptImage(t, dir, "parts.img", 64<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 16384}})
		outer := attachT(t, pimg, Options{Partscan: true})
		if err := outer.AddPartition(1, 2048*512, 16384*512); err != nil {
			t.Fatal(err)
		}
		p := outer.Path() + "p1"
		h, err := Open(ctx, p, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		sys := "/sys/block/" + strings.TrimPrefix(outer.Path(), "/dev/") + "/" + strings.TrimPrefix(p, "/dev/") + "/size"
		c, err := h.RefreshSize(ctx, Unchanged, 4<<20)
		if sysAttr(outer.Nr(), "loop/sizelimit") != "0" || sysAttr(outer.Nr(), "loop/offset") != "0" {
			t.Fatalf("RefreshSize on partition %s changed the parent disk's offset/sizelimit", p)
		}
		if err != nil || !c {
			t.Errorf("RefreshSize on a foreign partition: changed=%v %v, want a BLKPG resize", c, err)
		} else if got := sysRead(sys); got != "8192" {
			t.Errorf("partition size %s sectors after resize to 4 MiB", got)
		}
		c, err = h.RefreshSize(ctx, Unchanged, Unchanged)
		if err == nil && c {
			t.Error("no-op resize reported a change")
		}
	})
}

func cStr(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}
