package loopdev

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// Poll interval for LOCK_NB polling: start small, double, cap. systemd blocks
// forever in flock; a stuck holder would wedge every allocation, so every
// wait here ends with the caller's context.
// The cap is low because udev workers take LOCK_SH on a whole disk back to
// back: a waiter for LOCK_EX that sleeps 50 ms misses the short gaps and
// starves (seen with 8 workers under a 32-goroutine stress run).
const (
	lockPollMin = 100 * time.Microsecond
	lockPollMax = 2 * time.Millisecond
)

// flockPoll takes a flock with LOCK_NB, polling until ctx is done. With
// nonBlocking it tries once and returns EWOULDBLOCK.
func flockPoll(ctx context.Context, fd int, how int, nonBlocking bool) error {
	delay := lockPollMin
	for {
		err := unix.Flock(fd, how|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			return os.NewSyscallError("flock", err)
		}
		if nonBlocking && err == unix.EWOULDBLOCK {
			return os.NewSyscallError("flock", err)
		}
		// Jitter keeps waiters from polling in lockstep.
		if err := sleepCtx(ctx, delay/2+rand.N(delay/2+1)); err != nil {
			return fmt.Errorf("wait for lock: %w", err)
		}
		delay = min(delay*2, lockPollMax)
	}
}

// sleepCtx waits for d, or returns ctx's error as soon as ctx is done: the
// one sleep of every retry and poll loop of the package (each keeps its own
// interval formula, most of them systemd's).
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func lockHow(s LockState) int {
	if s == LockShared {
		return unix.LOCK_SH
	}
	return unix.LOCK_EX
}

// reopen opens a new open file description on f's inode through
// /proc/self/fd: unlike dup, it has its own file flags and its own flock.
func reopen(f *os.File, flags int) (*os.File, error) { return reopenNamed(f, flags, f.Name()) }

func reopenNamed(f *os.File, flags int, name string) (*os.File, error) {
	p := fmt.Sprintf("/proc/self/fd/%d", f.Fd())
	fd, err := unix.Open(p, flags|unix.O_CLOEXEC, 0)
	runtime.KeepAlive(f)
	if err != nil {
		return nil, &os.PathError{Op: "reopen", Path: f.Name(), Err: err}
	}
	return os.NewFile(uintptr(fd), name), nil
}

// ofd is an open file description the package uses internally (lock fds,
// the control fd, probes) as a raw fd: *os.File would register it with the
// poller and give it a finalizer, which costs more than the fd's use, and a
// finalizer must never close a lock fd behind our back.
type ofd struct {
	fd     int
	queued bool // holds a controlQueue slot, released by Close
}

func (o *ofd) Fd() uintptr { return uintptr(o.fd) }

func (o *ofd) Close() error {
	if o == nil || o.fd < 0 {
		return nil
	}
	err := unix.Close(o.fd)
	o.fd = -1
	if o.queued {
		o.queued = false
		<-controlQueue
	}
	return err
}

// reopenOFD is reopen for an internal fd.
func reopenOFD(f *os.File, flags int) (*ofd, error) {
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), flags|unix.O_CLOEXEC, 0)
	runtime.KeepAlive(f)
	if err != nil {
		return nil, &os.PathError{Op: "reopen", Path: f.Name(), Err: err}
	}
	return &ofd{fd: fd}, nil
}

// controlQueue is the process-local half of the /dev/loop-control lock: a
// one-slot semaphore that the goroutines of this process pass in FIFO order
// before they poll the host-wide flock. flock has no fairness, and goroutines
// polling it with LOCK_NB starve each other (32 workers: p99 ~100 ms, ~5x
// the p50 of a queued run). It holds no data; it is a lock, not state.
var controlQueue = make(chan struct{}, 1)

// openControl opens a private /dev/loop-control and locks it: first this
// process's queue, then the flock that cooperating processes (systemd,
// other loopkit users) share. A new OFD for every call: a shared fd would
// share the flock and remove the serialization. Close releases both.
func openControl(ctx context.Context) (*ofd, error) {
	select {
	case controlQueue <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("lock /dev/loop-control: %w", ctx.Err())
	}
	fd, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		<-controlQueue
		if err == unix.ENOENT {
			return nil, fmt.Errorf("open /dev/loop-control: %w (is the loop module loaded? try: modprobe loop)", err)
		}
		return nil, &os.PathError{Op: "open", Path: "/dev/loop-control", Err: err}
	}
	ctl := &ofd{fd: fd, queued: true}
	if err := flockPoll(ctx, fd, unix.LOCK_EX, false); err != nil {
		ctl.Close()
		return nil, fmt.Errorf("lock /dev/loop-control: %w", err)
	}
	return ctl, nil
}
