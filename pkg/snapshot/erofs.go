package snapshot

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Layer backings: how an erofs layer image is mounted.
const (
	backingLoop = "loop" // a read-only loop device attached through pkg/loopdev
	backingFile = "file" // erofs's own file-backed mount (Linux 6.12+)
)

// FIFREEZE and FITHAW, _IOWR('X', 119/120, int) in linux/fs.h; not in
// golang.org/x/sys/unix.
const (
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

func (r role) readOnly() bool { return r == roleRO || r == roleLayer }

// probeFileBacked reports whether the kernel mounts an erofs image from a
// regular file. File-backed erofs came with Linux 6.12 (commit fb176750266a
// "erofs: add file-backed mount support"); older kernels answer ENOTBLK.
// mount(2) is called directly: util-linux's mount would set up a loop device
// itself.
func probeFileBacked(ctx context.Context, dir string) (bool, error) {
	tmp, err := os.MkdirTemp(dir, "probe-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(tmp)
	src, img, mnt := filepath.Join(tmp, "src"), filepath.Join(tmp, "img"), filepath.Join(tmp, "m")
	for _, d := range []string{src, mnt} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return false, err
		}
	}
	if err := run(ctx, "mkfs.erofs", "--quiet", img, src); err != nil {
		return false, err
	}
	if err := unix.Mount(img, mnt, "erofs", unix.MS_RDONLY, ""); err != nil {
		log.G(ctx).WithError(err).Info("file-backed erofs mounts unavailable; layers use loop devices")
		return false, nil
	}
	return true, unmountPath(mnt)
}

// probeDirectIO reports whether file-backed erofs takes the directio
// option (kernels after 6.12): the image is then read with O_DIRECT, so a
// layer's pages are cached once, by erofs, rather than also by the
// backing file.
func probeDirectIO(ctx context.Context, dir string) bool {
	tmp, err := os.MkdirTemp(dir, "probe-")
	if err != nil {
		return false
	}
	defer os.RemoveAll(tmp)
	src, img, mnt := filepath.Join(tmp, "src"), filepath.Join(tmp, "img"), filepath.Join(tmp, "m")
	if os.Mkdir(src, 0o700) != nil || os.Mkdir(mnt, 0o700) != nil || run(ctx, "mkfs.erofs", "--quiet", img, src) != nil {
		return false
	}
	if err := unix.Mount(img, mnt, "erofs", unix.MS_RDONLY, "directio"); err != nil {
		return false
	}
	return unmountPath(mnt) == nil
}

