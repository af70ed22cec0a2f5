package main

import (
	"bytes"
	"context"
	"io"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/testutil"
)

func TestPercentile(t *testing.T) {
	ms := func(xs ...int) []time.Duration {
		var ds []time.Duration
		for _, x := range xs {
			ds = append(ds, time.Duration(x)*time.Millisecond)
		}
		return ds
	}
	for _, tc := range []struct {
		name string
		in   []time.Duration
		q    float64
		want time.Duration
	}{
		{name: "empty", in: nil, q: 0.5, want: 0},
		{name: "one", in: ms(7), q: 0.99, want: 7 * time.Millisecond},
		{name: "median odd unsorted", in: ms(5, 1, 3), q: 0.5, want: 3 * time.Millisecond},
		{name: "median even", in: ms(4, 1, 3, 2), q: 0.5, want: 2 * time.Millisecond},
		{name: "p99 of 100", in: ms(seq(100)...), q: 0.99, want: 99 * time.Millisecond},
		{name: "p99 of 1000 picks the 990th", in: ms(seq(1000)...), q: 0.99, want: 990 * time.Millisecond},
		{name: "max", in: ms(9, 2, 4), q: 1, want: 9 * time.Millisecond},
	} {
		if got := percentile(tc.in, tc.q); got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}

func seq(n int) []int {
	xs := make([]int, n)
	for i := range xs {
		xs[i] = n - i // descending, so percentile has to sort
	}
	return xs
}

func TestParseArgs(t *testing.T) {
	cfg, err := parseArgs([]string{"-impl", "loopkit,losetup", "-workers", "1, 8", "-n", "10"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(cfg.impls, ",") != "loopkit,losetup" || len(cfg.workers) != 2 || cfg.workers[1] != 8 || cfg.n != 10 {
		t.Errorf("parsed %+v", cfg)
	}
	for _, bad := range [][]string{
		{"-impl", "nope"},
		{"-workers", "0"},
		{"-workers", "x"},
		{"-n", "0"},
		{"-n", "2", "-rounds", "3"},
		{"-size", "1000"},
	} {
		if _, err := parseArgs(bad, io.Discard); err == nil {
			t.Errorf("parseArgs(%q) accepted", bad)
		}
	}
}

func TestRatioAndFormat(t *testing.T) {
	if got := ratio(3, 2); got != "1.50x" {
		t.Errorf("ratio(3, 2) = %q", got)
	}
	if got := ratio(1, 0); got != "-" {
		t.Errorf("ratio(1, 0) = %q", got)
	}
	for d, want := range map[time.Duration]string{0: "-", 250 * time.Microsecond: "250µs", 1500 * time.Microsecond: "1.50ms", 2 * time.Second: "2.00s"} {
		if got := fmtDur(d); got != want {
			t.Errorf("fmtDur(%v) = %q, want %q", d, got, want)
		}
	}
}

// TestBenchSmall runs the whole harness briefly on real loop devices: every
// implementation runs its cycles, the report has a row per run, and nothing
// stays bound.
func TestBenchSmall(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "losetup")
	parent := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(parent, &st); err != nil || st.Type == unix.TMPFS_MAGIC {
		t.Skip("needs a temp dir on a real filesystem, not tmpfs")
	}
	testutil.NoLeaks(t, parent)
	testutil.RequireBinaries(t, "cc")
	// The systemd and loopctl rows run binaries: build them here.
	bin := t.TempDir()
	sdloopPool.path, loopctlPath = filepath.Join(bin, "sdloop"), filepath.Join(bin, "loopctl")
	const lib = "/usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-252.so"
	if out, err := exec.Command("cc", "-O2", "-o", sdloopPool.path, "sdloop/sdloop.c", lib, "-Wl,-rpath,"+filepath.Dir(lib)).CombinedOutput(); err != nil {
		t.Fatalf("build sdloop (needs package systemd for %s): %v\n%s", lib, err, out)
	}
	if out, err := exec.Command("go", "build", "-o", loopctlPath, "github.com/loopkit/loopkit/cmd/loopctl").CombinedOutput(); err != nil {
		t.Fatalf("build loopctl: %v\n%s", err, out)
	}

	cfg := config{impls: implOrder, workers: []int{1, 3}, n: 9, rounds: 2, size: 8 << 20, dir: parent, settle: 5 * time.Second, timeout: time.Minute}
	var out, progress bytes.Buffer
	if err := bench(context.Background(), cfg, []string{"-test"}, &out, &progress); err != nil {
		t.Fatalf("bench: %v\n%s", err, progress.String())
	}
	report := out.String()
	for _, w := range []string{"1", "3"} {
		for _, name := range implOrder {
			row := "| " + name + " | " + w + " | 9 | "
			if !strings.Contains(report, row) {
				t.Errorf("report lacks a row starting %q:\n%s", row, report)
			}
		}
	}
	// loopkit must have no errors; the peers' errors are theirs to report.
	// Leaks are checked for everyone: the harness clears what is left.
	for _, w := range []string{"1", "3"} {
		for _, name := range []string{"loopkit", "loopkit-buffered"} {
			row := regexp.MustCompile(`(?m)^\| ` + name + ` \| ` + w + ` \| 9 \| 0 \| \d+ \| 0 \| `)
			if !row.MatchString(report) {
				t.Errorf("%s with %s workers had errors or leaks:\n%s\n%s", name, w, report, progress.String())
			}
		}
	}
	if left := boundUnder(parent); len(left) > 0 {
		t.Errorf("still bound after bench: %v", left)
	}
}

// TestRunOneCountsErrors checks that a failing implementation is counted,
// not hidden: attaching a missing file fails every cycle.
func TestRunOneCountsErrors(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	testutil.NoLeaks(t, dir)
	missing := dir + "/missing.img"
	r := runOne(context.Background(), impls["loopkit"], []string{missing, missing}, 2, 5, io.Discard)
	if r.ops != 5 || r.errors != 5 || len(r.cycle) != 0 || len(r.errorSamples) == 0 {
		t.Errorf("ops %d errors %d successes %d samples %q; want 5, 5, 0, some", r.ops, r.errors, len(r.cycle), r.errorSamples)
	}
}

func TestMerge(t *testing.T) {
	a := result{impl: "x", workers: 2, ops: 3, errors: 1, deferred: 1, leaks: 0, elapsed: time.Second,
		cycle: []time.Duration{1, 2}, attach: []time.Duration{1, 1, 1}, detach: []time.Duration{1, 1}, errorSamples: []string{"e1"}}
	b := result{impl: "x", workers: 2, ops: 2, errors: 1, leaks: 1, elapsed: time.Second,
		cycle: []time.Duration{3}, attach: []time.Duration{2}, detach: []time.Duration{2}, errorSamples: []string{"e1", "e2"}}
	m := result{}.merge(a).merge(b)
	if m.impl != "x" || m.ops != 5 || m.errors != 2 || m.deferred != 1 || m.leaks != 1 || m.elapsed != 2*time.Second ||
		len(m.cycle) != 3 || len(m.attach) != 4 || len(m.detach) != 3 || strings.Join(m.errorSamples, ",") != "e1,e2" {
		t.Errorf("merged %+v", m)
	}
	if got := m.opsPerSec(); got != 2.5 {
		t.Errorf("ops/s %v, want 2.5", got)
	}
}
