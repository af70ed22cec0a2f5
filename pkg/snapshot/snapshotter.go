// Package snapshot implements the loop snapshotter, a containerd
// snapshotter whose writable snapshots are size-limited ext4 images on loop
// devices (pkg/loopdev). In layered mode (the default, see layered.go)
// committed layers are shared erofs images; in flat mode every snapshot is
// one cumulative ext4 image on its own device.
//
// The package follows containerd's rule for snapshotters: NewSnapshotter
// returns containerd's snapshots.Snapshotter (the value also implements
// snapshots.Cleaner) and the concrete type is unexported. Link it into
// containerd with pkg/snapshot/plugin, or run the loop-snapshotter binary,
// which serves it over containerd's proxy API. What only that binary uses
// (its status service, metrics, Purge and the crash tests' fault hook) is
// not exported here: the binary reaches it through an internal package,
// because those types are the daemon's wire format and test seams, of no
// use to an embedder and not worth freezing as an API.
//
// Flat-mode layout under root:
//
//	lock                 flock held by the running instance
//	mode                 storage mode of this root ("flat")
//	metadata.db          containerd storage.MetaStore (bbolt)
//	templates/ext4-N.img empty ext4 images of N bytes
//	snapshots/<id>/image one cumulative image per snapshot (id = MetaStore id)
//	staging/new-*        images being cloned, not yet in the metadata
//	trash/               removed images, deleted by Cleanup
//	damaged/             removed images whose Commit found data loss, kept
//	                     for inspection (never deleted by Cleanup)
//
// No clone, mkfs, resize2fs, e2fsck, fsync of an image or loopdev call runs
// inside a metadata transaction; the lock order is device key, then
// transaction.
package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/snapadmin"
	"github.com/loopkit/loopkit/pkg/config"
)

// LabelMaxSize is the per-snapshot filesystem size label (containerd 2.4,
// core/snapshots.LabelSnapshotMaxSize), in decimal bytes.
const LabelMaxSize = "containerd.io/snapshot/max-size"

// ErrRootInUse is returned by NewSnapshotter when another instance holds the root.
var ErrRootInUse = errors.New("snapshotter root is in use by another instance")

// Opt configures the snapshotter NewSnapshotter builds.
type Opt func(*snapshotter)

// withFaultHook is the in-package tests' form of snapadmin.WithFaultHook.
func withFaultHook(fn func(step string)) Opt {
	return func(s *snapshotter) { s.fault = fn }
}

// snapshotter is the loop snapshotter, in either storage mode. It implements
// snapshots.Snapshotter and snapshots.Cleaner.
type snapshotter struct {
	root    string
	cfg     config.Snapshotter
	mode    string // resolved storage mode of this root
	backing string // layered mode: how layers are mounted, backingFile or backingLoop
	// layerMountData is the erofs mount data of file-backed layers.
	layerMountData string
	ms             *storage.MetaStore
	lock           *os.File
	devs           *devices

	// cleanupMu keeps Cleanup's scan of snapshots/ and staging/ away from a
	// Prepare between its staging clone and its committed rename.
	cleanupMu sync.RWMutex
	tmplMu    sync.Mutex

	// damaged records, per snapshot id, why Commit refused its image,
	// for when the marker file could not be written (a full disk).
	damagedMu sync.Mutex
	damaged   map[string]string

	closeOnce sync.Once
	closeErr  error
	fault     func(step string)

	m metrics
}

var (
	_ snapshots.Snapshotter = (*snapshotter)(nil)
	_ snapshots.Cleaner     = (*snapshotter)(nil)
	_ snapadmin.Snapshotter = (*snapshotter)(nil)
)

// NewSnapshotter opens (or creates) the snapshotter state under cfg.Root,
// reconciles loop devices with the metadata and returns a ready
// snapshotter. It also implements snapshots.Cleaner. Close it to release
// the root; its loop devices stay attached (running containers use them).
func NewSnapshotter(ctx context.Context, cfg config.Snapshotter, opts ...Opt) (snapshots.Snapshotter, error) {
	s, err := newSnapshotter(ctx, cfg, opts...)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return s, nil
}

