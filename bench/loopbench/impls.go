package main

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/mount"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// impl is one loop-device implementation under test. attach binds path
// to a free loop device and returns the function that detaches it.
type impl struct {
	name   string
	attach func(ctx context.Context, path string) (detach func() error, err error)
}

var impls = map[string]impl{
	"floor":            {name: "floor", attach: attachFloor},
	"loopkit":          {name: "loopkit", attach: attachLoopkit},
	"loopkit-buffered": {name: "loopkit-buffered", attach: attachLoopkitBuffered},
	"containerd":       {name: "containerd", attach: attachContainerd},
	"systemd":          {name: "systemd", attach: attachSystemd},
	"losetup":          {name: "losetup", attach: attachLosetup},
	"loopctl":          {name: "loopctl", attach: attachLoopctl},
}

// implOrder is the order of the table rows; containerd is the baseline of
// the in-process rows, floor the bare kernel cost; losetup and loopctl run
// two processes a cycle.
var implOrder = []string{"floor", "loopkit", "loopkit-buffered", "containerd", "systemd", "losetup", "loopctl"}

// attachLoopkit uses pkg/loopdev with its defaults (autoclear, direct I/O
// where the backing supports it, locked allocation, verification) and the
// full locked teardown.
func attachLoopkit(ctx context.Context, path string) (func() error, error) {
	d, err := loopdev.Attach(ctx, path, loopdev.Options{Access: loopdev.AccessReadWrite})
	if err != nil {
		return nil, err
	}
	return func() error { return d.Detach(ctx) }, nil
}

// attachLoopkitBuffered is loopkit with direct I/O off, as containerd and
// losetup attach by default: it separates the cost of switching the
// backing to direct I/O from the rest.
func attachLoopkitBuffered(ctx context.Context, path string) (func() error, error) {
	off := false
	d, err := loopdev.Attach(ctx, path, loopdev.Options{Access: loopdev.AccessReadWrite, DirectIO: &off})
	if err != nil {
		return nil, err
	}
	return func() error { return d.Detach(ctx) }, nil
}

// attachContainerd uses containerd v2 core/mount: AttachLoopDevice runs
// SetupLoop with no autoclear and closes its fd; DetachLoopDevice opens the
// device by path and issues LOOP_CLR_FD.
func attachContainerd(_ context.Context, path string) (func() error, error) {
	dev, err := mount.AttachLoopDevice(path)
	if err != nil {
		return nil, err
	}
	return func() error { return mount.DetachLoopDevice(dev) }, nil
}

// attachLosetup execs util-linux losetup.
func attachLosetup(ctx context.Context, path string) (func() error, error) {
	out, err := exec.CommandContext(ctx, "losetup", "-f", "--show", path).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("losetup -f --show %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	dev := strings.TrimSpace(string(out))
	if !strings.HasPrefix(dev, "/dev/loop") {
		return nil, fmt.Errorf("losetup -f --show %s printed %q", path, dev)
	}
	return func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if out, err := exec.CommandContext(ctx, "losetup", "-d", dev).CombinedOutput(); err != nil {
			return fmt.Errorf("losetup -d %s: %w: %s", dev, err, strings.TrimSpace(string(out)))
		}
		return nil
	}, nil
}
