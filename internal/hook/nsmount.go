package hook

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/hookpolicy"
	"github.com/loopkit/loopkit/internal/nsthread"
)

// Placement says where and how a detached mount is attached in the container.
type Placement struct {
	Rootfs     string // rootfs path as seen in the container mount ns before pivot_root
	Dest       string // clean absolute destination inside the rootfs
	InRoot     bool   // follow symlinks in-root (dest_symlinks = "in-root") instead of refusing them
	CreateDest bool
	// AllowedPrefixes are dest_allowed_prefixes: the resolved destination,
	// not only the requested string, must lie below one of them.
	AllowedPrefixes []string
}

// inNamespace runs fn on a throwaway thread that has entered the
// container's mount namespace.
func (c *Container) inNamespace(fn func() error) error {
	return nsthread.Run(func() error { return c.enterAndRun(fn) })
}

// enterAndRun runs on a locked thread other than the main thread; the
// thread is tainted afterwards and must not be unlocked.
func (c *Container) enterAndRun(fn func() error) error {
	if unix.Gettid() == unix.Getpid() {
		return errors.New("[bug] refusing to enter a namespace on the main thread")
	}
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("unshare CLONE_FS: %w", err)
	}
	if err := unix.Setns(c.pidfd, unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("enter mount namespace of process %d: %w", c.Pid, err)
	}
	return fn()
}