func newSnapshotter(ctx context.Context, cfg config.Snapshotter, opts ...Opt) (*snapshotter, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, err
	}
	s := &snapshotter{root: root, cfg: cfg, fault: func(string) {}, damaged: map[string]string{}}
	if fn := snapadmin.FaultHook(ctx); fn != nil {
		s.fault = fn
	}
	for _, o := range opts {
		o(s)
	}
	var directIO *bool
	switch cfg.DirectIO {
	case "on":
		v := true
		directIO = &v
	case "off":
		v := false
		directIO = &v
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create root: %w", err)
	}
	// sysfs reports backing files by their resolved path.
	if root, err = filepath.EvalSymlinks(root); err != nil {
		return nil, err
	}
	s.root = root
	s.devs = newDevices(root, directIO, &s.m)
	if err := s.lockRoot(); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			s.lock.Close()
		}
	}()
	if err := s.checkMode(); err != nil {
		return nil, err
	}
	dirs := []string{"templates", "snapshots", "staging", "trash", "damaged"}
	if s.layered() {
		dirs = layeredDirs
	}
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	if s.layered() {
		if s.backing, err = s.layerBacking(ctx); err != nil {
			return nil, err
		}
	}
	s.ms, err = storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		return nil, err
	}
	if err := s.reconcile(ctx); err != nil {
		s.ms.Close()
		return nil, fmt.Errorf("reconcile: %w", err)
	}
	ok = true
	return s, nil
}

func (s *snapshotter) lockRoot() error {
	f, err := os.OpenFile(filepath.Join(s.root, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open root lock: %w", err)
	}
	// Held for the life of the process; the kernel drops it when we die.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("%s: %w", s.root, ErrRootInUse)
		}
		return fmt.Errorf("lock root: %w", err)
	}
	s.lock = f
	return nil
}

// checkMode resolves the storage mode: the one recorded in the root, else
// the configured one (layered when unset) for a new root, which it records.
// A root made in another mode than the configured one is refused: the two
// layouts share no file. A mode file left empty (a crash on first start by
// an older version) in a root that has no metadata yet is a first start.
func (s *snapshotter) checkMode() error {
	p := filepath.Join(s.root, "mode")
	b, err := os.ReadFile(p)
	if err == nil && len(bytes.TrimSpace(b)) == 0 {
		if _, serr := os.Stat(filepath.Join(s.root, "metadata.db")); errors.Is(serr, os.ErrNotExist) {
			err = os.ErrNotExist
		}
	}
	if errors.Is(err, os.ErrNotExist) {
		s.mode = s.cfg.Mode
		if s.mode == "" {
			s.mode = config.ModeLayered
		}
		return writeModeFile(p, s.mode)
	}
	if err != nil {
		return err
	}
	m := strings.TrimSpace(string(b))
	if m != config.ModeFlat && m != config.ModeLayered {
		return fmt.Errorf("root %s: mode file holds %q, not layered or flat: %w", s.root, m, errdefs.ErrFailedPrecondition)
	}
	if s.cfg.Mode != "" && m != s.cfg.Mode {
		return fmt.Errorf("root %s holds a %s-mode store but mode = %q is configured: remove the mode key to keep using it, "+
			"or point root at a new directory and pull images again to move to %s mode: %w", s.root, m, s.cfg.Mode, s.cfg.Mode, errdefs.ErrFailedPrecondition)
	}
	s.mode = m
	return nil
}

// writeModeFile writes the mode file durably (temporary file, fsync,
// rename, fsync of root): an empty mode file after a crash on first start
// would make the next start refuse the root.
func writeModeFile(p, mode string) error {
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.WriteString(mode + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err == nil {
		err = syncDir(filepath.Dir(p))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("record mode: %w", err)
	}
	return nil
}

func (s *snapshotter) layered() bool { return s.mode == config.ModeLayered }

func (s *snapshotter) imagePath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "image")
}

