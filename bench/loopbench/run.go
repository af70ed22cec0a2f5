package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// result is one (implementation, workers) run.
type result struct {
	impl    string
	workers int
	ops     int // cycles started
	errors  int // attach or detach errors
	// deferred counts detaches the kernel accepted but deferred because
	// another opener (udev's probe) still held the device. Only loopkit
	// reports this; the others' LOOP_CLR_FD defers the same way silently.
	// They count as successful cycles: leaks shows whether they completed.
	deferred int
	leaks    int // devices still bound to the bench files after the run
	elapsed  time.Duration
	// Latencies of successful steps.
	cycle, attach, detach []time.Duration
	// The first few distinct error messages.
	errorSamples []string
	// Per interleaved round: the cycle p50 and p99 of that round.
	roundP50, roundP99 []time.Duration
}

// medianOf is the median of the rounds' values (0 without rounds).
func medianOf(ds []time.Duration) time.Duration {
	return percentile(append([]time.Duration(nil), ds...), 0.5)
}

// opsPerSec counts completed cycles (errors included: they took time too).
func (r result) opsPerSec() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.ops) / r.elapsed.Seconds()
}

// merge adds the counts and samples of another batch of the same row.
func (r result) merge(o result) result {
	if r.impl == "" {
		return o
	}
	r.ops += o.ops
	r.errors += o.errors
	r.deferred += o.deferred
	r.leaks += o.leaks
	r.elapsed += o.elapsed
	r.cycle = append(r.cycle, o.cycle...)
	r.roundP50 = append(r.roundP50, o.roundP50...)
	r.roundP99 = append(r.roundP99, o.roundP99...)
	r.attach = append(r.attach, o.attach...)
	r.detach = append(r.detach, o.detach...)
	for _, s := range o.errorSamples {
		if len(r.errorSamples) < 5 && !slices.Contains(r.errorSamples, s) {
			r.errorSamples = append(r.errorSamples, s)
		}
	}
	return r
}

// runOne runs n attach+detach cycles of im over workers goroutines; worker w
// only ever attaches files[w], so the implementations race for device
// numbers, not for files.
func runOne(ctx context.Context, im impl, files []string, workers, n int, progress io.Writer) result {
	res := result{impl: im.name, workers: workers}
	var (
		next    atomic.Int64
		mu      sync.Mutex
		wg      sync.WaitGroup
		samples = map[string]bool{}
	)
	record := func(err error, cyc, att, det time.Duration, ok bool) {
		mu.Lock()
		defer mu.Unlock()
		res.ops++
		if !ok {
			res.errors++
			msg := err.Error()
			if !samples[msg] && len(res.errorSamples) < 5 {
				samples[msg] = true
				res.errorSamples = append(res.errorSamples, msg)
			}
			if att > 0 {
				res.attach = append(res.attach, att)
			}
			return
		}
		res.cycle = append(res.cycle, cyc)
		res.attach = append(res.attach, att)
		res.detach = append(res.detach, det)
	}

	start := time.Now()
	done := make(chan struct{})
	go reportProgress(progress, im.name, workers, n, &next, done)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(path string) {
			defer wg.Done()
			for next.Add(1) <= int64(n) && ctx.Err() == nil {
				t0 := time.Now()
				detach, err := im.attach(ctx, path)
				t1 := time.Now()
				if err != nil {
					record(fmt.Errorf("attach: %w", err), 0, 0, 0, false)
					continue
				}
				err = detach()
				t2 := time.Now()
				if errors.Is(err, loopdev.ErrDetachDeferred) {
					mu.Lock()
					res.deferred++
					mu.Unlock()
					err = nil
				}
				if err != nil {
					record(fmt.Errorf("detach: %w", err), 0, t1.Sub(t0), 0, false)
					continue
				}
				record(nil, t2.Sub(t0), t1.Sub(t0), t2.Sub(t1), true)
			}
		}(files[w])
	}
	wg.Wait()
	close(done)
	res.elapsed = time.Since(start)
	return res
}

func reportProgress(w io.Writer, name string, workers, n int, next *atomic.Int64, done <-chan struct{}) {
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			started := min(next.Load(), int64(n))
			fmt.Fprintf(w, "  %s workers=%d: %d/%d cycles started\n", name, workers, started, n)
		}
	}
}

// percentile returns the nearest-rank q-quantile (0 < q <= 1) of ds, or 0
// for an empty sample. ds is sorted in place.
func percentile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	rank := int(q*float64(len(ds)) + 0.999999999)
	rank = max(1, min(rank, len(ds)))
	return ds[rank-1]
}
