package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/loopkit/loopkit/internal/testutil"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

// ctl runs one loopctl invocation in-process and checks its exit status.
func ctl(t *testing.T, wantCode int, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), args, &stdout, &stderr); code != wantCode {
		t.Fatalf("loopctl %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s",
			strings.Join(args, " "), code, wantCode, stdout.String(), stderr.String())
	}
	return stdout.String()
}

func decode[T any](t *testing.T, s string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("decode %q: %v", s, err)
	}
	return v
}

// sparseFile creates a sparse file of size bytes in dir.
func sparseFile(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if r, err := filepath.EvalSymlinks(p); err == nil {
		p = r
	}
	return p
}

// detachOnCleanup detaches the attachment named by rec at cleanup unless
// the test already did; the diskseq guard keeps it off anyone else's device.
func detachOnCleanup(t *testing.T, rec loopdev.Record) {
	t.Cleanup(func() {
		err := loopdev.DetachRecord(context.Background(), rec, loopdev.DetachOptions{})
		// Gone or reused: the test detached it and the number moved on.
		if err != nil && !errors.Is(err, loopdev.ErrGone) && !errors.Is(err, loopdev.ErrReused) {
			t.Errorf("cleanup: detach %s: %v", rec.Path, err)
		}
	})
}

func TestAttachListInfoDetach(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "sfdisk")
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)

	img := sparseFile(t, dir, "disk.img", 64<<20)
	sfdisk := exec.Command("sfdisk", "--quiet", img)
	sfdisk.Stdin = strings.NewReader("label: gpt\nsize=16MiB, type=linux\ntype=linux\n")
	if out, err := sfdisk.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}

	v := decode[deviceView](t, ctl(t, 0, "attach", "--json", "--partscan", "--tag", "loopctl-test", img))
	if v.Record == nil {
		t.Fatal("attach --json printed no record")
	}
	detachOnCleanup(t, *v.Record)

	if !strings.HasPrefix(v.Path, "/dev/loop") || v.Nr < 0 {
		t.Errorf("path %q nr %d", v.Path, v.Nr)
	}
	if v.DiskSeq == 0 || v.Record.DiskSeq != v.DiskSeq || v.Record.Devnum != v.Devnum {
		t.Errorf("diskseq %d, record %+v", v.DiskSeq, *v.Record)
	}
	if v.BackingFile != img {
		t.Errorf("backing file %q, want %q", v.BackingFile, img)
	}
	if v.Autoclear || !v.Partscan || v.ReadOnly || v.FileName != "loopctl-test" {
		t.Errorf("flags: autoclear %v (want false: attach keeps the device), partscan %v, read-only %v, tag %q",
			v.Autoclear, v.Partscan, v.ReadOnly, v.FileName)
	}
	if v.Size != 64<<20 {
		t.Errorf("size %d, want %d", v.Size, 64<<20)
	}
	if len(v.Partitions) != 2 || v.Partitions[0].Size != 16<<20 || v.Partitions[0].Start != 1<<20 {
		t.Fatalf("partitions %+v, want 2, the first 16 MiB at 1 MiB", v.Partitions)
	}
	for _, p := range v.Partitions {
		if _, err := os.Stat(p.Path); err != nil {
			t.Errorf("partition node: %v", err)
		}
	}

	// The device outlives the command: it is bound with no opener left.
	listed := decode[[]deviceView](t, ctl(t, 0, "list", "--json", "--under", dir))
	if len(listed) != 1 || listed[0].Path != v.Path || listed[0].DiskSeq != v.DiskSeq {
		t.Fatalf("list --under %s: %+v, want only %s", dir, listed, v.Path)
	}
	tagged := decode[[]deviceView](t, ctl(t, 0, "list", "--json", "--tag-prefix", "loopctl-te"))
	if !containsDiskSeq(tagged, v.DiskSeq) {
		t.Errorf("list --tag-prefix misses %s", v.Path)
	}
	if text := ctl(t, 0, "list", "--under", dir); !strings.Contains(text, v.Path) || !strings.Contains(text, "loopctl-test") {
		t.Errorf("list text:\n%s", text)
	}

	info := decode[deviceView](t, ctl(t, 0, "info", "--json", v.Path))
	if info.DiskSeq != v.DiskSeq || len(info.Partitions) != 2 || info.Size != v.Size || info.Record != nil {
		t.Errorf("info: %+v", info)
	}
	text := ctl(t, 0, "info", v.Path)
	for _, want := range []string{"diskseq:", strconv.FormatUint(v.DiskSeq, 10), v.Partitions[1].Path, "partscan"} {
		if !strings.Contains(text, want) {
			t.Errorf("info text lacks %q:\n%s", want, text)
		}
	}

	// A stale diskseq is refused and the device stays bound.
	ctl(t, 1, "detach", "--diskseq", strconv.FormatUint(v.DiskSeq+1000, 10), v.Path)
	if err := loopdev.Verify(*v.Record); err != nil {
		t.Fatalf("after refused detach: %v", err)
	}

	ctl(t, 0, "detach", "--wait", "--diskseq", strconv.FormatUint(v.DiskSeq, 10), v.Path)
	if err := loopdev.Verify(*v.Record); !errors.Is(err, loopdev.ErrGone) && !errors.Is(err, loopdev.ErrReused) {
		t.Errorf("after detach, Verify = %v, want gone", err)
	}
	if listed := decode[[]deviceView](t, ctl(t, 0, "list", "--json", "--under", dir)); len(listed) != 0 {
		t.Errorf("after detach: %+v", listed)
	}
}

func TestAttachReadOnlyWindow(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	img := sparseFile(t, dir, "window.img", 32<<20)

	v := decode[deviceView](t, ctl(t, 0, "attach", "--json", "--read-only", "--offset", "1M", "--size", "8M", "--direct-io", "off", img))
	detachOnCleanup(t, *v.Record)
	if !v.ReadOnly || v.Offset != 1<<20 || v.SizeLimit != 8<<20 || v.Size != 8<<20 || v.DirectIO {
		t.Errorf("read-only %v offset %d size limit %d size %d direct-io %v; want true, 1 MiB, 8 MiB, 8 MiB, false",
			v.ReadOnly, v.Offset, v.SizeLimit, v.Size, v.DirectIO)
	}
	// The kernel refuses writes to a read-only loop device (the open may
	// succeed; the write may not).
	if f, err := os.OpenFile(v.Path, os.O_WRONLY, 0); err == nil {
		_, werr := f.WriteAt([]byte("x"), 0)
		serr := f.Sync()
		f.Close()
		if werr == nil && serr == nil {
			t.Errorf("wrote to read-only %s", v.Path)
		}
	}
	ctl(t, 0, "detach", "--wait", v.Path)
	if err := loopdev.Verify(*v.Record); err == nil {
		t.Errorf("%s still attached after detach", v.Path)
	}
}

func TestDetachNotALoopDevice(t *testing.T) {
	testutil.RequireRoot(t)
	ctl(t, 1, "detach", "/dev/null")
	ctl(t, 1, "info", filepath.Join(t.TempDir(), "missing"))
}

func containsDiskSeq(vs []deviceView, seq uint64) bool {
	for _, v := range vs {
		if v.DiskSeq == seq {
			return true
		}
	}
	return false
}