// Stat returns the info of a snapshot by key or name.
func (s *snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update changes the labels of a snapshot; other field paths are rejected.
func (s *snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (_ snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		info, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	return info, err
}

// Walk calls fn for every snapshot matching the filters.
func (s *snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Usage reports what a snapshot uses (see imageUsage): measured now for an
// active snapshot, the value stored at Commit for a committed one, nothing
// for a view of a parent (it shares the parent's image).
func (s *snapshotter) Usage(ctx context.Context, key string) (usage snapshots.Usage, err error) {
	if s.layered() {
		return s.lusage(ctx, key)
	}
	var (
		id, parentID string
		info         snapshots.Info
	)
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, usage, err = storage.GetInfo(ctx, key)
		if err != nil || info.Kind == snapshots.KindCommitted || info.Parent == "" {
			return err
		}
		parentID, _, _, err = storage.GetInfo(ctx, info.Parent)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindCommitted {
		return usage, nil
	}
	if info.Kind == snapshots.KindView && info.Parent != "" {
		return snapshots.Usage{}, nil
	}
	k := devKey{id, roleRW}
	if info.Kind == snapshots.KindView {
		k.role = roleRO
	}
	mnt := ""
	if rec, ok := s.devs.cached(k); ok {
		mnt = mountPoints()[rec.Devnum]
	}
	return imageUsage(s.imagePath(id), parentImage(s, parentID), mnt)
}

func parentImage(s *snapshotter, parentID string) string {
	if parentID == "" {
		return ""
	}
	return s.imagePath(parentID)
}

// Prepare creates an active snapshot: a clone of the parent image (or of an
// empty template) attached read-write.
func (s *snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if s.layered() {
		return s.lcreate(ctx, snapshots.KindActive, key, parent, opts)
	}
	return s.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot of a committed parent. It shares the
// parent's image through one read-only device; a view without a parent
// gets its own empty image.
func (s *snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if s.layered() {
		return s.lcreate(ctx, snapshots.KindView, key, parent, opts)
	}
	return s.create(ctx, snapshots.KindView, key, parent, opts)
}

// targetSize resolves the filesystem size of a new snapshot from the
// max-size label, else default_size. The label is a hint, as for
// containerd's erofs snapshotter: a value that is not a number, or is below
// the minimum, falls back to default_size, and one above max_size is
// capped, each with a warning; neither fails the Prepare.
func (s *snapshotter) targetSize(ctx context.Context, key string, labels map[string]string) int64 {
	def := int64(s.cfg.DefaultSize)
	v, ok := labels[LabelMaxSize]
	if !ok {
		return def
	}
	warn := func(msg string, size int64) int64 {
		log.G(ctx).WithFields(log.Fields{"key": key, "label": LabelMaxSize, "value": v, "size": size}).Warn(msg)
		return size
	}
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	switch {
	case err != nil:
		return warn("size label is not a decimal number of bytes: using default_size", def)
	case n < config.MinSnapshotSize:
		return warn(fmt.Sprintf("size label is below the minimum %d: using default_size", config.MinSnapshotSize), def)
	case n > int64(s.cfg.MaxSize):
		n = warn("size label is above max_size: capped", int64(s.cfg.MaxSize))
	}
	return (n + blockSize - 1) / blockSize * blockSize
}

func (s *snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	size := s.targetSize(ctx, key, base.Labels)
	// Cheap checks first, so a bad request clones nothing.
	parentID, err := s.checkNew(ctx, key, parent)
	if err != nil {
		return nil, err
	}

	if kind == snapshots.KindView && parentID != "" {
		var sn storage.Snapshot
		if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			sn, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
			return err
		}); err != nil {
			return nil, err
		}
		return s.attachNew(ctx, key, sn, devKey{parentID, roleRO}, s.imagePath(parentID))
	}

	sn, err := s.createImage(ctx, kind, key, parent, parentID, size, opts)
	if err != nil {
		return nil, err
	}
	r := roleRW
	if kind == snapshots.KindView {
		r = roleRO
	}
	return s.attachNew(ctx, key, sn, devKey{sn.ID, r}, s.imagePath(sn.ID))
}

// checkNew verifies that key is free and that parent, if any, is
// committed, and returns the parent's id.
func (s *snapshotter) checkNew(ctx context.Context, key, parent string) (parentID string, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		if _, _, _, err := storage.GetInfo(ctx, key); err == nil {
			return fmt.Errorf("snapshot %v: %w", key, errdefs.ErrAlreadyExists)
		} else if !errdefs.IsNotFound(err) {
			return err
		}
		if parent == "" {
			return nil
		}
		id, pinfo, _, err := storage.GetInfo(ctx, parent)
		if err != nil {
			return fmt.Errorf("parent %q: %w", parent, err)
		}
		if pinfo.Kind != snapshots.KindCommitted {
			return fmt.Errorf("parent %q is not a committed snapshot: %w", parent, errdefs.ErrInvalidArgument)
		}
		parentID = id
		return nil
	})
	return parentID, err
}

