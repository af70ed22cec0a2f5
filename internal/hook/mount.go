package hook

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// MountOptions describes the detached mount built on the host.
type MountOptions struct {
	FSType      string
	Source      string // /dev/loopN, looked up in the host mount namespace
	RW          bool
	Noexec      bool
	Ext4ROFlags string // comma-separated flags for ext4 read-only mounts (noload)
}

// BuildMount creates a detached mount with the new mount API: it is attached
// to no namespace until moveIntoContainer, so the host never sees it.
func BuildMount(o MountOptions) (*os.File, error) {
	fsfd, err := unix.Fsopen(o.FSType, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("fsopen %s: %w", o.FSType, err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigSetString(fsfd, "source", o.Source); err != nil {
		return nil, fmt.Errorf("fsconfig source %s: %w", o.Source, fsError(fsfd, err))
	}
	attrs := unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV
	if !o.RW {
		if err := unix.FsconfigSetFlag(fsfd, "ro"); err != nil {
			return nil, fmt.Errorf("fsconfig ro: %w", fsError(fsfd, err))
		}
		// A dirty ext4 journal cannot be replayed on a read-only loop device:
		// without noload the kernel refuses ("write access unavailable").
		if o.FSType == "ext4" {
			for _, flag := range strings.Split(o.Ext4ROFlags, ",") {
				if flag == "" {
					continue
				}
				if err := unix.FsconfigSetFlag(fsfd, flag); err != nil {
					return nil, fmt.Errorf("fsconfig %s: %w", flag, fsError(fsfd, err))
				}
			}
		}
		attrs |= unix.MOUNT_ATTR_RDONLY
	}
	if o.Noexec {
		attrs |= unix.MOUNT_ATTR_NOEXEC
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return nil, fmt.Errorf("create %s filesystem on %s: %w", o.FSType, o.Source, fsError(fsfd, err))
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return nil, fmt.Errorf("fsmount %s: %w", o.Source, err)
	}
	return os.NewFile(uintptr(mfd), "fsmount:"+o.Source), nil
}

// fsError adds the kernel's message from the fs context log, when any.
func fsError(fsfd int, err error) error {
	buf := make([]byte, 512)
	n, rerr := unix.Read(fsfd, buf)
	if rerr != nil || n <= 0 {
		return err
	}
	msg := strings.TrimSpace(string(buf[:n]))
	if len(msg) > 2 && msg[1] == ' ' {
		msg = msg[2:]
	}
	return fmt.Errorf("%w (kernel: %s)", err, msg)
}
