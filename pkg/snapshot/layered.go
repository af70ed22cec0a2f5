package snapshot

// Layered mode: committed layers are erofs images mounted read-only once per
// host and shared by every snapshot above them; an active snapshot is an
// overlay whose upper and work directories live on its own ext4 image (the
// container's size-limited writable space).
//
// Layout under root:
//
//	layers/<id>.erofs   committed layer <id>
//	l/<id>              mount point of layer <id>; short, so 128 lowerdirs fit
//	                    the mount options containerd 1.6 hands to mount(2)
//	u/<id>/image        ext4 image of active snapshot <id> (size limit)
//	u/<id>/m            its mount point; m/upper and m/work are the overlay's
//	u/<id>/fs, u/<id>/work
//	                    plain directory upper of an unpack (extract-) snapshot,
//	                    or the empty root of a view without parent
//	staging/            layers and snapshot directories being built
//	trash/              removed files, deleted by Cleanup
//
// The metadata is the truth: a file or mount with no record is an orphan
// that reconcile and Cleanup remove. No mkfs.erofs, fsck, fsync, clone,
// mount or loopdev call runs inside a metadata transaction.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
)

// unpackPrefix starts the keys of the snapshots containerd's unpacker
// prepares, applies a layer to and commits at once.
const unpackPrefix = "extract-"

// Device roles of layered mode.
const (
	roleLayer role = "layer" // read-only erofs layer image
	roleUpper role = "upper" // read-write ext4 image of an active snapshot
)

var layeredDirs = []string{"templates", "layers", "l", "u", "staging", "trash"}

func (s *snapshotter) layerImage(id string) string {
	return filepath.Join(s.root, "layers", id+".erofs")
}
func (s *snapshotter) layerDir(id string) string  { return filepath.Join(s.root, "l", id) }
func (s *snapshotter) upperRoot(id string) string { return filepath.Join(s.root, "u", id) }

// upperPaths are the directories of an active snapshot: on its ext4 image
// (image != "") or, for an unpack snapshot or a parentless view, plain
// directories under root.
type upperPaths struct {
	image, mnt  string // ext4 image and its mount point; empty for a dir upper
	upper, work string
}

func (s *snapshotter) upperOf(id string) upperPaths {
	r := s.upperRoot(id)
	img := filepath.Join(r, "image")
	if _, err := os.Lstat(img); err == nil {
		m := filepath.Join(r, "m")
		return upperPaths{image: img, mnt: m, upper: filepath.Join(m, "upper"), work: filepath.Join(m, "work")}
	}
	return upperPaths{upper: filepath.Join(r, "fs"), work: filepath.Join(r, "work")}
}

// upperFeatures are ext4Features without resize_inode: an upper is never
// grown online, and its reserved GDT blocks were most of what a new
// container allocated before writing (4.3 MiB of a 10 GiB image; 0.2 MiB
// without).
const upperFeatures = "none,has_journal,ext_attr,dir_index,filetype,extent,flex_bg," +
	"sparse_super,large_file,huge_file,dir_nlink,extra_isize,64bit,metadata_csum"

// makeUpperTemplate creates the empty ext4 image an active snapshot's upper
// is cloned from. -m 0: the size limit is the container's writable space,
// none of it reserved for root. lazy_journal_init and discard as in
// makeTemplate: the journal and inode tables stay holes.
func makeUpperTemplate(ctx context.Context, path string, size int64) error {
	if err := createSized(path, size); err != nil {
		return err
	}
	args := append([]string{"-q", "-F", "-t", "ext4"}, mkfsOptions(size, upperFeatures)...)
	if err := run(ctx, "mkfs.ext4", append(args, path)...); err != nil {
		return err
	}
	return syncPath(path)
}

