package loopdev

// Allocation: R1, R2.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// acceptableDetach: nil, or, while someone else (udevd, a chaos actor,
// another package's List) may hold the device open at LOOP_CLR_FD, the
// truthful "deferred" outcome; callers then check the unbind happens.
func acceptableDetach(err error, openersPossible bool) bool {
	return err == nil || (openersPossible && errors.Is(err, ErrDetachDeferred))
}

// attachRound attaches img read-only from n goroutines at once, checks every
// device is distinct and really ours (sysfs), then detaches them all.
func attachRound(img string, n int, udev bool) error {
	devs := make([]*Device, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			devs[i], errs[i] = Attach(ctx, img, Options{Access: AccessReadOnly})
		})
	}
	wg.Wait()
	var problems []error
	seen := map[string]bool{}
	for i, d := range devs {
		if errs[i] != nil {
			problems = append(problems, fmt.Errorf("attach %d: %w", i, errs[i]))
			continue
		}
		if seen[d.Path()] {
			problems = append(problems, fmt.Errorf("device %s handed out twice", d.Path()))
		}
		seen[d.Path()] = true
		bf, bound := sysBacking(d.Nr())
		if !bound || bf != img {
			problems = append(problems, fmt.Errorf("%s bound to %q (bound=%v), want %s", d.Path(), bf, bound, img))
		}
		if d.DiskSeq() != 0 && sysDiskseq(d.Nr()) != d.DiskSeq() {
			problems = append(problems, fmt.Errorf("%s diskseq %d, handle says %d", d.Path(), sysDiskseq(d.Nr()), d.DiskSeq()))
		}
		if sysAttr(d.Nr(), "ro") != "1" {
			problems = append(problems, fmt.Errorf("%s not read-only", d.Path()))
		}
	}
	for i, d := range devs {
		if errs[i] != nil {
			continue
		}
		wg.Go(func() {
			// Another program (udevd, another package's List) may hold the
			// device at the clear: deferred is truthful; the unbind is
			// checked at the end of the test.
			if err := d.Detach(bg); !acceptableDetach(err, true) {
				errs[i] = fmt.Errorf("detach %s: %w", d.Path(), err)
			}
		})
	}
	wg.Wait()
	for i := range devs {
		if devs[i] != nil && errs[i] != nil {
			problems = append(problems, errs[i])
		}
	}
	return errors.Join(problems...)
}

// startChildren re-executes the test binary as helper processes running the
// named test, configured through env.
func startChildren(t *testing.T, n int, test, envKey, envVal string) []*exec.Cmd {
	t.Helper()
	var cmds []*exec.Cmd
	for i := range n {
		cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), envKey+"="+envVal, "LOOPKIT_TEST_CHILD_INDEX="+strconv.Itoa(i))
		out := &strings.Builder{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
		t.Cleanup(func() {
			if cmd.ProcessState == nil {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
			}
		})
	}
	return cmds
}

func waitChildren(t *testing.T, cmds []*exec.Cmd) {
	t.Helper()
	for i, c := range cmds {
		err := c.Wait()
		out := c.Stdout.(*strings.Builder).String()
		if err != nil || !strings.Contains(out, "\nPASS") && !strings.HasPrefix(out, "PASS") {
			t.Errorf("child %d: %v\n%s", i, err, out)
		}
	}
}

// R1: 64 goroutines plus 4 processes attach the same image read-only at once;
// every call succeeds, every device is distinct, no EBUSY reaches a caller.
func TestR01_BoundedRetriedAllocation(t *testing.T) {
	dir := rootDir(t)
	udev := requireUdevIfAsked(t)
	img := newImage(t, dir, "r01.img", 8<<20)
	rounds := 5
	if scaled() {
		rounds = 20
	}
	start := filepath.Join(dir, "start")
	kids := startChildren(t, 4, "TestR01Child", "LOOPKIT_TEST_R01_CHILD",
		fmt.Sprintf("%s|%s|%d|%d", img, start, rounds, 8))
	if err := os.WriteFile(start, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for r := range rounds {
		if err := attachRound(img, 64, udev); err != nil {
			t.Fatalf("round %d: %v", r, err)
		}
	}
	waitChildren(t, kids)
	settleUdev()
	waitNoBindings(t, img, 10*time.Second)
}

// TestR01Child is the helper process of TestR01 (skipped otherwise).
func TestR01Child(t *testing.T) {
	spec := os.Getenv("LOOPKIT_TEST_R01_CHILD")
	if spec == "" {
		t.Skip("helper process for TestR01_BoundedRetriedAllocation")
	}
	f := strings.Split(spec, "|")
	img, start := f[0], f[1]
	rounds, _ := strconv.Atoi(f[2])
	workers, _ := strconv.Atoi(f[3])
	for deadline := time.Now().Add(time.Minute); ; {
		if _, err := os.Stat(start); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("parent never started the round")
		}
		time.Sleep(time.Millisecond)
	}
	for r := range rounds {
		if err := attachRound(img, workers, len(udevRunning()) > 0); err != nil {
			t.Fatalf("child round %d: %v", r, err)
		}
	}
}

