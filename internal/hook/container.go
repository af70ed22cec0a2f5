package hook

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Container is the container's init process, pinned by a pidfd so that a
// recycled pid cannot redirect the mount into another process's namespace.
type Container struct {
	Pid        int
	StartTime  uint64 // field 22 of /proc/<pid>/stat, clock ticks since boot
	MntNSInode uint64
	// OwnUserNS is set when the container runs in a user namespace other
	// than the hook's: its root can remount, so the flags get locked.
	OwnUserNS bool
	pidfd     int
}

// Close releases the pidfd.
func (c *Container) Close() error { return unix.Close(c.pidfd) }

// PinContainer pins the container init process and checks it has a mount
// namespace of its own: without one the mount would land on the host.
func PinContainer(pid int) (*Container, error) {
	if pid <= 1 {
		return nil, unsupportedf("wrong stage: pid %d (setup runs as createRuntime or prestart, in the runtime namespace)", pid)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pin container process %d: %w", pid, err)
	}
	c := &Container{Pid: pid, pidfd: pidfd}
	if err := c.inspect(); err != nil {
		unix.Close(pidfd)
		return nil, err
	}
	return c, nil
}

func (c *Container) inspect() error {
	start, err := ProcessStartTime(c.Pid)
	if err != nil {
		return fmt.Errorf("container process %d: %s", c.Pid, errnoText(err))
	}
	var theirs, ours unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/mnt", c.Pid), &theirs); err != nil {
		return fmt.Errorf("container process %d: mount namespace: %s", c.Pid, errnoText(err))
	}
	if err := unix.Stat("/proc/thread-self/ns/mnt", &ours); err != nil {
		return fmt.Errorf("own mount namespace: %w", err)
	}
	var theirUser, ourUser unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/user", c.Pid), &theirUser); err != nil {
		return fmt.Errorf("container process %d: user namespace: %s", c.Pid, errnoText(err))
	}
	if err := unix.Stat("/proc/thread-self/ns/user", &ourUser); err != nil {
		return fmt.Errorf("own user namespace: %w", err)
	}
	c.OwnUserNS = theirUser.Ino != ourUser.Ino || theirUser.Dev != ourUser.Dev
	// The /proc reads above went by pid; the pidfd proves it is still the
	// process we pinned (ESRCH once it exited, even if the pid was reused).
	if err := unix.PidfdSendSignal(c.pidfd, 0, nil, 0); err != nil {
		return fmt.Errorf("container process %d exited during setup: %w", c.Pid, err)
	}
	if theirs.Dev == ours.Dev && theirs.Ino == ours.Ino {
		return unsupportedf("container process %d has no mount namespace of its own (or this is the createContainer stage)", c.Pid)
	}
	c.StartTime, c.MntNSInode = start, theirs.Ino
	return nil
}

// ProcessStartTime reads field 22 (starttime) of /proc/<pid>/stat.
func ProcessStartTime(pid int) (uint64, error) {
	start, _, err := readStat(pid)
	return start, err
}

func readStat(pid int) (start uint64, state string, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, "", err
	}
	return parseStat(data)
}

func parseStartTime(stat []byte) (uint64, error) {
	start, _, err := parseStat(stat)
	return start, err
}

// parseStat returns starttime (field 22) and state (field 3).
func parseStat(stat []byte) (uint64, string, error) {
	// comm (field 2) may contain spaces and parentheses: split after the last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, "", errors.New("malformed /proc stat")
	}
	fields := strings.Fields(string(stat[i+1:]))
	// fields[0] is field 3 (state); starttime is field 22.
	if len(fields) < 20 {
		return 0, "", errors.New("malformed /proc stat")
	}
	start, err := strconv.ParseUint(fields[19], 10, 64)
	return start, fields[0], err
}

// CheckRootless refuses to run inside a user namespace that is not the
// initial one (rootless podman): loop devices cannot be attached there.
func CheckRootless() error {
	data, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return nil
	}
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295" {
			return nil
		}
	}
	return unsupportedf("running inside a user namespace (rootless); loop devices need the initial user namespace")
}