// lcreate creates an active snapshot or a view in layered mode.
func (s *snapshotter) lcreate(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	withImage := kind == snapshots.KindActive && !strings.HasPrefix(key, unpackPrefix)
	var size int64
	if withImage {
		size = s.targetSize(ctx, key, base.Labels)
	}
	parentID, err := s.checkNew(ctx, key, parent)
	if err != nil {
		return nil, err
	}
	var sn storage.Snapshot
	if kind == snapshots.KindView && parentID != "" {
		// A view of a layer chain owns nothing but its record.
		err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			sn, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
			return err
		})
	} else {
		sn, err = s.createUpper(ctx, kind, key, parent, withImage, size, opts)
	}
	if err != nil {
		return nil, err
	}
	unlock := s.devs.lock(devKey{sn.ID, roleUpper})
	ms, err := s.lmountsOf(ctx, sn)
	unlock()
	if err == nil {
		s.fault("prepare-mounted")
		return ms, nil
	}
	if rerr := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, key)
		return err
	}); rerr != nil {
		log.G(ctx).WithError(rerr).WithField("key", key).Warn("undo snapshot record after failed mount")
	} else if _, serr := os.Lstat(s.upperRoot(sn.ID)); serr == nil {
		s.releaseUpper(ctx, sn.ID, key)
	}
	return nil, err
}

// createUpper builds the snapshot's own directory in staging (an ext4
// image cloned from the empty template of its size, or plain directories),
// then records the snapshot and renames the directory to u/<id> in one
// short write transaction.
func (s *snapshotter) createUpper(ctx context.Context, kind snapshots.Kind, key, parent string, withImage bool, size int64, opts []snapshots.Opt) (storage.Snapshot, error) {
	s.cleanupMu.RLock()
	defer s.cleanupMu.RUnlock()
	var tmpl string
	if withImage {
		var err error
		if tmpl, err = s.templateFile(ctx, "upper-", size, makeUpperTemplate); err != nil {
			return storage.Snapshot{}, err
		}
	}
	staging, err := os.MkdirTemp(filepath.Join(s.root, "staging"), "new-")
	if err != nil {
		return storage.Snapshot{}, err
	}
	defer func() {
		if staging != "" {
			os.RemoveAll(staging)
		}
	}()
	if withImage {
		method, err := cloneImage(tmpl, filepath.Join(staging, "image"))
		if err != nil {
			return storage.Snapshot{}, err
		}
		if method == cloneReflink {
			s.m.cloneReflink.Add(1)
		} else {
			s.m.cloneSparse.Add(1)
		}
		if err := os.Mkdir(filepath.Join(staging, "m"), 0o700); err != nil {
			return storage.Snapshot{}, err
		}
	} else {
		for _, d := range []string{"fs", "work"} {
			if err := os.Mkdir(filepath.Join(staging, d), 0o755); err != nil {
				return storage.Snapshot{}, err
			}
		}
		// The upper is the container's root directory where there is no
		// parent: 0755 whatever the umask.
		if err := os.Chmod(filepath.Join(staging, "fs"), 0o755); err != nil {
			return storage.Snapshot{}, err
		}
	}
	syncDir(staging)
	syncDir(filepath.Join(s.root, "staging"))
	s.fault("prepare-cloned")

	var sn storage.Snapshot
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		sn, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return err
		}
		dir := s.upperRoot(sn.ID)
		// Left by a crash before an earlier record of this id committed.
		if _, err := os.Lstat(dir); err == nil {
			if err := s.toTrash(dir, sn.ID); err != nil {
				return err
			}
		}
		if err := os.Rename(staging, dir); err != nil {
			return fmt.Errorf("rename staging directory: %w", err)
		}
		// The directory must be durable before the record naming it.
		syncDir(filepath.Join(s.root, "u"))
		s.fault("prepare-renamed")
		return nil
	})
	if err != nil {
		if sn.ID != "" {
			if _, serr := os.Stat(staging); errors.Is(serr, os.ErrNotExist) {
				staging = s.upperRoot(sn.ID)
			}
		}
		return storage.Snapshot{}, err
	}
	staging = ""
	log.G(ctx).WithFields(log.Fields{"key": key, "id": sn.ID, "size": size, "image": withImage}).Debug("created upper")
	s.fault("prepare-committed")
	return sn, nil
}

