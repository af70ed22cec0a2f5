package loopdev

// Partitions and identity: R10, R11.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/uevent"
)

// kevent is a kernel uevent as the test's own listener parsed it.
type kevent struct {
	action, devpath string
	env             map[string]string
}

// ueventMonitor is the test's independent NETLINK_KOBJECT_UEVENT listener
// (what `udevadm monitor --kernel` shows).
type ueventMonitor struct {
	fd     int
	mu     sync.Mutex
	events []kevent
	maxSeq uint64
	lost   bool
	done   chan struct{}
}

func monitorUevents(t testing.TB) *ueventMonitor {
	t.Helper()
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		t.Fatal(err)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	m := &ueventMonitor{fd: fd, done: make(chan struct{})}
	go m.run()
	t.Cleanup(m.stop)
	return m
}

func (m *ueventMonitor) run() {
	defer close(m.done)
	buf := make([]byte, 64<<10)
	for {
		n, from, err := unix.Recvfrom(m.fd, buf, 0)
		if err == unix.ENOBUFS {
			m.mu.Lock()
			m.lost = true
			m.mu.Unlock()
			continue
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue
		}
		fields := bytes.Split(buf[:n], []byte{0})
		act, dp, ok := strings.Cut(string(fields[0]), "@")
		if !ok {
			continue
		}
		ev := kevent{action: act, devpath: dp, env: map[string]string{}}
		for _, f := range fields[1:] {
			if k, v, ok := strings.Cut(string(f), "="); ok {
				ev.env[k] = v
			}
		}
		seq, _ := strconv.ParseUint(ev.env["SEQNUM"], 10, 64)
		m.mu.Lock()
		m.events = append(m.events, ev)
		m.maxSeq = max(m.maxSeq, seq)
		m.mu.Unlock()
	}
}

func (m *ueventMonitor) stop() {
	_ = unix.Shutdown(m.fd, unix.SHUT_RDWR)
	unix.Close(m.fd)
}

