package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// boundUnder lists the loop devices whose backing file lies under dir
// (sysfs backing_file, with the " (deleted)" suffix removed).
func boundUnder(dir string) []string {
	var devs []string
	entries, _ := filepath.Glob("/sys/block/loop*")
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(e, "loop", "backing_file"))
		if err != nil {
			continue // unbound
		}
		backing := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), " (deleted)")
		if strings.HasPrefix(backing, dir+"/") {
			devs = append(devs, "/dev/"+filepath.Base(e))
		}
	}
	return devs
}

// waitUnbound polls until no device is bound to a file under dir or ctx
// ends (a detach the kernel deferred completes at the holder's last close,
// udevd's probe for example) and returns what is still bound.
func waitUnbound(ctx context.Context, dir string) []string {
	for {
		devs := boundUnder(dir)
		if len(devs) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return devs
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// clearUnder detaches the leftovers of a run (a peer's leaks) with
// pkg/loopdev's guarded detach, never by name: each device is detached only
// if it still carries the binding the listing saw. The bench directory is a
// fresh mkdtemp, so every device bound to a file under it is this process's.
func clearUnder(dir string) error {
	infos, err := loopdev.List(func(i loopdev.Info) (bool, bool) { return !strings.HasPrefix(i.BackingFile, dir+"/"), false })
	if err != nil {
		return fmt.Errorf("clear leftovers: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs []error
	for _, info := range infos {
		err := loopdev.DetachRecord(ctx, info.Record(), loopdev.DetachOptions{})
		if err != nil && !errors.Is(err, loopdev.ErrGone) && !errors.Is(err, loopdev.ErrReused) && !errors.Is(err, loopdev.ErrDetachDeferred) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clear leftovers: %w", err)
	}
	return nil
}

// checkNotTmpfs refuses a tmpfs bench directory: the numbers are for backing
// files on a real filesystem, where direct I/O is possible.
func checkNotTmpfs(dir string) (string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "", fmt.Errorf("statfs %s: %w", dir, err)
	}
	names := map[int64]string{
		unix.TMPFS_MAGIC:           "tmpfs",
		unix.EXT4_SUPER_MAGIC:      "ext4",
		unix.XFS_SUPER_MAGIC:       "xfs",
		unix.BTRFS_SUPER_MAGIC:     "btrfs",
		unix.OVERLAYFS_SUPER_MAGIC: "overlayfs",
	}
	name, ok := names[int64(st.Type)] //nolint:unconvert // Type is int32 on some architectures
	if !ok {
		name = fmt.Sprintf("fs magic %#x", st.Type)
	}
	if st.Type == unix.TMPFS_MAGIC {
		return name, fmt.Errorf("%s is on tmpfs; use -dir on a real filesystem", dir)
	}
	return name, nil
}
