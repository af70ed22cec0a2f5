package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
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

// clearUnder detaches the leftovers of a run. The bench directory is a fresh
// mkdtemp, so every device bound to a file under it was attached by this
// process; the backing file is checked again on the open device.
func clearUnder(dir string) error {
	var errs []string
	for _, dev := range boundUnder(dir) {
		if err := clearOne(dev, dir); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("clear leftovers: %s", strings.Join(errs, "; "))
	}
	return nil
}

func clearOne(dev, dir string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil || !strings.HasPrefix(strings.TrimSuffix(string(b), "\n"), dir+"/") {
		return nil // unbound or rebound to someone else's file since the scan
	}
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil {
		return fmt.Errorf("LOOP_CLR_FD %s: %w", dev, err)
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
