package snapshot

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// ext4RootIno is the inode number of an ext4 filesystem's root directory.
const ext4RootIno = 2

// activeMounts returns the mounts of a flat-mode active snapshot whose
// device is rec. When this mount namespace already has the filesystem
// mounted read-write (a running container's root, or a stopped one's that
// `nerdctl stop` keeps mounted), it is a bind mount of that mount: the
// kernel refuses a second mount of one block device in another read-only
// state (get_tree_bdev: "would change RO state", EBUSY), and containerd's
// differ mounts an active snapshot read-only to diff it (nerdctl commit,
// ctr snapshots diff), which it may do of a bind mount. Otherwise it is the
// ext4 block device, as for every first start and for VM runtimes.
//
// The caller holds rec's device lock, so no Commit detaches the device
// while this decides. Nothing is mounted here: the bind holds the
// filesystem only once its user mounts it, and a Commit sees that mount
// among the holders like any other.
func (s *snapshotter) activeMounts(ctx context.Context, key string, rec loopdev.Record) []mount.Mount {
	fields := log.Fields{"key": key, "device": rec.Path}
	src, err := liveMount(rec.Devnum)
	if err != nil {
		log.G(ctx).WithFields(fields).WithError(err).Warn("mounts: look for a live mount: using the block device")
	}
	if src == "" {
		log.G(ctx).WithFields(fields).Debug("mounts: filesystem not mounted here: block device")
		return s.mounts(rec.Path, roleRW)
	}
	fields["source"] = src
	log.G(ctx).WithFields(fields).Debug("mounts: filesystem mounted read-write here: bind of that mount")
	// Not rbind: the diff is of this filesystem only, not of what is
	// mounted inside it.
	return []mount.Mount{{Type: "bind", Source: src, Options: []string{"rw", "bind"}}}
}

// liveMount returns the mount point of a read-write mount of the whole
// filesystem on devnum in this mount namespace, or "" if there is none.
// A read-only bind is skipped (a bind of it would be read-only too), and so
// is a mount point whose path no longer leads to that filesystem's root (a
// mount on top of it, or a path moved meanwhile).
func liveMount(devnum loopdev.Devnum) (string, error) {
	major, minor := int(devnum.Major()), int(devnum.Minor())
	ms, err := mountinfo.GetMounts(func(i *mountinfo.Info) (skip, stop bool) {
		rw := slices.Contains(strings.Split(i.Options, ","), "rw")
		return i.Major != major || i.Minor != minor || i.Root != "/" || !rw, false
	})
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	for _, m := range ms {
		var st unix.Stat_t
		if err := unix.Stat(m.Mountpoint, &st); err != nil || st.Dev != uint64(devnum) || st.Ino != ext4RootIno {
			continue
		}
		return m.Mountpoint, nil
	}
	return "", nil
}