// createImage clones the source image into staging, then records the
// snapshot and renames the staging directory to snapshots/<id> in one short
// write transaction.
func (s *snapshotter) createImage(ctx context.Context, kind snapshots.Kind, key, parent, parentID string, size int64, opts []snapshots.Opt) (storage.Snapshot, error) {
	s.cleanupMu.RLock()
	defer s.cleanupMu.RUnlock()

	src := ""
	if parentID != "" {
		src = s.imagePath(parentID)
	} else {
		t, err := s.template(ctx, size)
		if err != nil {
			return storage.Snapshot{}, err
		}
		src = t
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
	img := filepath.Join(staging, "image")
	method, err := cloneImage(src, img)
	if err != nil {
		return storage.Snapshot{}, err
	}
	st, err := os.Stat(img)
	if err != nil {
		return storage.Snapshot{}, err
	}
	if method == cloneReflink {
		s.m.cloneReflink.Add(1)
	} else {
		s.m.cloneSparse.Add(1)
	}
	if size > st.Size() {
		if err := growImage(ctx, img, size); err != nil {
			return storage.Snapshot{}, err
		}
		s.m.grows.Add(1)
	} else if size < st.Size() {
		if err := shrinkImage(ctx, img, size); err != nil {
			return storage.Snapshot{}, err
		}
		s.m.shrinks.Add(1)
	}
	// The image (fsynced by the clone or resize) and its directory entries
	// must be durable before the record naming them commits: btrfs, unlike
	// ext4's data=ordered, gives no such ordering for free.
	if err := syncDir(staging); err != nil {
		return storage.Snapshot{}, err
	}
	if err := syncDir(filepath.Dir(staging)); err != nil {
		return storage.Snapshot{}, err
	}
	s.fault("prepare-cloned")

	var sn storage.Snapshot
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		sn, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return err
		}
		dir := filepath.Join(s.root, "snapshots", sn.ID)
		// A directory left by a crash before an earlier commit of this same
		// id (the id sequence did not advance) is moved out of the way.
		if _, err := os.Lstat(dir); err == nil {
			if err := s.toTrash(dir, sn.ID); err != nil {
				return err
			}
		}
		if err := os.Rename(staging, dir); err != nil {
			return fmt.Errorf("rename staging image: %w", err)
		}
		s.fault("prepare-renamed")
		// The rename, before the record that names its target.
		return syncDir(filepath.Join(s.root, "snapshots"))
	})
	if err != nil {
		if sn.ID != "" {
			// The rename may have happened before the commit failed.
			if _, serr := os.Stat(staging); errors.Is(serr, os.ErrNotExist) {
				staging = filepath.Join(s.root, "snapshots", sn.ID)
			}
		}
		return storage.Snapshot{}, err
	}
	staging = ""
	log.G(ctx).WithFields(log.Fields{"key": key, "id": sn.ID, "clone": string(method), "size": size}).Debug("created image")
	s.fault("prepare-committed")
	return sn, nil
}

