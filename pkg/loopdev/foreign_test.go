package loopdev

// Foreign state on the chosen device: R5, R6.

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/testutil"
)

// R5: a device bound by someone else between get-free and our lock is
// skipped, and that binding is left intact.
func TestR05_NeverClobberForeignBinding(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r05.img", 4<<20)
	other := newImage(t, dir, "tenant.img", 4<<20)
	var tn *tenant
	var hookErr error
	o := Options{faultHook: func(step string, nr int) error {
		if step == stepGetFree && tn == nil && hookErr == nil {
			tn, hookErr = bindTenant(nr, other)
			if errors.Is(hookErr, unix.EBUSY) {
				// Another loop user on the host bound nr first, which is
				// the same race from outside; the hook tries the next nr.
				tn, hookErr = nil, nil
			}
		}
		return nil
	}}
	d := attachT(t, img, o)
	if hookErr != nil {
		t.Fatalf("tenant bind: %v", hookErr)
	}
	if tn == nil {
		t.Fatal("hook never bound a tenant")
	}
	t.Cleanup(tn.release)
	if d.Nr() == tn.nr {
		t.Fatalf("library took loop%d, which the tenant had bound", tn.nr)
	}
	if err := tn.intact(); err != nil {
		t.Fatal(err)
	}
	if err := detachWait(d); err != nil {
		t.Fatal(err)
	}
	if err := tn.intact(); err != nil {
		t.Fatalf("after our Detach: %v", err)
	}
}

// R6: stale partitions on the chosen unbound device are deleted and the
// attempt restarts; the attached device shows exactly the image's partitions.
func TestR06_ZeroStalePartitions(t *testing.T) {
	dir := rootDir(t)
	testRequireBins(t, "addpart", "delpart")
	img := gptImage(t, dir, "r06.img", 32<<20, 512, []gptPart{
		{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 8192},
		{Type: gptTypeLinux, Name: "b", Start: 10240, Len: 8192},
	})
	other := newImage(t, dir, "stale.img", 64<<20)
	// make test runs this suite beside a losetup loop: a round where that
	// loop binds the planted number before the attempt's bound check (the
	// attempt then rightly leaves the foreign device alone, and the
	// partition stays there after losetup -d) proves nothing and is
	// repeated.
	for round := 1; ; round++ {
		d, foreign := r06Round(t, img, other)
		if !foreign {
			r06Check(t, d)
			return
		}
		if err := detachWait(d); err != nil {
			t.Fatal(err)
		}
		if round == 5 {
			t.Fatal("a foreign loop user took the planted number in 5 rounds out of 5")
		}
	}
}

// r06Round plants a stale partition on the number the first get-free
// returns and attaches img. foreign reports that another loop user bound
// that number before our attempt's bound check (the attempt then leaves it
// alone); the planted partition is then removed here.
func r06Round(t *testing.T, img, other string) (d *Device, foreign bool) {
	t.Helper()
	getFree := 0
	staleNr := -1
	var hookErr error
	var logs bytes.Buffer
	o := Options{Partscan: true, Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		faultHook: func(step string, nr int) error {
			if step != stepGetFree {
				return nil
			}
			getFree++
			if staleNr >= 0 || hookErr != nil {
				return nil
			}
			// Leave a partition on the unbound device: bind without partscan,
			// add p3 with BLKPG, clear. The kernel keeps p3 on the unbound disk.
			tn, err := bindTenant(nr, other)
			if errors.Is(err, unix.EBUSY) {
				// Another loop user bound nr first; Attach sees it bound and
				// takes the next free number, where the hook tries again.
				return nil
			}
			if err != nil {
				hookErr = err
				return nil
			}
			out, err := exec.Command("addpart", fmt.Sprintf("/dev/loop%d", nr), "3", "40960", "4096").CombinedOutput()
			tn.release()
			if err != nil {
				hookErr = fmt.Errorf("addpart: %v: %s", err, out)
				return nil
			}
			staleNr = nr
			getFree = 1
			return nil
		}}
	d = attachT(t, img, o)
	if hookErr != nil {
		t.Fatal(hookErr)
	}
	if staleNr < 0 {
		t.Fatal("hook never ran")
	}
	// What the attempt on staleNr met, from its collision record.
	var met string
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "collided") && strings.Contains(line, fmt.Sprintf("device=/dev/loop%d ", staleNr)) {
			met = line
			break
		}
	}
	if strings.Contains(met, "bound by another user") {
		t.Logf("another loop user bound loop%d before our attempt's check", staleNr)
		// Ours to remove: the partition this test planted.
		if out, err := exec.Command("delpart", fmt.Sprintf("/dev/loop%d", staleNr), "3").CombinedOutput(); err != nil {
			t.Logf("delpart loop%d 3: %v: %s", staleNr, err, out)
		}
		return d, true
	}
	if getFree < 2 || !strings.Contains(met, "stale partitions") {
		t.Errorf("stale partitions did not restart the attempt (%d get-free calls; the attempt on loop%d: %q)", getFree, staleNr, met)
	}
	if p := sysPartitions(staleNr); len(p) != 0 {
		t.Errorf("stale partitions %v left on loop%d", p, staleNr)
	}
	return d, false
}

// r06Check: the attached device shows exactly the image's partitions.
func r06Check(t *testing.T, d *Device) {
	t.Helper()
	if !kernelHasPartitionParser() {
		// No GPT parser in this kernel: partitions only come from BLKPG.
		if p := sysPartitions(d.Nr()); len(p) != 0 {
			t.Fatalf("%s carries partitions %v before we added any", d.Path(), p)
		}
		for _, p := range []struct{ nr, start, n uint64 }{{1, 2048, 8192}, {2, 10240, 8192}} {
			if err := d.AddPartition(int(p.nr), p.start*512, p.n*512); err != nil {
				t.Fatal(err)
			}
		}
	}
	parts, err := d.Partitions()
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(parts)
	if len(parts) != 2 || parts[0].Nr != 1 || parts[0].Start != 2048*512 || parts[1].Nr != 2 || parts[1].Start != 10240*512 {
		t.Errorf("partitions %s, want exactly the image's p1@1MiB and p2@5MiB", got)
	}
	if sp := sysPartitions(d.Nr()); len(sp) != 2 {
		t.Errorf("sysfs shows %v", sp)
	}
}

func testRequireBins(t *testing.T, names ...string) {
	t.Helper()
	testutil.RequireBinaries(t, names...)
}