// waitSeq waits (bounded) until every event up to seq was received.
func (m *ueventMonitor) waitSeq(t testing.TB, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		m.mu.Lock()
		got, lost := m.maxSeq, m.lost
		m.mu.Unlock()
		if lost {
			t.Fatal("uevent listener overflowed (ENOBUFS)")
		}
		if got >= seq {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("uevents up to %d never arrived (last %d)", seq, got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ueventSeqnum(t testing.TB) uint64 {
	t.Helper()
	v, err := strconv.ParseUint(sysRead("/sys/kernel/uevent_seqnum"), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// fivePartitions is the layout of the heavy-duty fixture, in 512-byte sectors.
var fivePartitions = []gptPart{
	{Type: gptTypeESP, Name: "esp", Start: 2048, Len: 65536},
	{Type: gptTypeXBOOTLDR, Name: "xbootldr", Start: 67584, Len: 65536},
	{Type: gptTypeSwap, Name: "swap", Start: 133120, Len: 65536},
	{Type: gptTypeRootX64, Name: "root-x86-64", Start: 198656, Len: 65536},
	{Type: gptTypeHome, Name: "home", Start: 264192, Len: 65536},
}

// addPartitions creates the table's partitions synchronously;
// the kernel's own scan, when it has a GPT parser, makes this a no-op (EBUSY).
func addPartitions(d *Device, parts []gptPart) error {
	for i, p := range parts {
		if err := d.AddPartition(i+1, p.Start*512, p.Len*512); err != nil {
			return err
		}
	}
	return nil
}

// R10: partitions without flapping. During 200 attaches of a 5-partition
// image, every partition of every attachment is added exactly once and never
// removed before our Detach.
func TestR10_PartscanWithoutFlapping(t *testing.T) {
	dir := rootDir(t)
	requireUdevIfAsked(t)
	img := gptImage(t, dir, "r10.img", 256<<20, 512, fivePartitions)
	mon := monitorUevents(t)
	iterations := 200
	type attach struct {
		nr       int
		diskseq  uint64
		boundary uint64 // seqnum just before Detach
	}
	var runs []attach
	kernelScan := kernelHasPartitionParser()
	for i := range iterations {
		d, err := Attach(testCtx(t, time.Minute), img, Options{Partscan: true, Lock: LockShared})
		if err != nil {
			t.Fatalf("iteration %d: %v", i, err)
		}
		if !kernelScan {
			// This kernel has no GPT parser: partitions come from BLKPG.
			if err := addPartitions(d, fivePartitions); err != nil {
				_ = d.Detach(bg)
				t.Fatal(err)
			}
		}
		parts, err := d.Partitions()
		if err != nil || len(parts) != 5 {
			_ = d.Detach(bg)
			t.Fatalf("iteration %d: partitions %v, %v", i, parts, err)
		}
		if d.DiskSeq() == 0 {
			_ = d.Detach(bg)
			t.Skip("kernel without diskseq: cannot attribute uevents")
		}
		runs = append(runs, attach{d.Nr(), d.DiskSeq(), ueventSeqnum(t)})
		if err := d.Detach(bg); err != nil && !errors.Is(err, ErrDetachDeferred) {
			t.Fatalf("iteration %d: detach: %v", i, err)
		}
	}
	mon.waitSeq(t, ueventSeqnum(t))
	mon.mu.Lock()
	defer mon.mu.Unlock()
	for _, r := range runs {
		prefix := fmt.Sprintf("/devices/virtual/block/loop%d/loop%dp", r.nr, r.nr)
		adds := map[string]int{}
		removes := 0
		for _, ev := range mon.events {
			if !strings.HasPrefix(ev.devpath, prefix) || ev.env["DEVTYPE"] != "partition" || ev.env["DISKSEQ"] != strconv.FormatUint(r.diskseq, 10) {
				continue
			}
			seq, _ := strconv.ParseUint(ev.env["SEQNUM"], 10, 64)
			if seq > r.boundary {
				continue
			}
			switch ev.action {
			case "add":
				adds[ev.env["PARTN"]]++
			case "remove":
				removes++
			}
		}
		for pn := 1; pn <= 5; pn++ {
			if n := adds[strconv.Itoa(pn)]; n != 1 {
				t.Errorf("loop%d diskseq %d: partition %d added %d times before detach", r.nr, r.diskseq, pn, n)
			}
		}
		if removes != 0 {
			t.Errorf("loop%d diskseq %d: %d partition removes before detach (flapping)", r.nr, r.diskseq, removes)
		}
	}
}

// R11: attachment identity.
func TestR11_AttachmentIdentity(t *testing.T) {
	dir := rootDir(t)
	img := gptImage(t, dir, "r11.img", 32<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 8192}})
	ctx := testCtx(t, time.Minute)

	d1 := attachT(t, img, Options{Partscan: true})
	if d1.DiskSeq() == 0 {
		t.Skip("kernel without diskseq")
	}
	if got := sysDiskseq(d1.Nr()); got != d1.DiskSeq() {
		t.Fatalf("DiskSeq() %d, sysfs %d", d1.DiskSeq(), got)
	}
	if err := d1.AddPartition(1, 2048*512, 8192*512); err != nil {
		t.Fatal(err)
	}
	pf, err := d1.OpenPartition(ctx, 1, unix.O_RDONLY)
	if err != nil {
		t.Fatalf("OpenPartition on the live attachment: %v", err)
	}
	pf.Close()
	rec1 := d1.Record()
	if err := detachWait(d1); err != nil {
		t.Fatal(err)
	}
	// Reattach until the same number comes back (get-free prefers it).
	var d2 *Device
	var extra []*Device
	for range 8 {
		d := attachT(t, img, Options{Partscan: true})
		if d.Nr() == rec1.nrOrMinus() {
			d2 = d
			break
		}
		extra = append(extra, d)
	}
	for _, e := range extra {
		_ = e.Detach(bg)
	}
	if d2 == nil {
		t.Skipf("loop%d never came back (busy host)", rec1.nrOrMinus())
	}
	if d2.DiskSeq() <= rec1.DiskSeq {
		t.Errorf("diskseq %d after reattach, not greater than %d", d2.DiskSeq(), rec1.DiskSeq)
	}
	if err := d2.AddPartition(1, 2048*512, 8192*512); err != nil {
		t.Fatal(err)
	}
	if f, err := d1.OpenPartition(ctx, 1, unix.O_RDONLY); err == nil {
		f.Close()
		t.Error("the old handle opened the new attachment's partition")
	} else {
		t.Logf("old handle: %v", err)
	}
	if err := Verify(rec1); !errors.Is(err, ErrReused) {
		t.Errorf("Verify(old record): %v, want ErrReused", err)
	}
	if _, err := Open(ctx, rec1.Path, OpenOptions{ExpectDiskSeq: rec1.DiskSeq}); !errors.Is(err, ErrReused) {
		t.Errorf("Open with the old diskseq: %v, want ErrReused", err)
	}
	// A record with the new diskseq but an old devnum is no match either.
	bad := d2.Record()
	bad.Devnum++
	if err := Verify(bad); err == nil {
		t.Error("Verify accepted a record with the wrong devnum")
	}

	t.Run("uevent-judge", func(t *testing.T) {
		ev := func(diskseq uint64) *uevent.Event {
			return &uevent.Event{Action: "add", Devpath: fmt.Sprintf("/devices/virtual/block/loop%d/loop%dp1", d2.Nr(), d2.Nr()),
				Env: map[string]string{"SUBSYSTEM": "block", "DEVTYPE": "partition", "PARTN": "1", "DISKSEQ": strconv.FormatUint(diskseq, 10)}}
		}
		if ours, err := d2.judgeUevent(ev(d2.DiskSeq() - 1)); ours || err != nil {
			t.Errorf("replayed event of an earlier attachment: ours=%v %v, want it skipped", ours, err)
		}
		if ours, err := d2.judgeUevent(ev(d2.DiskSeq())); !ours || err != nil {
			t.Errorf("our own event: ours=%v %v", ours, err)
		}
		if _, err := d2.judgeUevent(ev(d2.DiskSeq() + 1)); !errors.Is(err, ErrReused) {
			t.Errorf("event with a larger diskseq: %v, want ErrReused", err)
		}
		other := ev(d2.DiskSeq() + 1)
		other.Devpath = fmt.Sprintf("/devices/virtual/block/loop%d/loop%dp1", d2.Nr()+1000, d2.Nr()+1000)
		if ours, err := d2.judgeUevent(other); ours || err != nil {
			t.Errorf("another disk's event: ours=%v %v", ours, err)
		}
	})

	t.Run("wait-partitions", func(t *testing.T) {
		d := attachT(t, img, Options{Partscan: true, WaitPartitions: true})
		added := make(chan error, 1)
		go func() {
			time.Sleep(50 * time.Millisecond)
			added <- d.AddPartition(1, 2048*512, 8192*512)
		}()
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		werr := d.WaitPartitions(wctx, []int{1})
		if err := <-added; err != nil {
			t.Fatal(err)
		}
		if werr != nil {
			t.Fatalf("WaitPartitions: %v", werr)
		}
		short, cancel2 := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel2()
		if err := d.WaitPartitions(short, []int{1, 2}); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("waiting for a partition that never comes: %v, want DeadlineExceeded", err)
		}
	})

	t.Run("no-diskseq-fences", func(t *testing.T) {
		before := ueventSeqnum(t)
		var ts unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		d := attachT(t, img, Options{forceNoDiskseq: true})
		after := ueventSeqnum(t)
		var ts2 unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts2)
		f := d.Fences()
		if d.DiskSeq() != 0 {
			t.Errorf("DiskSeq() %d with diskseq forced off", d.DiskSeq())
		}
		if f.SeqnumNotBefore == math.MaxUint64 || f.SeqnumNotBefore < before || f.SeqnumNotBefore > after {
			t.Errorf("seqnum fence %d outside [%d, %d]", f.SeqnumNotBefore, before, after)
		}
		if f.TimeNotBefore < time.Duration(ts.Nano())-time.Microsecond || f.TimeNotBefore > time.Duration(ts2.Nano()) {
			t.Errorf("time fence %v outside [%v, %v]", f.TimeNotBefore, time.Duration(ts.Nano()), time.Duration(ts2.Nano()))
		}
		// Stale events (SEQNUM <= fence) are no proof of anything.
		stale := &uevent.Event{Action: "remove", Devpath: fmt.Sprintf("/devices/virtual/block/loop%d/loop%dp1", d.Nr(), d.Nr()),
			Env: map[string]string{"SUBSYSTEM": "block", "DEVTYPE": "partition", "PARTN": "1", "SEQNUM": strconv.FormatUint(f.SeqnumNotBefore, 10)}}
		if ours, err := d.judgeUevent(stale); ours || err != nil {
			t.Errorf("stale event: ours=%v %v, want it ignored", ours, err)
		}
		fresh := &uevent.Event{Action: "add", Devpath: stale.Devpath,
			Env: map[string]string{"SUBSYSTEM": "block", "DEVTYPE": "partition", "PARTN": "1", "SEQNUM": strconv.FormatUint(f.SeqnumNotBefore+1, 10)}}
		if ours, err := d.judgeUevent(fresh); !ours || err != nil {
			t.Errorf("event past the fence: ours=%v %v, want it counted", ours, err)
		}
		// Guarded detach by record falls back to backing identity.
		rec := d.Record()
		if rec.DiskSeq != 0 {
			t.Fatalf("record carries diskseq %d", rec.DiskSeq)
		}
		if err := Verify(rec); err != nil {
			t.Errorf("Verify of a live record without diskseq: %v", err)
		}
		if err := detachWait(d); err != nil {
			t.Fatal(err)
		}
	})
}
