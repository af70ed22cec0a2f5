package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

type envInfo struct {
	kernel, cpu, utilLinux, udevd, fs, dio, load string
	sdRoundTrip                                  time.Duration // pipe round trip of the systemd row
	cpus                                         int
}

func describeEnv(fsName, dir string) envInfo {
	e := envInfo{fs: fsName + " (" + dir + ")", cpus: runtime.NumCPU()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		e.kernel = "Linux " + unix.ByteSliceToString(u.Release[:]) + " " + unix.ByteSliceToString(u.Machine[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				e.cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) >= 3 {
			e.load = strings.Join(f[:3], " ")
		}
	}
	if out, err := exec.Command("losetup", "--version").Output(); err == nil {
		e.utilLinux = strings.TrimSpace(string(out))
	}
	e.udevd = "not running"
	if exec.Command("pgrep", "-x", "systemd-udevd").Run() == nil {
		e.udevd = "running"
	}
	e.dio = "loopkit: on (Options.DirectIO nil); loopkit-buffered: off"
	return e
}

func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", float64(d)/float64(time.Microsecond))
	case d < time.Second:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2fs", d.Seconds())
}

func ratio(a, b float64) string {
	if a == 0 || b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

// writeReport prints the environment, the exact command and one table row
// per run, with ops/s and p99 relative to containerd at the same
// concurrency.
func writeReport(w io.Writer, e envInfo, cfg config, args []string, results []result) {
	fmt.Fprintf(w, "### loopbench %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(w, "- command: `loopbench %s`\n", strings.Join(args, " "))
	fmt.Fprintf(w, "- kernel: %s\n", e.kernel)
	fmt.Fprintf(w, "- machine: %d CPUs, %s; load average at start %s\n", e.cpus, e.cpu, e.load)
	fmt.Fprintf(w, "- backing: %d sparse files of %d MiB on %s\n", maxOf(cfg.workers), cfg.size>>20, e.fs)
	fmt.Fprintf(w, "- util-linux: %s; systemd-udevd: %s; direct I/O: %s\n", e.utilLinux, e.udevd, e.dio)
	fmt.Fprintf(w, "- %d attach+detach cycles per row, in %d batches interleaving the implementations; latencies of successful cycles; deferred = detaches loopkit reported as deferred by the kernel (ErrDetachDeferred: another opener, such as udev's probe, still held the device; counted as successful); leaks = devices still bound %s after each batch\n", cfg.n, cfg.rounds, cfg.settle)

	if e.sdRoundTrip > 0 {
		fmt.Fprintf(w, "- systemd: systemd 252's loop_device_make_by_path + loop_device_unref (libsystemd-shared-252.so) in bench/loopbench/sdloop, one process per worker driven over a pipe; its cycle includes two pipe round trips of %s (p50) each\n", fmtDur(e.sdRoundTrip))
	}
	fmt.Fprintln(w, "- floor: get-free, LOOP_CONFIGURE, LOOP_CLR_FD and nothing else (no lock, no check); losetup and loopctl: two processes per cycle (`losetup -f --show F` + `losetup -d D`, `loopctl attach F` + `loopctl detach D`)")
	fmt.Fprintln(w)

	base, floor := map[int]result{}, map[int]result{}
	for _, r := range results {
		switch r.impl {
		case "containerd":
			base[r.workers] = r
		case "floor":
			floor[r.workers] = r
		}
	}
	fmt.Fprintln(w, "Cycle p50 and p99 are the medians of the rounds' own p50 and p99; attach and detach percentiles are over all cycles.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| impl | workers | cycles | errors | deferred | leaks | ops/s | cycle p50 | cycle p99 | attach p50 | attach p99 | detach p50 | detach p99 | p50 vs containerd | p99 vs containerd | p50 vs floor |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, r := range results {
		p50, p99 := medianOf(r.roundP50), medianOf(r.roundP99)
		p50Ratio, p99Ratio, floorRatio := "-", "-", "-"
		if b, ok := base[r.workers]; ok {
			p50Ratio = ratio(float64(p50), float64(medianOf(b.roundP50)))
			p99Ratio = ratio(float64(p99), float64(medianOf(b.roundP99)))
		}
		if f, ok := floor[r.workers]; ok {
			floorRatio = ratio(float64(p50), float64(medianOf(f.roundP50)))
		}
		fmt.Fprintf(w, "| %s | %d | %d | %d | %d | %d | %.0f | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			r.impl, r.workers, r.ops, r.errors, r.deferred, r.leaks, r.opsPerSec(),
			fmtDur(percentile(r.cycle, 0.50)), fmtDur(p99),
			fmtDur(percentile(r.attach, 0.50)), fmtDur(percentile(r.attach, 0.99)),
			fmtDur(percentile(r.detach, 0.50)), fmtDur(percentile(r.detach, 0.99)),
			p50Ratio, p99Ratio, floorRatio)
	}
	var errs []string
	for _, r := range results {
		for _, s := range r.errorSamples {
			errs = append(errs, fmt.Sprintf("- %s, %d workers: %s", r.impl, r.workers, s))
		}
	}
	if len(errs) > 0 {
		fmt.Fprintf(w, "\nErrors (first distinct messages per row):\n\n%s\n", strings.Join(errs, "\n"))
	}
}

func maxOf(xs []int) int {
	m := 0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}
