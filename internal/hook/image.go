package hook

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Image is an opened, verified image file.
type Image struct {
	Plan
	File *os.File // O_RDONLY (O_RDWR for rw) regular file, root-owned
	Dev  uint64
	Ino  uint64
	Size int64
}

// Close closes the image file.
func (im *Image) Close() error { return im.File.Close() }

// walkResolve is how every component of an image path is opened: no
// symlink (not even in a directory above allowed_image_dirs, whose owner
// could otherwise point the lookup anywhere), no magic link, no "..".
const walkResolve = unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_BENEATH

// OpenImage opens the image of p and verifies it. The path is resolved from
// "/" one component at a time, each directory opened O_PATH relative to the
// one before with symlinks refused, and each checked before it is used: an
// ancestor that anyone but root can write (or rename entries in) could be
// swapped for a symlink or a directory of the attacker's choosing. The last
// open is O_PATH (it cannot block on a FIFO), fstat decides before any data
// open, and the data open goes through the same inode (/proc/self/fd),
// compared by dev/ino: a hardlink or symlink to a block device, a FIFO or a
// writable file never gets opened. The declared fstype must match the
// on-disk magic.
func OpenImage(p Plan, allowedFSTypes []string) (*Image, error) {
	name := p.displayName()
	pathfd, err := openImagePath(p.ImagePath)
	if err != nil {
		return nil, refusedf("image %q: %w", name, err)
	}
	defer unix.Close(pathfd)
	var st unix.Stat_t
	if err := unix.Fstat(pathfd, &st); err != nil {
		return nil, fmt.Errorf("image %q: fstat %s: %w", name, p.ImagePath, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, refusedf("image %q: %s is a %s, not a regular file", name, p.ImagePath, fileKind(st.Mode))
	}
	if err := checkOwnerMode(&st, false); err != nil {
		return nil, refusedf("image %q: insecure image file %s: %s", name, p.ImagePath, err)
	}
	if st.Size <= 0 {
		return nil, refusedf("image %q: %s is empty", name, p.ImagePath)
	}
	flags := unix.O_RDONLY
	if p.RW {
		flags = unix.O_RDWR
	}
	// Reopen the verified inode through its O_PATH fd: no second path lookup.
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(pathfd), flags|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("image %q: reopen %s: %s", name, p.ImagePath, errnoText(err))
	}
	f := os.NewFile(uintptr(fd), p.ImagePath)
	var st2 unix.Stat_t
	if err := unix.Fstat(fd, &st2); err != nil || st2.Dev != st.Dev || st2.Ino != st.Ino {
		f.Close()
		return nil, refusedf("image %q: %s changed while being opened", name, p.ImagePath)
	}
	im := &Image{Plan: p, File: f, Dev: st.Dev, Ino: st.Ino, Size: st.Size}
	if err := im.checkFSType(name, allowedFSTypes); err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

// openImagePath walks the clean absolute path from "/" and returns an O_PATH
// fd of its last component, which it does not follow. Every directory on the
// way must be root-owned and writable by nobody else; an ancestor (not the
// image's own directory) may instead be a root-owned sticky directory such
// as /tmp, where only root can rename or remove the root-owned entry we
// continue through. The image's own directory has no such exception: anyone
// who can create entries there can hardlink a root-owned file into it when
// fs.protected_hardlinks is off.
func openImagePath(path string) (int, error) {
	if !filepath.IsAbs(path) || filepath.Clean(path) != path || path == "/" {
		return -1, fmt.Errorf("%s is not a clean absolute file path", path)
	}
	dirfd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /: %s", errnoText(err))
	}
	comps := strings.Split(path[1:], "/")
	walked := "/"
	for i, comp := range comps {
		last := i == len(comps)-1
		var st unix.Stat_t
		if err := unix.Fstat(dirfd, &st); err != nil {
			unix.Close(dirfd)
			return -1, fmt.Errorf("fstat %s: %w", walked, err)
		}
		if err := checkOwnerMode(&st, !last); err != nil {
			unix.Close(dirfd)
			return -1, fmt.Errorf("insecure image directory %s: %s", walked, err)
		}
		flags := unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC
		if !last {
			flags |= unix.O_DIRECTORY
		}
		fd, err := unix.Openat2(dirfd, comp, &unix.OpenHow{Flags: uint64(flags), Resolve: walkResolve})
		if errors.Is(err, unix.ENOTDIR) {
			// O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR: say which.
			var lst unix.Stat_t
			if unix.Fstatat(dirfd, comp, &lst, unix.AT_SYMLINK_NOFOLLOW) == nil && lst.Mode&unix.S_IFMT == unix.S_IFLNK {
				err = unix.ELOOP
			}
		}
		unix.Close(dirfd)
		walked = filepath.Join(walked, comp)
		if err != nil {
			return -1, fmt.Errorf("open %s: %s", walked, errnoText(err))
		}
		dirfd = fd
	}
	return dirfd, nil
}
func (im *Image) checkFSType(name string, allowed []string) error {
	detected, err := DetectFSType(im.File)
	if err != nil {
		return fmt.Errorf("image %q: read superblock: %w", name, err)
	}
	if im.FSType == "" {
		if detected == "" {
			return refusedf("image %q: no squashfs, erofs or ext4 superblock found", name)
		}
		im.FSType = detected
	}
	ok, err := HasMagic(im.File, im.FSType)
	if err != nil {
		return fmt.Errorf("image %q: read superblock: %w", name, err)
	}
	if !ok {
		return refusedf("image %q: on-disk magic does not match fstype %s", name, im.FSType)
	}
	for _, t := range allowed {
		if t == im.FSType {
			return nil
		}
	}
	return refusedf("image %q: fstype %s is not allowed", name, im.FSType)
}

// checkOwnerMode requires a root owner and no write access for group or
// others; with stickyOK a root-owned sticky directory is accepted too.
func checkOwnerMode(st *unix.Stat_t, stickyOK bool) error {
	if st.Uid != 0 {
		return fmt.Errorf("owned by uid %d, not root", st.Uid)
	}
	if st.Mode&0o022 != 0 && !(stickyOK && st.Mode&unix.S_ISVTX != 0) {
		return fmt.Errorf("group- or world-writable (mode %04o)", st.Mode&0o7777)
	}
	return nil
}

func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFBLK:
		return "block device"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFIFO:
		return "FIFO"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFLNK:
		return "symlink"
	}
	return "special file"
}

// errnoText describes the errors path lookups return without the bare
// "no such file or directory" text (podman turns it into exit 127).
func errnoText(err error) string {
	switch {
	case errors.Is(err, unix.ENOENT):
		return "does not exist"
	case errors.Is(err, unix.ELOOP):
		return "symlink refused"
	case errors.Is(err, unix.EXDEV):
		return "path escapes its directory"
	case errors.Is(err, unix.ENOTDIR):
		return "a path component is not a directory"
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return "permission denied"
	case errors.Is(err, unix.ENAMETOOLONG):
		return "name too long"
	}
	return err.Error()
}
