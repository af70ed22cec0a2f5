package hook

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/nsthread"
)

// LockChildCommand is the hidden first argument with which the hook
// re-executes itself as the helper of lockFlags (see RunLockChild).
const LockChildCommand = "__lock-mount-flags"

// lockFlags returns a clone of the detached mount mnt whose mount flags
// (ro, nosuid, nodev, noexec, atime) are locked, for a container in a user
// namespace of its own. Its root holds CAP_SYS_ADMIN over its mount
// namespace and could otherwise run "mount -o remount,bind,dev,suid,exec"
// on the destination. The kernel locks flags in one place only: when
// copy_mnt_ns copies mounts into a namespace owned by a less privileged
// user namespace (lock_mnt_tree), and clones of a locked mount stay locked.
// So:
//
//  1. on a throwaway thread, a private mount namespace (owned by the
//     initial user namespace, all propagation private so nothing reaches
//     the host) where mnt is attached at stage;
//  2. a helper process cloned from that thread with CLONE_NEWUSER and
//     CLONE_NEWNS: its copy of the namespace, owned by its new user
//     namespace, has every mount locked; it clones the one at stage with
//     open_tree(OPEN_TREE_CLONE) and passes the fd back over a socket;
//  3. that detached, locked clone is what gets moved into the container.
//
// Even the host's root cannot clear a locked flag; unmounting the whole
// mount is the only way to drop it. While steps 1 and 2 run, the two
// namespace copies pin the host's mounts, for a few milliseconds.
func lockFlags(mnt *os.File, stage string) (*os.File, error) {
	var locked *os.File
	err := nsthread.Run(func() error {
		if err := unix.Unshare(unix.CLONE_FS | unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("lock mount flags: unshare mount namespace: %w", err)
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("lock mount flags: make the staging namespace private: %w", err)
		}
		if err := unix.MoveMount(int(mnt.Fd()), "", unix.AT_FDCWD, stage, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
			return fmt.Errorf("lock mount flags: stage the mount at %s: %w", stage, err)
		}
		var err error
		locked, err = cloneFromUserNS(stage)
		return err
	})
	return locked, err
}

// cloneFromUserNS runs the helper (on the calling, locked thread, whose
// mount namespace it copies) and receives its clone of the mount at stage.
func cloneFromUserNS(stage string) (*os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("lock mount flags: socketpair: %w", err)
	}
	ours := os.NewFile(uintptr(fds[0]), "lock-mount-parent")
	theirs := os.NewFile(uintptr(fds[1]), "lock-mount-child")
	defer ours.Close()
	cmd := &exec.Cmd{
		Path:       "/proc/self/exe",
		Args:       []string{"oci-loop-hook", LockChildCommand, stage},
		Env:        []string{},
		ExtraFiles: []*os.File{theirs},
		SysProcAttr: &syscall.SysProcAttr{
			Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNS,
			UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}},
			GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}},
			Pdeathsig:   syscall.SIGKILL,
		},
	}
	var stderr limitedBuffer
	cmd.Stderr = &stderr
	err = cmd.Start()
	theirs.Close()
	if err != nil {
		return nil, fmt.Errorf("lock mount flags: start helper: %w", err)
	}
	f, rerr := recvFd(int(ours.Fd()))
	werr := cmd.Wait()
	if rerr != nil {
		if werr != nil && stderr.Len() > 0 {
			return nil, fmt.Errorf("lock mount flags: helper: %s", stderr.String())
		}
		return nil, fmt.Errorf("lock mount flags: receive the clone: %w", rerr)
	}
	return f, nil
}

func recvFd(sock int) (*os.File, error) {
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return nil, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return nil, errors.New("no fd received")
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return nil, errors.New("no fd received")
	}
	return os.NewFile(uintptr(fds[0]), "fsmount-locked"), nil
}

// RunLockChild is the helper of lockFlags, run as the whole process: it
// clones the mount at stage (locked in this namespace) and sends the fd
// over fd 3. It returns the exit status.
func RunLockChild(stage string) int {
	fd, err := unix.OpenTree(unix.AT_FDCWD, stage, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		fmt.Fprintf(os.Stderr, "open_tree %s: %v", stage, err)
		return 1
	}
	if err := unix.Sendmsg(3, []byte{0}, unix.UnixRights(fd), nil, 0); err != nil {
		fmt.Fprintf(os.Stderr, "send the clone: %v", err)
		return 1
	}
	return 0
}

// limitedBuffer keeps the first 512 bytes written to it.
type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := 512 - len(l.b); room > 0 {
		l.b = append(l.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (l *limitedBuffer) Len() int       { return len(l.b) }
func (l *limitedBuffer) String() string { return string(l.b) }
