// Command loopbench measures loop-device attach+detach cycles of loopkit's
// pkg/loopdev side by side with containerd v2 core/mount and util-linux
// losetup, in one process on one kernel, at several concurrencies. Progress
// goes to stderr, a markdown report to stdout.
//
// This is the only code in the module that may exec losetup or import a
// peer's loop-device code.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

type config struct {
	impls   []string
	workers []int
	n       int
	size    int64
	dir     string
	rounds  int
	settle  time.Duration
	timeout time.Duration
}

func main() {
	cfg, err := parseArgs(os.Args[1:], os.Stderr)
	if err != nil {
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, unix.SIGTERM)
	defer stop()
	if err := bench(ctx, cfg, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "loopbench: %v\n", err)
		stop()
		os.Exit(1)
	}
}

func parseArgs(args []string, stderr io.Writer) (config, error) {
	fs := flag.NewFlagSet("loopbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	implList := fs.String("impl", strings.Join(implOrder, ","), "implementations to run, comma-separated: "+strings.Join(implOrder, ", "))
	workerList := fs.String("workers", "1,8,32", "concurrencies to run, comma-separated")
	n := fs.Int("n", 512, "attach+detach cycles per (implementation, concurrency) row")
	rounds := fs.Int("rounds", 4, "split each row into this many batches, interleaving the implementations")
	size := fs.Int64("size", 64<<20, "size of each sparse backing file in bytes")
	dir := fs.String("dir", "/var/tmp", "parent of the bench directory (must not be tmpfs)")
	settle := fs.Duration("settle", 2*time.Second, "how long a deferred unbind may take before a device counts as leaked")
	timeout := fs.Duration("timeout", 10*time.Minute, "limit for one run")
	fs.StringVar(&sdloopPool.path, "sdloop", sdloopPool.path, "the C harness around systemd 252's loop code (make bench-loop builds it)")
	fs.StringVar(&loopctlPath, "loopctl", loopctlPath, "the loopctl binary of the process rows (make build)")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	cfg := config{n: *n, rounds: *rounds, size: *size, dir: *dir, settle: *settle, timeout: *timeout}
	for _, name := range strings.Split(*implList, ",") {
		if _, ok := impls[name]; !ok {
			fmt.Fprintf(stderr, "loopbench: unknown -impl %q (want %s)\n", name, strings.Join(implOrder, ", "))
			return config{}, flag.ErrHelp
		}
		cfg.impls = append(cfg.impls, name)
	}
	for _, w := range strings.Split(*workerList, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(w))
		if err != nil || v < 1 {
			fmt.Fprintf(stderr, "loopbench: bad -workers entry %q\n", w)
			return config{}, flag.ErrHelp
		}
		cfg.workers = append(cfg.workers, v)
	}
	if cfg.n < 1 || cfg.rounds < 1 || cfg.rounds > cfg.n || cfg.size < 4096 || cfg.size%512 != 0 {
		fmt.Fprintln(stderr, "loopbench: want -n >= -rounds >= 1, -size >= 4096 and a multiple of 512")
		return config{}, flag.ErrHelp
	}
	return cfg, nil
}

// bench creates the backing files, runs every (concurrency, implementation)
// pair and writes the report.
func bench(ctx context.Context, cfg config, args []string, stdout, stderr io.Writer) error {
	if err := os.MkdirAll(cfg.dir, 0o755); err != nil {
		return err
	}
	dir, err := os.MkdirTemp(cfg.dir, "loopbench-")
	if err != nil {
		return err
	}
	if r, err := filepath.EvalSymlinks(dir); err == nil {
		dir = r
	}
	defer os.RemoveAll(dir)
	fsName, err := checkNotTmpfs(dir)
	if err != nil {
		return err
	}
	files := make([]string, maxOf(cfg.workers))
	for i := range files {
		files[i] = filepath.Join(dir, fmt.Sprintf("backing-%02d.img", i))
		if err := sparseFile(files[i], cfg.size); err != nil {
			return err
		}
	}
	env := describeEnv(fsName, dir)
	fmt.Fprintf(stderr, "loopbench: %s, %d cycles per run, backing files in %s\n", env.kernel, cfg.n, dir)

	var results []result
	defer stopSdloops()
	if slices.Contains(cfg.impls, "systemd") {
		if env.sdRoundTrip, err = sdloopRoundTrip(); err != nil {
			return err
		}
	}
	defer func() {
		if err := clearUnder(dir); err != nil {
			fmt.Fprintf(stderr, "loopbench: %v\n", err)
		}
	}()
	for _, w := range cfg.workers {
		// Rounds interleave the implementations, so a change in machine
		// load while the bench runs hits them all alike.
		merged := make([]result, len(cfg.impls))
		for round := 0; round < cfg.rounds; round++ {
			n := cfg.n / cfg.rounds
			if round < cfg.n%cfg.rounds {
				n++
			}
			for i, name := range cfg.impls {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r, err := runChecked(ctx, cfg, impls[name], dir, files[:w], w, n, stderr)
				if err != nil {
					return err
				}
				r.roundP50 = []time.Duration{percentile(r.cycle, 0.50)}
				r.roundP99 = []time.Duration{percentile(r.cycle, 0.99)}
				merged[i] = merged[i].merge(r)
			}
		}
		for _, r := range merged {
			fmt.Fprintf(stderr, "%s workers=%d: %.0f ops/s, p50 %s, p99 %s, %d errors, %d deferred, %d leaks\n",
				r.impl, w, r.opsPerSec(), fmtDur(percentile(r.cycle, 0.50)), fmtDur(percentile(r.cycle, 0.99)), r.errors, r.deferred, r.leaks)
			for _, s := range r.errorSamples {
				fmt.Fprintf(stderr, "    error: %s\n", s)
			}
		}
		results = append(results, merged...)
	}
	writeReport(stdout, env, cfg, args, results)
	return nil
}

// runChecked runs one batch of n cycles between two leak checks.
func runChecked(ctx context.Context, cfg config, im impl, dir string, files []string, w, n int, stderr io.Writer) (result, error) {
	if left := boundUnder(dir); len(left) > 0 {
		return result{}, fmt.Errorf("devices still bound before run %s/%d: %v", im.name, w, left)
	}
	fmt.Fprintf(stderr, "run %s workers=%d cycles=%d\n", im.name, w, n)
	runCtx, cancel := context.WithTimeout(ctx, cfg.timeout)
	r := runOne(runCtx, im, files, w, n, stderr)
	cancel()
	settleCtx, cancel := context.WithTimeout(ctx, cfg.settle)
	r.leaks = len(waitUnbound(settleCtx, dir))
	cancel()
	if err := clearUnder(dir); err != nil {
		return r, err
	}
	return r, nil
}

func sparseFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
