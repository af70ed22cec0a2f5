//go:build integration

package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// TestContainerdManyContainers starts N containers (default 100, env
// LOOPKIT_SNAP_CONTAINERS overrides) from one image concurrently: all must
// run at the same time, each on its own loop device, and removing them
// plus the image and GC must leave nothing behind.
func TestContainerdManyContainers(t *testing.T) {
	forEachDaemonMode(t, ctdManyContainers)
}

func ctdManyContainers(t *testing.T, d ctdDaemon, mode string) {
	n := 100
	if v := os.Getenv("LOOPKIT_SNAP_CONTAINERS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("LOOPKIT_SNAP_CONTAINERS=%q", v)
		}
	}
	e := ctdStart(t, d, mode, "default_size = \"128MiB\"\n")
	e.importImage(ctdImageRef)

	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("many-%03d", i)
	}
	// Started concurrently (bounded, so ctr processes do not starve a
	// two-core CI machine), each container writes its id into its rootfs.
	ctdParallel(t, ids, 16, func(id string) error {
		_, err := e.try(e.runArgs("-d", ctdImageRef, id, "sh", "-c", "echo "+id+" > /id; exec sleep 1000000")...)
		return err
	})
	out := e.ctr("task", "ls")
	running := 0
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && strings.HasPrefix(f[0], "many-") && f[2] == "RUNNING" {
			running++
		}
	}
	if running != n {
		t.Fatalf("%d of %d containers running:\n%s", running, n, out)
	}
	st := e.status()
	devices := map[string]bool{}
	for _, s := range st.Snapshots {
		if s.Kind == "Active" && s.Device != "" {
			devices[s.Device] = true
		}
	}
	if len(devices) != n {
		t.Errorf("%d distinct loop devices for %d running containers", len(devices), n)
	}
	// Spot-check isolation: each rootfs holds its own id.
	for _, id := range []string{ids[0], ids[n/2], ids[n-1]} {
		if got := strings.TrimSpace(e.ctr("task", "exec", "--exec-id", "x", id, "cat", "/id")); got != id {
			t.Errorf("%s reads /id = %q", id, got)
		}
	}

	ctdParallel(t, ids, 16, func(id string) error {
		if _, err := e.try("task", "kill", "-s", "SIGKILL", id); err != nil {
			return err
		}
		return nil
	})
	for _, id := range ids {
		ctdWaitStopped(t, e, id)
	}
	ctdParallel(t, ids, 16, func(id string) error {
		if _, err := e.try("task", "delete", id); err != nil {
			return err
		}
		_, err := e.try("container", "rm", id)
		return err
	})
	e.ctr("image", "rm", "--sync", ctdImageRef)
	if left := e.leftovers(); len(left) > 0 {
		t.Errorf("left behind after removing %d containers and GC:\n  %s", n, strings.Join(left, "\n  "))
	}
}

// ctdParallel runs fn for every id with at most workers at once and fails the
// test with every error.
func ctdParallel(t *testing.T, ids []string, workers int, fn func(id string) error) {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []string
	sem := make(chan struct{}, workers)
	for _, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(id); err != nil {
				mu.Lock()
				errs = append(errs, id+": "+err.Error())
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d failures:\n%s", len(errs), strings.Join(errs, "\n"))
	}
}
