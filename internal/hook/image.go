package hook

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/config"
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

// beneath is how image files are looked up: no symlink anywhere, no escape
// from the trusted directory, no /proc magic links.
const beneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// OpenImage opens the image of p fd-based beneath its trusted directory and
// verifies it. An attacker could plant a symlink or hardlink to a block
// device (giving the container a host disk), a FIFO (hanging the hook), or a
// writable file; the O_PATH open cannot block, fstat decides before any data
// open, and the data open goes through the same inode (/proc/self/fd),
// compared by dev/ino. The declared fstype must match the on-disk magic.
func OpenImage(p Plan, allowedFSTypes []string) (*Image, error) {
	name := p.Name
	if name == "" {
		name = p.ImagePath
	}
	dirfd, err := unix.Open(p.Dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, refusedf("image %q: open directory %s: %s", name, p.Dir, errnoText(err))
	}
	defer unix.Close(dirfd)
	if err := checkFdOwnerMode(dirfd, p.Dir, unix.S_IFDIR); err != nil {
		return nil, refusedf("image %q: %w", name, err)
	}
	base := p.Rel
	if d := filepath.Dir(p.Rel); d != "." {
		sub, err := unix.Openat2(dirfd, d, &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: beneath})
		if err != nil {
			return nil, refusedf("image %q: open directory %s beneath %s: %s", name, d, p.Dir, errnoText(err))
		}
		defer unix.Close(sub)
		if err := checkFdOwnerMode(sub, filepath.Join(p.Dir, d), unix.S_IFDIR); err != nil {
			return nil, refusedf("image %q: %w", name, err)
		}
		dirfd, base = sub, filepath.Base(p.Rel)
	}
	pathfd, err := unix.Openat2(dirfd, base, &unix.OpenHow{Flags: unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC, Resolve: beneath})
	if err != nil {
		return nil, refusedf("image %q: open %s: %s", name, p.ImagePath, errnoText(err))
	}
	defer unix.Close(pathfd)
	var st unix.Stat_t
	if err := unix.Fstat(pathfd, &st); err != nil {
		return nil, fmt.Errorf("image %q: fstat %s: %w", name, p.ImagePath, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, refusedf("image %q: %s is a %s, not a regular file", name, p.ImagePath, fileKind(st.Mode))
	}
	if err := config.CheckOwnerMode(p.ImagePath, &st, unix.S_IFREG); err != nil {
		return nil, refusedf("image %q: %w", name, err)
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
		return nil, fmt.Errorf("image %q: reopen %s: %w", name, p.ImagePath, err)
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

func checkFdOwnerMode(fd int, path string, kind uint32) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat %s: %w", path, err)
	}
	return config.CheckOwnerMode(path, &st, kind)
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
	}
	return err.Error()
}
