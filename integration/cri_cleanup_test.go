//go:build integration

package integration

import (
	"bufio"
	"context"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// criUnmountUnder lazily unmounts every mount below dir, deepest first. Only
// used on the failure path (a shim killed before it unmounted a rootfs).
func criUnmountUnder(t *testing.T, dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Logf("mountinfo: %v", err)
		return
	}
	defer f.Close()
	var mps []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 5 {
			continue
		}
		mp := criUnescape(fields[4])
		if strings.HasPrefix(mp, dir+"/") {
			mps = append(mps, mp)
		}
	}
	sort.Slice(mps, func(i, j int) bool { return len(mps[i]) > len(mps[j]) })
	for _, mp := range mps {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
			t.Logf("unmount %s: %v", mp, err)
		}
	}
}

// criDetachUnder detaches loop devices whose backing file lies under dir.
// Only the test's own snapshotter creates such files, so these devices are
// the test's; pkg/loopdev's guarded detach still checks devnum, diskseq and
// backing identity, so a device re-used since the listing is left alone.
// Failure path only.
func criDetachUnder(t *testing.T, dir string) {
	infos, err := loopdev.List(nil)
	if err != nil {
		t.Logf("list loop devices: %v", err)
		return
	}
	for _, info := range infos {
		backing := strings.TrimSuffix(info.BackingFile, " (deleted)")
		if !strings.HasPrefix(backing, dir+"/") {
			continue
		}
		rec := loopdev.Record{Path: info.Path, Devnum: info.Devnum, DiskSeq: info.DiskSeq, Backing: info.Backing, Offset: info.Offset}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := loopdev.DetachRecord(ctx, rec, loopdev.DetachOptions{})
		cancel()
		t.Logf("detached leftover %s (%s): %v", info.Path, backing, err)
	}
}

func criUnescape(s string) string {
	return strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(s)
}
