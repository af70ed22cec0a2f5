package loopdev

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/uevent"
	"golang.org/x/sys/unix"
)

// ueventSocket receives kernel uevents (NETLINK_KOBJECT_UEVENT, group 1).
type ueventSocket struct{ fd int }

func openUevents() (*ueventSocket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, os.NewSyscallError("socket uevent", err)
	}
	// A large buffer makes overflow (ENOBUFS) rare; the sysfs rescan covers it.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("bind uevent", err)
	}
	return &ueventSocket{fd: fd}, nil
}

func (u *ueventSocket) Close() {
	if u != nil && u.fd >= 0 {
		unix.Close(u.fd)
		u.fd = -1
	}
}

// WaitPartitions waits until every partition number in nrs exists for this
// attachment. It trusts only uevents carrying this attachment's DISKSEQ (or,
// without diskseq, a SEQNUM past the fence), and rescans sysfs as the
// fallback. It needs Options.WaitPartitions at attach; without the socket it
// polls sysfs. A larger DISKSEQ means the device was reused: ErrReused.
func (d *Device) WaitPartitions(ctx context.Context, nrs []int) error {
	want := map[int]bool{}
	for _, n := range nrs {
		want[n] = true
	}
	have := func() (bool, error) {
		if err := d.checkAlive(); err != nil {
			return false, err
		}
		parts, err := listPartitions(d.sysfsDir(), d.kernelName())
		if err != nil {
			return false, err
		}
		got := map[int]bool{}
		for _, p := range parts {
			got[p.Nr] = true
		}
		if err := d.checkAlive(); err != nil {
			return false, err
		}
		for n := range want {
			if !got[n] {
				return false, nil
			}
		}
		return true, nil
	}
	buf := make([]byte, 64*1024)
	for {
		ok, err := have()
		if err != nil || ok {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("wait for partitions of %s: %w", d.path, ctx.Err())
		}
		timeout := 50
		if dl, ok := ctx.Deadline(); ok {
			timeout = min(timeout, int(time.Until(dl)/time.Millisecond)+1)
		}
		polled, err := d.drainUevents(max(timeout, 1), buf)
		if err != nil {
			return err
		}
		if !polled {
			if err := sleepCtx(ctx, 10*time.Millisecond); err != nil {
				return fmt.Errorf("wait for partitions of %s: %w", d.path, err)
			}
		}
	}
}

// drainUevents waits up to timeout ms for uevents and judges every queued
// one, with d.mu held so that a concurrent Detach cannot close the socket
// under it. polled is false when there is no socket to wait on.
func (d *Device) drainUevents(timeout int, buf []byte) (polled bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.errClosedLocked(); err != nil {
		return false, err
	}
	if d.uevents == nil || d.uevents.fd < 0 {
		return false, nil
	}
	pfd := []unix.PollFd{{Fd: int32(d.uevents.fd), Events: unix.POLLIN}}
	if _, err := unix.Poll(pfd, timeout); err != nil && err != unix.EINTR {
		return true, os.NewSyscallError("poll uevent", err)
	}
	for {
		n, from, err := unix.Recvfrom(d.uevents.fd, buf, unix.MSG_DONTWAIT)
		if err == unix.EAGAIN || err == unix.EINTR {
			return true, nil
		}
		if err == unix.ENOBUFS {
			return true, nil // overflow: the sysfs rescan at the loop head catches up
		}
		if err != nil {
			return true, os.NewSyscallError("recv uevent", err)
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue // only the kernel (port id 0) is trusted
		}
		ev, err := uevent.Parse(buf[:n])
		if err != nil {
			continue
		}
		// Presence is always read from sysfs (checked against our diskseq)
		// at the loop head; an event only says when to look.
		if _, err := d.judgeUevent(ev); err != nil {
			return true, err
		}
	}
}

// judgeUevent classifies a uevent for this attachment's partitions: ours is
// true for an event of this attachment (its DISKSEQ equals ours; without
// diskseq, its SEQNUM is past the fence read before the attach), which
// prompts a sysfs rescan; an event with a larger DISKSEQ proves the device
// was reused (ErrReused); everything else (other disks, replayed events of
// earlier attachments) is ignored.
func (d *Device) judgeUevent(ev *uevent.Event) (ours bool, err error) {
	if ev.Env["SUBSYSTEM"] != "block" || ev.Env["DEVTYPE"] != "partition" {
		return false, nil
	}
	if !strings.HasPrefix(ev.Devpath, "/devices/virtual/block/loop"+strconv.Itoa(d.nr)+"/") {
		return false, nil
	}
	if d.diskseq != 0 {
		seq, err := strconv.ParseUint(ev.Env["DISKSEQ"], 10, 64)
		if err != nil {
			return false, nil
		}
		if seq > d.diskseq {
			return false, fmt.Errorf("%s: uevent diskseq %d newer than ours %d: %w", d.path, seq, d.diskseq, ErrReused)
		}
		return seq == d.diskseq, nil
	}
	// Kernels without diskseq: the uevent seqnum fence read before the attach.
	seq, err := strconv.ParseUint(ev.Env["SEQNUM"], 10, 64)
	return err == nil && seq > d.fences.SeqnumNotBefore, nil
}