// attachNew attaches the device of a just-created snapshot and returns its
// mounts; if the attach fails, the record is removed again.
func (s *snapshotter) attachNew(ctx context.Context, key string, sn storage.Snapshot, k devKey, image string) ([]mount.Mount, error) {
	rec, err := s.devs.ensure(ctx, k, image)
	if err == nil {
		s.fault("prepare-attached")
		return s.mounts(rec.Path, k.role), nil
	}
	if rerr := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, key)
		return err
	}); rerr != nil {
		log.G(ctx).WithError(rerr).WithField("key", key).Warn("undo snapshot record after failed attach")
	} else if k.id == sn.ID {
		if terr := s.toTrash(filepath.Dir(image), sn.ID); terr != nil {
			log.G(ctx).WithError(terr).WithField("key", key).Warn("move image to trash after failed attach")
		}
	}
	return nil, err
}

func (s *snapshotter) mounts(device string, r role) []mount.Mount {
	opt := "rw"
	if r == roleRO {
		opt = "ro"
	}
	return []mount.Mount{{
		Type:    "ext4",
		Source:  device,
		Options: append([]string{opt}, s.cfg.MountOptions...),
	}}
}

// template returns the path of the empty ext4 image of the given size,
// making it on first use.
func (s *snapshotter) template(ctx context.Context, size int64) (string, error) {
	return s.templateFile(ctx, "ext4-", size, makeTemplate)
}

// templateFile returns templates/<prefix><size>.img, made by mk on first use.
func (s *snapshotter) templateFile(ctx context.Context, prefix string, size int64, mk func(context.Context, string, int64) error) (string, error) {
	p := s.templatePath(prefix, size)
	s.tmplMu.Lock()
	defer s.tmplMu.Unlock()
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	tmp := p + ".tmp"
	os.Remove(tmp)
	if err := mk(ctx, tmp, size); err != nil {
		os.Remove(tmp)
		return "", err
	}
	if err := os.Rename(tmp, p); err != nil {
		return "", err
	}
	if err := syncDir(filepath.Dir(p)); err != nil {
		return "", err
	}
	return p, nil
}

func (s *snapshotter) templatePath(prefix string, size int64) string {
	return filepath.Join(s.root, "templates", prefix+strconv.FormatInt(size, 10)+".img")
}

// Mounts returns the mounts of an active snapshot or view, re-attaching its
// device if it is gone (host reboot, detached by hand) or was reused. The
// snapshot is read again under the device lock: a Commit that held the
// lock meanwhile has made the image read-only and committed, and a
// read-write device attached to it then would stay until Cleanup. An
// active snapshot whose filesystem is mounted read-write here already gets
// a bind of that mount instead of its device (see activeMounts).
func (s *snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	if s.layered() {
		return s.lmounts(ctx, key)
	}
	sn, err := s.getSnapshot(ctx, key)
	if err != nil {
		return nil, err
	}
	k := deviceFor(sn)
	s.fault("mounts-read")
	unlock := s.devs.lock(k)
	defer unlock()
	again, err := s.getSnapshot(ctx, key)
	if err != nil {
		return nil, err
	}
	if again.ID != sn.ID || deviceFor(again) != k {
		return nil, fmt.Errorf("snapshot %q changed while its device was being looked up: %w", key, errdefs.ErrUnavailable)
	}
	rec, err := s.devs.ensureLocked(ctx, k, s.imagePath(k.id))
	if err != nil {
		return nil, err
	}
	if k.role == roleRW {
		return s.activeMounts(ctx, key, rec), nil
	}
	return s.mounts(rec.Path, k.role), nil
}

// deviceFor names the device an active snapshot or view is mounted from.
func deviceFor(sn storage.Snapshot) devKey {
	switch {
	case sn.Kind == snapshots.KindActive:
		return devKey{sn.ID, roleRW}
	case len(sn.ParentIDs) > 0:
		return devKey{sn.ParentIDs[0], roleRO}
	default:
		return devKey{sn.ID, roleRO}
	}
}