// ensureLayer mounts layer id read-only on l/<id> unless it already is.
func (s *snapshotter) ensureLayer(ctx context.Context, id string) error {
	k := devKey{id, roleLayer}
	unlock := s.devs.lock(k)
	defer unlock()
	dir := s.layerDir(id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if mounted, err := mountinfo.Mounted(dir); err != nil {
		return err
	} else if mounted {
		return nil
	}
	img := s.layerImage(id)
	if _, err := os.Stat(img); err != nil {
		return fmt.Errorf("layer %s: %w", id, err)
	}
	src := img
	if s.backing == backingLoop {
		rec, err := s.devs.ensureLocked(ctx, k, img)
		if err != nil {
			return err
		}
		src = rec.Path
	}
	data := ""
	if s.backing == backingFile {
		data = s.layerMountData
	}
	if err := unix.Mount(src, dir, "erofs", unix.MS_RDONLY, data); err != nil {
		err = fmt.Errorf("mount layer %s on %s: %w", src, dir, err)
		if s.backing == backingLoop {
			err = errors.Join(err, s.devs.detachImage(ctx, img, k))
		}
		return err
	}
	log.G(ctx).WithFields(log.Fields{"id": id, "source": src}).Debug("mounted layer")
	return nil
}

// ensureUpper attaches the snapshot's ext4 image read-write and mounts it
// on u/<id>/m unless it already is. The caller holds the upper's lock.
func (s *snapshotter) ensureUpper(ctx context.Context, id string, up upperPaths) error {
	mounted, err := mountinfo.Mounted(up.mnt)
	if err != nil {
		return err
	}
	if !mounted {
		k := devKey{id, roleUpper}
		rec, err := s.devs.ensureLocked(ctx, k, up.image)
		if err != nil {
			return err
		}
		m := mount.Mount{Type: "ext4", Source: rec.Path, Options: append([]string{"rw"}, s.cfg.MountOptions...)}
		if err := m.Mount(up.mnt); err != nil {
			return errors.Join(fmt.Errorf("mount upper %s on %s: %w", rec.Path, up.mnt, err), s.devs.detachImage(ctx, up.image, k))
		}
		log.G(ctx).WithFields(log.Fields{"id": id, "device": rec.Path, "diskseq": rec.DiskSeq}).Debug("mounted upper")
		s.fault("prepare-upper-mounted")
	}
	// Also when already mounted: a crash may have come between the mount
	// and these.
	for _, d := range []string{up.upper, up.work} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	// The upper is the container's root directory where there is no
	// parent: 0755 whatever the umask.
	return os.Chmod(up.upper, 0o755)
}

// buildFrozen builds the layer from an upper on its ext4 image while that
// filesystem is frozen: a running container's writes wait (they are not
// lost and not half in the layer), so the layer is one point in time.
func (s *snapshotter) buildFrozen(ctx context.Context, up upperPaths, dst string) error {
	f, err := os.Open(up.mnt)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), ioctlFIFREEZE, 0); err != nil {
		return fmt.Errorf("freeze upper %s: %v: %w", up.mnt, err, errdefs.ErrFailedPrecondition)
	}
	defer func() {
		if err := unix.IoctlSetInt(int(f.Fd()), ioctlFITHAW, 0); err != nil {
			log.G(ctx).WithError(err).WithField("path", up.mnt).Warn("thaw upper")
		}
	}()
	s.fault("commit-frozen")
	// Freezing wrote the superblock: its error state is current.
	if err := upperErrors(up.image); err != nil {
		return err
	}
	return mkfsErofs(ctx, up.upper, dst)
}

// ErrUpperErrors is returned by Commit when the upper filesystem recorded
// errors: a layer built from it could silently miss data.
var ErrUpperErrors = errors.New("upper filesystem has recorded errors")

// upperErrors refuses an ext4 image whose superblock records errors
// (s_state's error bit, s_error_count), as flat mode's Commit does
// (checkFilesystem): the kernel sets them when a write of the filesystem
// failed. The upper is mounted, so this is the check that applies; the
// image is kept for inspection.
func upperErrors(image string) error {
	sb, err := readSuperblock(image)
	if err != nil {
		return err
	}
	if sb.HasErrors() {
		return fmt.Errorf("%s (kept for inspection): %w: %w", image, ErrUpperErrors, errdefs.ErrDataLoss)
	}
	return nil
}

// buildFromDir builds the layer from a plain-directory upper, which
// cannot be frozen: nothing may have it mounted.
func buildFromDir(ctx context.Context, src, dst string) error {
	if err := checkNotMounted(src); err != nil {
		return err
	}
	return mkfsErofs(ctx, src, dst)
}

// mkfsErofs runs mkfs.erofs from a directory: overlay whiteouts (char 0:0),
// trusted.overlay.opaque and every other xattr, hard links, owners and
// modes are kept; --preserve-mtime keeps each file's mtime rather than the
// build time.
func mkfsErofs(ctx context.Context, src, dst string) error {
	return run(ctx, "mkfs.erofs", "--quiet", "--preserve-mtime", dst, src)
}

