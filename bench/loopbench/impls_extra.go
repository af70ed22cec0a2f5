package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// attachFloor is the bare minimum a loop attach+detach costs: get-free,
// LOOP_CONFIGURE with autoclear, LOOP_CLR_FD, with no lock, no verification
// and no identity check (so not safe among other loop users: a collision is
// simply retried). Every other row is compared with it.
func attachFloor(_ context.Context, path string) (func() error, error) {
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/loop-control: %w", err)
	}
	defer unix.Close(ctl)
	for attempt := 0; ; attempt++ {
		nr, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		dev, err := unix.Open("/dev/loop"+strconv.Itoa(nr), unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		bf, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			unix.Close(dev)
			return nil, err
		}
		cfg := unix.LoopConfig{Fd: uint32(bf)}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		err = unix.IoctlLoopConfigure(dev, &cfg)
		unix.Close(bf)
		if err == nil {
			return func() error {
				err := unix.IoctlSetInt(dev, unix.LOOP_CLR_FD, 0)
				unix.Close(dev)
				if err != nil {
					return fmt.Errorf("LOOP_CLR_FD loop%d: %w", nr, err)
				}
				return nil
			}, nil
		}
		unix.Close(dev)
		if err != unix.EBUSY || attempt >= 64 {
			return nil, fmt.Errorf("LOOP_CONFIGURE loop%d: %w", nr, err)
		}
	}
}

// sdloop is one bin/sdloop process (systemd 252's loop code through
// libsystemd-shared), driven over a pipe: one per worker.
type sdloop struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func (s *sdloop) call(line string) error {
	if _, err := io.WriteString(s.in, line+"\n"); err != nil {
		return err
	}
	reply, err := s.out.ReadString('\n')
	if err != nil {
		return fmt.Errorf("sdloop: %w", err)
	}
	if reply = strings.TrimSpace(reply); reply != "ok" {
		return fmt.Errorf("sdloop %q: %s", line, reply)
	}
	return nil
}

// sdloopPool hands each worker its own harness process.
var sdloopPool = struct {
	sync.Mutex
	path string
	free []*sdloop
}{path: "bin/sdloop"}

func getSdloop() (*sdloop, error) {
	sdloopPool.Lock()
	defer sdloopPool.Unlock()
	if n := len(sdloopPool.free); n > 0 {
		s := sdloopPool.free[n-1]
		sdloopPool.free = sdloopPool.free[:n-1]
		return s, nil
	}
	cmd := exec.Command(sdloopPool.path)
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s (make bench-loop builds it): %w", sdloopPool.path, err)
	}
	return &sdloop{cmd: cmd, in: in, out: bufio.NewReader(out)}, nil
}

func putSdloop(s *sdloop) {
	sdloopPool.Lock()
	sdloopPool.free = append(sdloopPool.free, s)
	sdloopPool.Unlock()
}

// stopSdloops ends every harness (EOF makes each exit).
func stopSdloops() {
	sdloopPool.Lock()
	defer sdloopPool.Unlock()
	for _, s := range sdloopPool.free {
		s.in.Close()
		_ = s.cmd.Wait()
	}
	sdloopPool.free = nil
}

// sdloopRoundTrip measures the pipe round trip the systemd row pays on top
// of systemd's own work, twice per cycle.
func sdloopRoundTrip() (time.Duration, error) {
	s, err := getSdloop()
	if err != nil {
		return 0, err
	}
	defer putSdloop(s)
	var ds []time.Duration
	for range 200 {
		t0 := time.Now()
		if err := s.call("n"); err != nil {
			return 0, err
		}
		ds = append(ds, time.Since(t0))
	}
	return percentile(ds, 0.5), nil
}

// attachSystemd attaches with systemd 252's loop_device_make_by_path and
// detaches with loop_device_unref (its locked teardown), in C.
func attachSystemd(_ context.Context, path string) (func() error, error) {
	s, err := getSdloop()
	if err != nil {
		return nil, err
	}
	if err := s.call("a " + path); err != nil {
		putSdloop(s)
		return nil, err
	}
	return func() error {
		defer putSdloop(s)
		return s.call("d")
	}, nil
}

// loopctlPath is the loopctl binary of the process rows.
var loopctlPath = "bin/loopctl"

// attachLoopctl runs `loopctl attach F` and `loopctl detach D` as two
// processes, the pair compared with `losetup -f --show F` + `losetup -d D`.
func attachLoopctl(ctx context.Context, path string) (func() error, error) {
	out, err := exec.CommandContext(ctx, loopctlPath, "attach", "--tag", "loopbench", path).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("loopctl attach %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	dev := strings.TrimSpace(string(out))
	if !strings.HasPrefix(dev, "/dev/loop") {
		return nil, fmt.Errorf("loopctl attach %s printed %q", path, dev)
	}
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if out, err := exec.CommandContext(ctx, loopctlPath, "detach", dev).CombinedOutput(); err != nil {
			return fmt.Errorf("loopctl detach %s: %w: %s", dev, err, strings.TrimSpace(string(out)))
		}
		return nil
	}, nil
}