// Commit turns an unmounted active snapshot into a committed one: detach
// its device, replay a dirty journal, refuse an image whose filesystem lost
// data, make it read-only and durable, then record it.
//
// containerd 1.6 calls this inside its metadata write transaction, so it
// waits for nothing slow: a device still mounted elsewhere is reported at
// once (see detachUnmounted).
func (s *snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	if s.layered() {
		return s.lcommit(ctx, name, key, opts)
	}
	id, parentID, err := s.checkCommit(ctx, name, key)
	if err != nil {
		return err
	}
	image := s.imagePath(id)
	k := devKey{id, roleRW}
	unlock := s.devs.lock(k)
	defer unlock()
	if reason, ok := s.damagedReason(id, image); ok {
		s.m.dataLossRefusals.Add(1)
		return dataLossError(reason)
	}
	start := time.Now()
	if err := s.devs.detachForCommit(ctx, k, image); err != nil {
		if errors.Is(err, unix.EIO) {
			// The device's flush before the clear failed: writes of the
			// filesystem never reached the image.
			return s.refuseDamaged(id, image, err)
		}
		return err
	}
	log.G(ctx).WithFields(log.Fields{"key": key, "step": "detach", "duration": time.Since(start)}).Debug("commit detached device")
	s.fault("commit-detached")
	replayed, err := checkFilesystem(ctx, image)
	if replayed {
		s.m.journalReplays.Add(1)
		log.G(ctx).WithField("key", key).Info("replayed the journal of a dirty image at commit")
	}
	if err != nil {
		return s.refuseDamaged(id, image, err)
	}
	// chmod before the fsync, which makes the mode durable with the data.
	if err := os.Chmod(image, 0o444); err != nil {
		return err
	}
	if err := syncPath(image); err != nil {
		// The kernel reports a writeback error to one fsync only: a retry
		// would succeed on an image that lost the data.
		return s.refuseDamaged(id, image, err)
	}
	usage, err := imageUsage(image, parentImage(s, parentID), "")
	if err != nil {
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
	s.fault("commit-done")
	return nil
}

// refuseDamaged records that the image of snapshot id lost data and returns
// the Commit error: errdefs.ErrDataLoss, naming the image kept for
// inspection.
func (s *snapshotter) refuseDamaged(id, image string, cause error) error {
	err := cause
	if !errors.Is(cause, errdefs.ErrDataLoss) {
		err = fmt.Errorf("%w: %w", cause, errdefs.ErrDataLoss)
	}
	if strings.Contains(err.Error(), image) {
		err = fmt.Errorf("%w; image kept for inspection", err)
	} else {
		err = fmt.Errorf("%w; image %s kept for inspection", err, image)
	}
	s.m.dataLossRefusals.Add(1)
	s.damagedMu.Lock()
	s.damaged[id] = err.Error()
	s.damagedMu.Unlock()
	markDamaged(image, err)
	return err
}

// dataLossError is the error of a Commit retried after one that found data
// loss: the first one's text, matching errdefs.ErrDataLoss.
type dataLossError string

func (e dataLossError) Error() string        { return string(e) }
func (e dataLossError) Is(target error) bool { return target == errdefs.ErrDataLoss }

// damagedReason says why an earlier Commit refused the image, if it did.
func (s *snapshotter) damagedReason(id, image string) (string, bool) {
	s.damagedMu.Lock()
	r, ok := s.damaged[id]
	s.damagedMu.Unlock()
	if ok {
		return r, true
	}
	return damagedReason(image)
}

// checkCommit verifies that key is active and name is free, and returns
// the ids of the snapshot and of its parent.
func (s *snapshotter) checkCommit(ctx context.Context, name, key string) (id, parentID string, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var info snapshots.Info
		id, info, _, err = storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		if info.Kind != snapshots.KindActive {
			return fmt.Errorf("snapshot %q is not active: %w", key, errdefs.ErrFailedPrecondition)
		}
		if _, _, _, err := storage.GetInfo(ctx, name); err == nil {
			return fmt.Errorf("committed snapshot %v: %w", name, errdefs.ErrAlreadyExists)
		}
		if info.Parent != "" {
			parentID, _, _, err = storage.GetInfo(ctx, info.Parent)
		}
		return err
	})
	return id, parentID, err
}

