package loopdev

// Bad input: each case is a clear error and nothing is attached.

import (
	"context"
	"errors"
	"io/fs"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestBadInput(t *testing.T) {
	dir := rootDir(t)
	good := newImage(t, dir, "good.img", 4<<20)
	small := newImage(t, dir, "small.img", 100)
	empty := newImage(t, dir, "empty.img", 0)
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	subdir := mkdir(t, dir, "adir")
	rosrc := mkdir(t, dir, "rosrc")
	newImage(t, rosrc, "ro.img", 4<<20)
	ro := mkdir(t, dir, "ro")
	mountT(t, rosrc, ro, "", unix.MS_BIND, "")
	if err := unix.Mount("", ro, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	roImg := filepath.Join(ro, "ro.img")

	invalid := []error{ErrInvalidArgument}
	for _, c := range []struct {
		name string
		path string
		opts Options
		want []error // any of
	}{
		{"missing", filepath.Join(dir, "nope.img"), Options{}, []error{fs.ErrNotExist}},
		{"directory", subdir, Options{}, []error{ErrInvalidArgument, unix.EISDIR}},
		{"fifo", fifo, Options{}, invalid},
		{"fifo-read-only", fifo, Options{Access: AccessReadOnly}, invalid},
		{"socket", sock, Options{}, invalid},
		{"char-device", "/dev/null", Options{}, invalid},
		{"zero-size", empty, Options{}, invalid},
		{"smaller-than-a-sector", small, Options{}, invalid},
		{"offset-at-end", good, Options{Offset: 4 << 20}, invalid},
		{"offset-beyond-end", good, Options{Offset: 8 << 20}, invalid},
		{"offset-overflow", good, Options{Offset: math.MaxInt64 + 1}, invalid},
		{"size-overflow", good, Options{Size: math.MaxUint64 - 511}, invalid},
		{"unaligned-offset", good, Options{Offset: 100}, invalid},
		{"unaligned-size", good, Options{Size: 1000}, invalid},
		{"sector-size-1000", good, Options{SectorSize: 1000}, invalid},
		{"sector-size-256", good, Options{SectorSize: 256}, invalid},
		{"sector-size-8192", good, Options{SectorSize: 8192}, invalid},
		{"file-name-64-bytes", good, Options{FileName: strings.Repeat("n", 64)}, invalid},
		{"bad-access-mode", good, Options{Access: AccessMode(7)}, invalid},
		{"bad-lock-state", good, Options{Lock: LockState(9)}, invalid},
		{"read-only-file-asked-read-write", roImg, Options{Access: AccessReadWrite}, []error{unix.EROFS, unix.EACCES, unix.EPERM}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			type res struct {
				d   *Device
				err error
			}
			ch := make(chan res, 1)
			go func() {
				d, err := Attach(ctx, c.path, c.opts)
				ch <- res{d, err}
			}()
			var r res
			select {
			case r = <-ch:
			case <-time.After(30 * time.Second):
				t.Fatal("Attach hangs")
			}
			if r.d != nil {
				cleanupDevice(t, r.d)
				t.Fatalf("attached %s", r.d.Path())
			}
			ok := false
			for _, w := range c.want {
				ok = ok || errors.Is(r.err, w)
			}
			if !ok {
				t.Errorf("error %v, want one of %v", r.err, c.want)
			}
			if r.err != nil && !strings.Contains(r.err.Error(), c.path) && c.path != "" {
				t.Errorf("error %q does not name the backing %s", r.err, c.path)
			}
			if b := bindingsOf(c.path); len(b) != 0 {
				t.Errorf("bound %v", b)
			}
		})
	}

	t.Run("attach-file-bad-fds", func(t *testing.T) {
		for _, c := range []struct {
			name  string
			flags int
		}{{"o-path", unix.O_PATH}, {"write-only", unix.O_WRONLY}} {
			fd, err := unix.Open(good, c.flags|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			f := os.NewFile(uintptr(fd), good)
			d, err := AttachFile(testCtx(t, time.Minute), f, Options{})
			f.Close()
			if d != nil {
				cleanupDevice(t, d)
			}
			if !errors.Is(err, unix.EBADFD) {
				t.Errorf("%s fd: %v, want EBADFD", c.name, err)
			}
		}
		if b := bindingsOf(good); len(b) != 0 {
			t.Errorf("bound %v", b)
		}
	})

	t.Run("attach-file-keeps-callers-fd", func(t *testing.T) {
		f, err := os.Open(good)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.Seek(1234, 0); err != nil {
			t.Fatal(err)
		}
		d, err := AttachFile(testCtx(t, time.Minute), f, Options{})
		if err != nil {
			t.Fatal(err)
		}
		cleanupDevice(t, d)
		if !d.ReadOnly() {
			t.Error("read-only fd gave a writable device")
		}
		if pos, _ := f.Seek(0, 1); pos != 1234 {
			t.Errorf("caller's file position moved to %d: the fd was shared, not reopened", pos)
		}
		if err := detachWait(d); err != nil {
			t.Fatal(err)
		}
		if _, err := f.ReadAt(make([]byte, 1), 0); err != nil {
			t.Errorf("caller's fd unusable after Detach: %v", err)
		}
	})
}