// checkNotMounted refuses to build a layer from a plain directory that a
// mount (an overlay's upperdir, a bind mount) still exposes to writers.
func checkNotMounted(dir string) error {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return &os.PathError{Op: "stat", Path: dir, Err: err}
	}
	mounts, err := mountinfo.GetMounts(nil)
	if err != nil {
		return err
	}
	// The root of dir inside its filesystem, as mountinfo's Root field
	// shows it for a bind mount of dir.
	var home *mountinfo.Info
	for _, m := range mounts {
		if uint64(unix.Mkdev(uint32(m.Major), uint32(m.Minor))) == st.Dev && isUnder(dir, m.Mountpoint) &&
			(home == nil || len(m.Mountpoint) > len(home.Mountpoint)) {
			home = m
		}
	}
	var fsPath string
	if home != nil {
		rel, _ := filepath.Rel(home.Mountpoint, dir)
		fsPath = filepath.Join(home.Root, rel)
	}
	for _, m := range mounts {
		switch {
		case m.FSType == "overlay" && hasOption(m.VFSOptions, "upperdir="+dir):
		case fsPath != "" && m != home && uint64(unix.Mkdev(uint32(m.Major), uint32(m.Minor))) == st.Dev && isUnder(m.Root, fsPath):
		default:
			continue
		}
		return fmt.Errorf("upper directory %s is still mounted at %s (unmount it before Commit): %w", dir, m.Mountpoint, errdefs.ErrFailedPrecondition)
	}
	return nil
}

func isUnder(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !(len(rel) > 2 && rel[:3] == "../")
}

func hasOption(opts, want string) bool {
	for len(opts) > 0 {
		i := 0
		for i < len(opts) && opts[i] != ',' {
			i++
		}
		if opts[:i] == want {
			return true
		}
		if i == len(opts) {
			break
		}
		opts = opts[i+1:]
	}
	return false
}

// checkLayer runs fsck.erofs on a new layer where erofs-utils ships it.
func checkLayer(ctx context.Context, path string) error {
	if _, err := exec.LookPath("fsck.erofs"); err != nil {
		return nil
	}
	return run(ctx, "fsck.erofs", path)
}

// erofs superblock: at byte 1024, magic (le32) then, at +16, the inode
// count (le64).
const erofsMagic = 0xE0F5E1E2

// layerUsage is the layer image's allocated bytes and inode count.
func layerUsage(path string) (usage snapshots.Usage, err error) {
	if usage.Size, err = allocated(path); err != nil {
		return usage, err
	}
	f, err := os.Open(path)
	if err != nil {
		return usage, err
	}
	defer f.Close()
	buf := make([]byte, 24)
	if _, err := f.ReadAt(buf, 1024); err != nil {
		return usage, fmt.Errorf("read erofs superblock of %s: %w", path, err)
	}
	if binary.LittleEndian.Uint32(buf) != erofsMagic {
		return usage, fmt.Errorf("%s: no erofs superblock", path)
	}
	usage.Inodes = int64(binary.LittleEndian.Uint64(buf[16:]))
	return usage, nil
}

// unmountPath unmounts p; a mount still busy (a container's overlay holds
// it, or a copy in another namespace) is detached lazily and goes away at
// its last user. Not mounted is success.
func unmountPath(p string) error {
	err := unix.Unmount(p, 0)
	switch {
	case err == nil, errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
		return nil
	case errors.Is(err, unix.EBUSY):
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return &os.PathError{Op: "umount", Path: p, Err: err}
		}
		return nil
	default:
		return &os.PathError{Op: "umount", Path: p, Err: err}
	}
}

// layerBacking resolves layer_backing; "auto" probes the kernel once, at
// startup.
func (s *snapshotter) layerBacking(ctx context.Context) (string, error) {
	switch s.cfg.LayerBacking {
	case backingLoop:
		return backingLoop, nil
	case "auto":
		ok, err := probeFileBacked(ctx, filepath.Join(s.root, "staging"))
		if err != nil {
			return "", fmt.Errorf("probe file-backed erofs: %w", err)
		}
		if !ok {
			return backingLoop, nil
		}
	}
	if probeDirectIO(ctx, filepath.Join(s.root, "staging")) {
		s.layerMountData = "directio"
	}
	return backingFile, nil
}