// Remove deletes the record, detaches the snapshot's devices and moves its
// image to trash; Cleanup deletes the trash.
func (s *snapshotter) Remove(ctx context.Context, key string) error {
	if s.layered() {
		return s.lremove(ctx, key)
	}
	id, parentID, _, err := s.removeRecord(ctx, key)
	if err != nil {
		return err
	}
	s.fault("remove-recorded")
	if parentID != "" {
		// A view has no image of its own: release the parent's read-only
		// device when no other view uses it.
		if err := s.releaseViewDevice(ctx, parentID); err != nil {
			log.G(ctx).WithError(err).WithField("key", key).Warn("release view device")
		}
		return nil
	}
	image := s.imagePath(id)
	unlock := s.devs.lock(devKey{id, roleRW})
	err = s.devs.detachImage(ctx, image, devKey{id, roleRW}, devKey{id, roleRO})
	unlock()
	if err != nil {
		log.G(ctx).WithError(err).WithField("key", key).Warn("detach removed snapshot's device")
	}
	s.fault("remove-detached")
	if _, damaged := s.damagedReason(id, image); damaged {
		dst := filepath.Join(s.root, "damaged", id+"-"+strconv.FormatInt(time.Now().UnixNano(), 36))
		if err := os.Rename(filepath.Dir(image), dst); err != nil {
			log.G(ctx).WithError(err).WithField("key", key).Warn("move damaged image out of the way")
		} else {
			log.G(ctx).WithFields(log.Fields{"key": key, "path": dst}).Warn("removed snapshot whose commit found data loss: image kept for inspection")
		}
		s.damagedMu.Lock()
		delete(s.damaged, id)
		s.damagedMu.Unlock()
		return nil
	}
	if err := s.toTrash(filepath.Dir(image), id); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("key", key).Warn("move removed image to trash")
	}
	return nil
}

// removeRecord deletes the record of key in one write transaction and
// returns what the caller then releases: its id and kind and, for a view,
// its parent's id (flat mode's views share the parent's device).
func (s *snapshotter) removeRecord(ctx context.Context, key string) (id, parentID string, kind snapshots.Kind, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		var (
			info snapshots.Info
			err  error
		)
		id, info, _, err = storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		kind = info.Kind
		if kind == snapshots.KindView && info.Parent != "" {
			if parentID, _, _, err = storage.GetInfo(ctx, info.Parent); err != nil {
				return err
			}
		}
		_, _, err = storage.Remove(ctx, key)
		return err
	})
	return id, parentID, kind, err
}

func (s *snapshotter) releaseViewDevice(ctx context.Context, parentID string) error {
	k := devKey{parentID, roleRO}
	unlock := s.devs.lock(k)
	defer unlock()
	needed, _, err := s.liveDevices(ctx)
	if err != nil {
		return err
	}
	if needed[k] {
		return nil
	}
	return s.devs.detachImage(ctx, s.imagePath(parentID), k)
}

// liveDevices returns the devices live snapshots need, and the id map.
func (s *snapshotter) liveDevices(ctx context.Context) (map[devKey]bool, map[string]string, error) {
	needed := map[devKey]bool{}
	var ids map[string]string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		ids, err = storage.IDMap(ctx)
		if errdefs.IsNotFound(err) {
			ids = map[string]string{} // fresh database: no buckets yet
			return nil
		}
		if err != nil {
			return err
		}
		for _, key := range ids {
			sn, err := storage.GetSnapshot(ctx, key)
			if errdefs.IsFailedPrecondition(err) {
				continue // committed
			}
			if err != nil {
				return err
			}
			needed[deviceFor(sn)] = true
		}
		return nil
	})
	return needed, ids, err
}

// toTrash renames dir to trash/<id>-<time>.
func (s *snapshotter) toTrash(dir, id string) error {
	dst := filepath.Join(s.root, "trash", id+"-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	return os.Rename(dir, dst)
}

// Close closes the metadata store and releases the root lock. Devices stay
// attached: running containers keep using them.
func (s *snapshotter) Close() error {
	s.closeOnce.Do(func() {
		s.closeErr = s.ms.Close()
		if err := s.lock.Close(); s.closeErr == nil {
			s.closeErr = err
		}
	})
	return s.closeErr
}

// syncDir fsyncs a directory, making renames and creations in it durable.
func syncDir(dir string) error { return syncPath(dir) }