// lmountsOf mounts what the snapshot needs on the host (its parents'
// layers, its upper image; the caller holds the upper's lock) and returns the mounts containerd runs: an
// overlay of host paths, a bind mount where there is one directory.
func (s *snapshotter) lmountsOf(ctx context.Context, sn storage.Snapshot) ([]mount.Mount, error) {
	lowers := make([]string, 0, len(sn.ParentIDs))
	for _, pid := range sn.ParentIDs {
		if err := s.ensureLayer(ctx, pid); err != nil {
			return nil, err
		}
		lowers = append(lowers, s.layerDir(pid))
	}
	if sn.Kind == snapshots.KindView {
		switch len(lowers) {
		case 0:
			return []mount.Mount{bindMount(s.upperOf(sn.ID).upper, "ro")}, nil
		case 1:
			return []mount.Mount{bindMount(lowers[0], "ro")}, nil
		}
		return []mount.Mount{{
			Type:    "overlay",
			Source:  "overlay",
			Options: []string{"ro", "index=off", "lowerdir=" + strings.Join(lowers, ":")},
		}}, nil
	}
	up := s.upperOf(sn.ID)
	if up.image != "" {
		if err := s.ensureUpper(ctx, sn.ID, up); err != nil {
			return nil, err
		}
	}
	if len(lowers) == 0 {
		return []mount.Mount{bindMount(up.upper, "rw")}, nil
	}
	return []mount.Mount{{
		Type:   "overlay",
		Source: "overlay",
		Options: []string{
			// index=off: an upper reused after a crash or adopted after a
			// restart must not be refused as "in use" (EBUSY).
			"index=off",
			"workdir=" + up.work,
			"upperdir=" + up.upper,
			"lowerdir=" + strings.Join(lowers, ":"),
		},
	}}, nil
}

func bindMount(src, rw string) mount.Mount {
	return mount.Mount{Type: "bind", Source: src, Options: []string{"rbind", rw}}
}

// lmounts returns the mounts of an active snapshot or view, mounting again
// what is gone (after a reboot, or a crash between steps).
func (s *snapshotter) lmounts(ctx context.Context, key string) ([]mount.Mount, error) {
	sn, err := s.getSnapshot(ctx, key)
	if err != nil {
		return nil, err
	}
	// Under the upper's lock, the snapshot must still be active: a Commit
	// that held the lock may have turned it into a layer meanwhile.
	unlock := s.devs.lock(devKey{sn.ID, roleUpper})
	defer unlock()
	if sn, err = s.getSnapshot(ctx, key); err != nil {
		return nil, err
	}
	return s.lmountsOf(ctx, sn)
}

func (s *snapshotter) getSnapshot(ctx context.Context, key string) (sn storage.Snapshot, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		sn, err = storage.GetSnapshot(ctx, key)
		return err
	})
	return sn, err
}

// lcommit turns an active snapshot into an erofs layer: freeze its upper
// (or prove nothing has a plain-directory upper mounted), mkfs.erofs into
// staging, check, fsync, rename, record; then release the upper.
func (s *snapshotter) lcommit(ctx context.Context, name, key string, opts []snapshots.Opt) error {
	id, _, err := s.checkCommit(ctx, name, key)
	if err != nil {
		return err
	}
	unlock := s.devs.lock(devKey{id, roleUpper})
	defer unlock()
	up := s.upperOf(id)
	staging, err := os.MkdirTemp(filepath.Join(s.root, "staging"), "layer-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(staging)
	tmp := filepath.Join(staging, "layer.erofs")
	if up.image != "" {
		if err := s.ensureUpper(ctx, id, up); err != nil {
			return err
		}
		err = s.buildFrozen(ctx, up, tmp)
	} else {
		err = buildFromDir(ctx, up.upper, tmp)
	}
	if err != nil {
		return err
	}
	s.fault("commit-built")
	if err := checkLayer(ctx, tmp); err != nil {
		return err
	}
	if err := syncPath(tmp); err != nil {
		return err
	}
	usage, err := layerUsage(tmp)
	if err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		return err
	}
	if err := os.Rename(tmp, s.layerImage(id)); err != nil {
		return fmt.Errorf("rename layer into place: %w", err)
	}
	// The rename, before the record that names the layer.
	if err := syncDir(filepath.Join(s.root, "layers")); err != nil {
		return err
	}
	s.fault("commit-synced")
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, name, usage, opts...)
		return err
	})
	if err != nil {
		return err
	}
	s.fault("commit-recorded")
	s.releaseUpperLocked(ctx, id, key)
	// containerd runs no garbage collection after an unpack: delete the
	// upper now rather than at the next Cleanup, or disk use after unpack
	// would be the layers twice. (A running container's image file stays
	// allocated until its last close, as any unlinked open file.)
	s.emptyTrash(ctx, id)
	s.fault("commit-done")
	return nil
}