// R2: sleeps between attempts are uniform in [0, 10ms + 240ms*n/64), taken
// with the control lock released; 64 attempts then EBUSY.
func TestR02_RandomizedBackoff(t *testing.T) {
	dir := rootDir(t)
	img := newImage(t, dir, "r02.img", 4<<20)
	type sleep struct {
		attempt int
		d       time.Duration
	}
	bound := func(n int) time.Duration {
		return 10*time.Millisecond + time.Duration(240*float64(time.Millisecond)*float64(n)/64)
	}
	const k = 5
	var (
		calls    int
		sleeps   []sleep
		flockErr = errors.New("no backoff observed")
	)
	o := Options{
		faultHook: func(step string, nr int) error {
			if step == stepGetFree && calls < k {
				calls++
				return fmt.Errorf("injected collision on loop%d: %w", nr, unix.EBUSY)
			}
			return nil
		},
		onBackoff: func(attempt int, d time.Duration) {
			sleeps = append(sleeps, sleep{attempt, d})
			if attempt == 1 {
				// Another allocator must get the control lock during our sleep.
				flockErr = exec.Command("flock", "-x", "-w", "20", "/dev/loop-control", "true").Run()
			}
		},
	}
	d := attachT(t, img, o)
	if flockErr != nil {
		t.Errorf("external flock on /dev/loop-control during the backoff: %v", flockErr)
	}
	// make test runs this suite beside a losetup loop: a real collision
	// with it adds a backoff after the injected ones (a few at most).
	if len(sleeps) < k || len(sleeps) > k+3 {
		t.Fatalf("%d backoffs for %d injected collisions: %v", len(sleeps), k, sleeps)
	}
	if len(sleeps) > k {
		t.Logf("%d backoffs for %d injected collisions: %d real ones with another loop user", len(sleeps), k, len(sleeps)-k)
	}
	for i, s := range sleeps {
		if s.attempt != i+1 || s.d < 0 || s.d >= bound(s.attempt) {
			t.Errorf("backoff %d: attempt %d slept %v, want attempt %d in [0, %v)", i, s.attempt, s.d, i+1, bound(i+1))
		}
	}
	if err := detachWait(d); err != nil {
		t.Fatal(err)
	}

	// Exhaustion: 64 attempts, 63 sleeps, then a busy error.
	sleeps = nil
	attempts := 0
	o = Options{
		faultHook: func(step string, nr int) error {
			if step == stepGetFree {
				attempts++
				return unix.EBUSY
			}
			return nil
		},
		onBackoff: func(a int, d time.Duration) { sleeps = append(sleeps, sleep{a, d}) },
	}
	_, err := Attach(testCtx(t, time.Minute), img, o)
	if !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EBUSY) {
		t.Fatalf("64 collisions gave %v, want ErrBusy and EBUSY", err)
	}
	if attempts != 64 || len(sleeps) != 63 {
		t.Errorf("%d attempts and %d sleeps, want 64 and 63", attempts, len(sleeps))
	}
	var total time.Duration
	for _, s := range sleeps {
		total += s.d
		if s.d < 0 || s.d >= bound(s.attempt) {
			t.Errorf("attempt %d slept %v, bound %v", s.attempt, s.d, bound(s.attempt))
		}
	}
	t.Logf("63 sleeps totalling %v (expected about 4.1 s, at most 8.19 s)", total)
	if b := bindingsOf(img); len(b) != 0 {
		t.Errorf("failed attach left %v", b)
	}
}