// ResolveDests opens every destination inside the container, before anything
// is attached, and returns O_PATH fds pinning them. Before pivot_root "/" of
// the container namespace is the host root and the image author controls
// every component below the rootfs: each destination is resolved with
// openat2 RESOLVE_IN_ROOT relative to the rootfs fd (refusing all symlinks
// unless InRoot), its resolved location is checked against the same policy
// as the requested string (an in-root "data -> /sys" symlink must not reach
// the container's /sys), it is checked not to sit on a shared mount, and
// later the mount is attached to that very fd, never to a path string
// (CVE-2021-30465). Destinations that resolve nested in one another are
// refused: the inner mount would land on the rootfs under the outer one,
// hidden, yet holding a loop device.
func (c *Container) ResolveDests(ps []Placement) ([]*os.File, error) {
	var fds []*os.File
	err := c.inNamespace(func() error {
		resolved := make([]string, 0, len(ps))
		for _, p := range ps {
			rootfd, err := unix.Open(p.Rootfs, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("open container rootfs %s: %s", p.Rootfs, errnoText(err))
			}
			destfd, err := resolveDest(rootfd, p)
			if err != nil {
				unix.Close(rootfd)
				return err
			}
			fds = append(fds, os.NewFile(uintptr(destfd), p.Dest))
			rel, err := checkResolved(rootfd, destfd, p)
			unix.Close(rootfd)
			if err != nil {
				return err
			}
			for j, q := range resolved {
				if hookpolicy.HasPathPrefix(rel, q) || hookpolicy.HasPathPrefix(q, rel) {
					return invalidf("destinations %s and %s are nested (they resolve to %s and %s); nested destinations are refused", ps[j].Dest, p.Dest, q, rel)
				}
			}
			resolved = append(resolved, rel)
			if err := checkNotShared(destfd, p.Dest); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		for _, f := range fds {
			f.Close()
		}
		return nil, err
	}
	return fds, nil
}

// checkResolved returns where destfd lies inside the rootfs and applies the
// destination policy to that location. The kernel's name for the fd
// (/proc/thread-self/fd, this thread being in the container's namespace) is
// trusted only after the name, resolved again without any symlink, leads
// back to the same inode on the same mount: a rename racing the readlink
// cannot make a denied directory pass for an allowed one.
func checkResolved(rootfd, destfd int, p Placement) (string, error) {
	rootPath, err := os.Readlink("/proc/thread-self/fd/" + strconv.Itoa(rootfd))
	if err != nil {
		return "", fmt.Errorf("locate container rootfs %s: %w", p.Rootfs, err)
	}
	destPath, err := os.Readlink("/proc/thread-self/fd/" + strconv.Itoa(destfd))
	if err != nil {
		return "", fmt.Errorf("locate destination %s: %w", p.Dest, err)
	}
	rel := "/"
	if destPath != rootPath {
		r, ok := strings.CutPrefix(destPath, strings.TrimSuffix(rootPath, "/")+"/")
		if !ok || r == "" {
			return "", refusedf("destination %s escapes the container root", p.Dest)
		}
		rel = "/" + r
	}
	again, err := openat2Retry(rootfd, rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return "", refusedf("destination %s: resolved location %s cannot be reopened: %s", p.Dest, truncate(rel, 128), errnoText(err))
	}
	same, err := sameMountAndInode(again, destfd)
	unix.Close(again)
	if err != nil {
		return "", fmt.Errorf("destination %s: %w", p.Dest, err)
	}
	if !same {
		return "", refusedf("destination %s changed while being resolved", p.Dest)
	}
	if rel != p.Dest {
		if hookpolicy.IsDeniedDest(rel) {
			return "", refusedf("destination %s resolves to %s, which is always denied", p.Dest, truncate(rel, 128))
		}
		if !slices.ContainsFunc(p.AllowedPrefixes, func(pre string) bool { return hookpolicy.HasPathPrefix(rel, pre) }) {
			return "", refusedf("destination %s resolves to %s, which is not below an allowed prefix (%s)", p.Dest, truncate(rel, 128), strings.Join(p.AllowedPrefixes, ", "))
		}
	}
	return rel, nil
}

func sameMountAndInode(a, b int) (bool, error) {
	var sa, sb unix.Statx_t
	const mask = unix.STATX_INO | unix.STATX_MNT_ID
	if err := unix.Statx(a, "", unix.AT_EMPTY_PATH, mask, &sa); err != nil {
		return false, fmt.Errorf("statx: %w", err)
	}
	if err := unix.Statx(b, "", unix.AT_EMPTY_PATH, mask, &sb); err != nil {
		return false, fmt.Errorf("statx: %w", err)
	}
	return sa.Ino == sb.Ino && sa.Dev_major == sb.Dev_major && sa.Dev_minor == sb.Dev_minor && sa.Mnt_id == sb.Mnt_id, nil
}

// MoveInto attaches the detached mount mnt onto the destination fd from
// ResolveDests, from inside the container's mount namespace (move_mount
// needs the target in the caller's namespace). The host never sees it.
func (c *Container) MoveInto(mnt, dest *os.File) error {
	return c.inNamespace(func() error {
		err := unix.MoveMount(int(mnt.Fd()), "", int(dest.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH)
		runtime.KeepAlive(mnt)
		runtime.KeepAlive(dest)
		if err != nil {
			return fmt.Errorf("move mount onto %s: %w", dest.Name(), err)
		}
		return nil
	})
}

// resolveDest opens the destination directory in-root. With InRoot false any
// symlink is refused (RESOLVE_NO_SYMLINKS); with it, symlinks are followed
// but can never leave the rootfs. Magic links are always refused.
func resolveDest(rootfd int, p Placement) (int, error) {
	resolve := uint64(unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS)
	if !p.InRoot {
		resolve |= unix.RESOLVE_NO_SYMLINKS
	}
	how := &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: resolve}
	fd, err := openat2Retry(rootfd, p.Dest, how)
	if errors.Is(err, unix.ENOENT) && p.CreateDest {
		if err := mkdirInRoot(rootfd, p.Dest, how); err != nil {
			return -1, err
		}
		fd, err = openat2Retry(rootfd, p.Dest, how)
	}
	if err != nil {
		switch {
		case errors.Is(err, unix.ELOOP):
			return -1, refusedf("destination %s: symlink refused", p.Dest)
		case errors.Is(err, unix.ENOENT):
			return -1, refusedf("destination %s does not exist in the container", p.Dest)
		case errors.Is(err, unix.ENOTDIR):
			return -1, refusedf("destination %s is not a directory", p.Dest)
		case errors.Is(err, unix.EXDEV):
			return -1, refusedf("destination %s escapes the container root", p.Dest)
		case errors.Is(err, unix.ENAMETOOLONG):
			return -1, invalidf("destination %s: a component is longer than %d bytes, or the path longer than %d", truncate(p.Dest, 128), unix.NAME_MAX, maxDestLen)
		}
		return -1, fmt.Errorf("resolve destination %s: %w", p.Dest, err)
	}
	return fd, nil
}

// openat2Retry retries EAGAIN, which RESOLVE_IN_ROOT returns when a rename
// raced the lookup (the kernel refuses to guess).
func openat2Retry(dirfd int, path string, how *unix.OpenHow) (int, error) {
	var err error
	for range 16 {
		var fd int
		fd, err = unix.Openat2(dirfd, path, how)
		if err == nil {
			return fd, nil
		}
		if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
			return -1, err
		}
	}
	return -1, err
}

// mkdirInRoot creates the missing components of dest one by one, each with
// mkdirat relative to its in-root resolved parent fd.
func mkdirInRoot(rootfd int, dest string, how *unix.OpenHow) error {
	parts := strings.Split(strings.TrimPrefix(dest, "/"), "/")
	parent := "/"
	for _, part := range parts {
		next := strings.TrimSuffix(parent, "/") + "/" + part
		fd, err := openat2Retry(rootfd, next, how)
		if err == nil {
			unix.Close(fd)
			parent = next
			continue
		}
		if !errors.Is(err, unix.ENOENT) {
			return refusedf("destination %s: create %s: %s", dest, next, errnoText(err))
		}
		pfd, err := openat2Retry(rootfd, parent, how)
		if err != nil {
			return refusedf("destination %s: open %s: %s", dest, parent, errnoText(err))
		}
		err = unix.Mkdirat(pfd, part, 0o755)
		if err == nil {
			// mkdirat applies the hook's umask (077): a non-root container
			// user would get EACCES below a 0700 directory.
			err = chmodCreated(pfd, part, 0o755)
		} else if errors.Is(err, unix.EEXIST) {
			err = nil // created meanwhile by somebody else: not ours to chmod
		}
		unix.Close(pfd)
		if err != nil {
			return fmt.Errorf("destination %s: create %s: %s", dest, next, errnoText(err))
		}
		parent = next
	}
	return nil
}

// chmodCreated sets the mode of the directory just created as name in
// dirfd, through an fd that does not follow a symlink swapped in meanwhile.
func chmodCreated(dirfd int, name string, mode uint32) error {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Fchmod(fd, mode)
}

// checkNotShared refuses a destination whose mount is shared: a mount made
// there would propagate to its peers, possibly the host.
func checkNotShared(destfd int, dest string) error {
	var stx unix.Statx_t
	if err := unix.Statx(destfd, "", unix.AT_EMPTY_PATH, unix.STATX_MNT_ID, &stx); err != nil {
		return fmt.Errorf("statx destination %s: %w", dest, err)
	}
	if stx.Mask&unix.STATX_MNT_ID == 0 {
		return fmt.Errorf("destination %s: kernel reports no mount id", dest)
	}
	// thread-self: this thread is in the container's namespace, the process
	// leader is not.
	f, err := os.Open("/proc/thread-self/mountinfo")
	if err != nil {
		return fmt.Errorf("read container mountinfo: %w", err)
	}
	defer f.Close()
	found, shared, err := mountShared(f, int(stx.Mnt_id))
	if err != nil {
		return fmt.Errorf("read container mountinfo: %w", err)
	}
	if !found {
		return fmt.Errorf("destination %s: mount id %d not found in the container's mountinfo", dest, stx.Mnt_id)
	}
	if shared {
		return refusedf("destination %s is on a shared mount (it would propagate out of the container)", dest)
	}
	return nil
}

// mountShared reports whether the mount with id is in the mountinfo text r
// and has a "shared:N" optional field.
func mountShared(r io.Reader, id int) (found, shared bool, err error) {
	mounts, err := mountinfo.GetMountsFromReader(r, func(m *mountinfo.Info) (skip, stop bool) {
		return m.ID != id, m.ID == id
	})
	if err != nil || len(mounts) == 0 {
		return false, false, err
	}
	return true, slices.ContainsFunc(strings.Fields(mounts[0].Optional), func(f string) bool { return strings.HasPrefix(f, "shared:") }), nil
}