// lremove deletes the record, then unmounts and detaches what the snapshot
// owned and moves its files to trash.
func (s *snapshotter) lremove(ctx context.Context, key string) error {
	id, _, kind, err := s.removeRecord(ctx, key)
	if err != nil {
		return err
	}
	s.fault("remove-recorded")
	if kind == snapshots.KindCommitted {
		s.releaseLayer(ctx, id, key)
		return nil
	}
	if _, err := os.Lstat(s.upperRoot(id)); err == nil {
		s.releaseUpper(ctx, id, key)
	}
	return nil
}

// releaseUpper unmounts and detaches the upper of snapshot id and moves its
// directory to trash. Failures are logged: the record is already gone, and
// Cleanup retries.
func (s *snapshotter) releaseUpper(ctx context.Context, id, key string) {
	unlock := s.devs.lock(devKey{id, roleUpper})
	defer unlock()
	s.releaseUpperLocked(ctx, id, key)
}

func (s *snapshotter) releaseUpperLocked(ctx context.Context, id, key string) {
	fields := log.Fields{"key": key, "id": id}
	up := s.upperOf(id)
	if up.image != "" {
		if err := unmountPath(up.mnt); err != nil {
			log.G(ctx).WithError(err).WithFields(fields).Warn("unmount upper")
		}
		s.fault("release-unmounted")
		if err := s.devs.detachImage(ctx, up.image, devKey{id, roleUpper}); err != nil {
			log.G(ctx).WithError(err).WithFields(fields).Warn("detach upper device")
		}
		s.fault("release-detached")
	}
	if err := s.toTrash(s.upperRoot(id), id); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithFields(fields).Warn("move upper to trash")
	}
}

// emptyTrash deletes the trash entries of snapshot id.
func (s *snapshotter) emptyTrash(ctx context.Context, id string) {
	dir := filepath.Join(s.root, "trash")
	es, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range es {
		if strings.HasPrefix(e.Name(), id+"-") {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				log.G(ctx).WithError(err).WithField("id", id).Warn("delete committed upper")
			}
		}
	}
}

// releaseLayer unmounts layer id, detaches its device and trashes its image.
func (s *snapshotter) releaseLayer(ctx context.Context, id, key string) {
	fields := log.Fields{"key": key, "id": id}
	k := devKey{id, roleLayer}
	unlock := s.devs.lock(k)
	defer unlock()
	if err := unmountPath(s.layerDir(id)); err != nil {
		log.G(ctx).WithError(err).WithFields(fields).Warn("unmount layer")
	}
	if err := os.Remove(s.layerDir(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithFields(fields).Warn("remove layer mount point")
	}
	s.fault("remove-unmounted")
	if err := s.devs.detachImage(ctx, s.layerImage(id), k); err != nil {
		log.G(ctx).WithError(err).WithFields(fields).Warn("detach layer device")
	}
	s.fault("remove-detached")
	if err := s.toTrash(s.layerImage(id), id); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithFields(fields).Warn("move layer to trash")
	}
}
