package hook

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// undoStack runs registered undo steps in reverse order.
type undoStack []func()

func (u *undoStack) push(f func()) { *u = append(*u, f) }

func (u *undoStack) run() {
	for i := len(*u) - 1; i >= 0; i-- {
		(*u)[i]()
	}
	*u = nil
}

// Setup mounts the requested images into the container in st, with the
// admin's --mount requests in args. Each resource registers its undo as soon
// as it exists; on failure everything is undone in reverse, because podman
// runs no poststop after a failed setup.
func (h *Hook) Setup(ctx context.Context, st *State, args []Request) (err error) {
	start := time.Now()
	log := h.entry(st, "setup")
	ctx = withLog(ctx, log)
	if err := validateSetupStage(st); err != nil {
		return err
	}
	reqs, err := h.requests(st, args)
	if err != nil {
		return err
	}
	if len(reqs) == 0 {
		log.Debug("no mount requested")
		return nil
	}
	plans, err := MakePlans(h.cfg, reqs)
	if err != nil {
		return err
	}
	if err := CheckRootless(); err != nil {
		return err
	}
	images, err := openImages(plans, h.cfg.AllowedFSTypes)
	defer func() {
		for _, im := range images {
			im.Close()
		}
	}()
	if err != nil {
		return err
	}
	ctr, err := PinContainer(st.Pid)
	if err != nil {
		return err
	}
	defer ctr.Close()
	sess, err := h.lockContainer(ctx, st)
	if err != nil {
		return err
	}
	defer sess.unlock(log)
	// Registered after the unlock so it runs before it.
	var undo undoStack
	defer func() {
		if err != nil {
			undo.run()
		}
	}()
	done, err := h.settlePrevious(ctx, sess, st, ctr, log)
	if err != nil || done {
		return err
	}
	if err := lockImages(images); err != nil {
		return err
	}
	rootfs, err := rootfsPath(st.Bundle)
	if err != nil {
		return err
	}

	placements := make([]Placement, len(images))
	for i, im := range images {
		placements[i] = Placement{
			Rootfs: rootfs, Dest: im.Dest, InRoot: h.cfg.DestSymlinks == "in-root", CreateDest: h.cfg.CreateDest,
			AllowedPrefixes: h.cfg.DestAllowedPrefixes,
		}
	}
	dests, err := ctr.ResolveDests(placements)
	if err != nil {
		return err
	}
	defer func() {
		for _, d := range dests {
			d.Close()
		}
	}()

	rec := &Record{
		ToolVersion:   h.version,
		ID:            st.ID,
		Bundle:        st.Bundle,
		InitPid:       ctr.Pid,
		InitStartTime: ctr.StartTime,
		MntNSInode:    ctr.MntNSInode,
		Created:       time.Now().UTC(),
	}
	undo.push(func() {
		if err := sess.store.Remove(sess.name); err != nil {
			log.WithError(err).Warn("rollback: remove state")
		}
	})
	var attachTime time.Duration
	var devs []*loopdev.Device
	for i, im := range images {
		t0 := time.Now()
		dev, err := h.attach(ctx, im, sess.name, &undo, log)
		attachTime += time.Since(t0)
		if err != nil {
			return err
		}
		devs = append(devs, dev)
		mrec := mountRecord(im, dev)
		rec.Mounts = append(rec.Mounts, mrec)
		// Written only after the attach, so every record on disk names a
		// complete, verifiable binding.
		if err := sess.store.Write(sess.name, rec); err != nil {
			return err
		}
		if err := h.mountOne(ctr, im, dev, dests[i]); err != nil {
			return err
		}
		rec.Mounts[len(rec.Mounts)-1].Phase = PhaseMounted
		if err := sess.store.Write(sess.name, rec); err != nil {
			return err
		}
		log.WithFields(logrus.Fields{
			"image": im.ImagePath, "dest": im.Dest, "device": dev.Path(),
			"devnum": dev.Devnum().String(), "diskseq": dev.DiskSeq(), "fstype": im.FSType, "rw": im.RW,
		}).Info("mounted")
	}
	// The mounts inside the container now hold the devices; closing our fds
	// leaves them to the kernel (autoclear when the container's namespace dies).
	for _, dev := range devs {
		if err := dev.Close(); err != nil {
			log.WithError(err).WithField("device", dev.Path()).Warn("close loop device")
		}
	}
	log.WithFields(logrus.Fields{
		"mounts": len(images), "duration": time.Since(start).String(), "attach_duration": attachTime.String(),
	}).Info("setup done")
	return nil
}

// settlePrevious deals with a record already stored for this container key.
// The same pid, start time and mount namespace mean an earlier hook stage
// already did the work (the hook registered as both prestart and
// createRuntime): done, so that no second mount stacks on the first. A
// record whose container still runs belongs to another container with the
// same id and bundle (another runtime root): refused, its mounts are not
// ours to release. Anything else is a leftover of a run whose poststop never
// came, torn down first.
func (h *Hook) settlePrevious(ctx context.Context, sess *session, st *State, ctr *Container, log *logrus.Entry) (done bool, err error) {
	prev, err := sess.store.Read(sess.name)
	if err != nil || prev == nil {
		return false, err
	}
	if prev.InitPid == ctr.Pid && prev.InitStartTime == ctr.StartTime && prev.MntNSInode == ctr.MntNSInode {
		log.WithField("mounts", len(prev.Mounts)).Info("already set up by an earlier hook stage for this container; nothing to do")
		return true, nil
	}
	if alive(prev) {
		return false, refusedf("another running container (pid %d) with the same id and bundle already has mounts from this hook", prev.InitPid)
	}
	return false, h.teardownLocked(ctx, sess, st.ID, log.WithField("step", "setup-leftover"))
}

func validateSetupStage(st *State) error {
	if st.Status != StatusCreating {
		return unsupportedf("wrong stage: status %q, setup needs %q (createRuntime or prestart)", truncate(st.Status, 32), StatusCreating)
	}
	if st.Pid <= 1 {
		return unsupportedf("wrong stage: pid %d (setup runs as createRuntime or prestart, not createContainer)", st.Pid)
	}
	return nil
}

// openImages opens every image; on error the ones already open are returned
// too, for the caller to close.
func openImages(plans []Plan, allowed []string) ([]*Image, error) {
	images := make([]*Image, 0, len(plans))
	for _, p := range plans {
		im, err := OpenImage(p, allowed)
		if err != nil {
			return images, err
		}
		images = append(images, im)
	}
	return images, nil
}

// lockImages refuses an image that another container has bound in a
// conflicting mode (rw and ro never mix; rw is exclusive). The flock that
// enforces this for cooperating hooks is taken by pkg/loopdev on the open
// file description the loop device holds (Options.BackingLock), so it lasts
// exactly as long as the binding; this scan also catches bindings made by
// tools that take no lock.
func lockImages(images []*Image) error {
	for _, im := range images {
		bound, err := loopdev.FindByBacking(im.ImagePath, loopdev.BackingID{Dev: im.Dev, Ino: im.Ino})
		if err != nil {
			return fmt.Errorf("list loop devices of %s: %w", im.ImagePath, err)
		}
		for _, b := range bound {
			switch {
			case im.RW:
				return refusedf("image %q is already attached to %s; rw needs exclusive use", im.displayName(), b.Path)
			case !b.ReadOnly:
				return refusedf("image %q is held read-write by %s", im.displayName(), b.Path)
			}
		}
	}
	return nil
}

// attach binds the image to a loop device with autoclear (the default of
// pkg/loopdev unless Keep): if this process dies, closing its fds frees the
// device. Rollback detaches it.
func (h *Hook) attach(ctx context.Context, im *Image, name string, undo *undoStack, log *logrus.Entry) (*loopdev.Device, error) {
	// DirectIO is always set: a nil pointer would let the library pick its
	// own default, and the hook's only input for this is its config.
	dio := h.cfg.DirectIO
	opts := loopdev.Options{
		Access: loopdev.AccessReadOnly, FileName: ownerTag(name), BackingLock: loopdev.LockShared,
		DirectIO: &dio, Logger: slogFrom(ctx),
	}
	if im.RW {
		opts.Access, opts.BackingLock = loopdev.AccessReadWrite, loopdev.LockExclusive
	}
	dev, err := loopdev.AttachFile(ctx, im.File, opts)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, refusedf("image %q is locked by another container (rw and ro never mix)", im.displayName())
	}
	if err != nil {
		// pkg/loopdev's error starts with "attach <backing path>".
		if im.Name == "" {
			return nil, err
		}
		return nil, fmt.Errorf("image %q: %w", im.Name, err)
	}
	undo.push(func() {
		// A rollback after the deadline still gets a moment to detach.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		if err := dev.Detach(rctx); err != nil && !errors.Is(err, loopdev.ErrDetachDeferred) {
			log.WithError(err).WithField("device", dev.Path()).Warn("rollback: detach")
		}
	})
	if dev.DiskSeq() == 0 && h.cfg.RequireDiskseq {
		return nil, unsupportedf("kernel reports no diskseq for %s (needs Linux 5.15); require_diskseq is on", dev.Path())
	}
	if h.hookForceAfterAttach != nil {
		h.hookForceAfterAttach(dev)
	}
	return dev, nil
}

func ownerTag(name string) string {
	tag := ownerTagPrefix + name
	if len(tag) > 63 {
		tag = tag[:63]
	}
	return tag
}

// mountOne builds the detached mount on the host (where /dev/loopN is looked
// up) and moves it onto the pinned destination inside the container.
func (h *Hook) mountOne(ctr *Container, im *Image, dev *loopdev.Device, dest *os.File) error {
	mnt, err := BuildMount(MountOptions{
		FSType: im.FSType, Source: dev.Path(), RW: im.RW, Noexec: im.Noexec,
		Ext4ROFlags: h.cfg.Ext4ReadOnlyOptions,
	})
	if err != nil {
		return fmt.Errorf("mount image %q: %w", im.displayName(), err)
	}
	defer mnt.Close()
	if ctr.OwnUserNS {
		locked, err := lockFlags(mnt, h.cfg.StateDir)
		if err != nil {
			return fmt.Errorf("mount image %q: %w", im.displayName(), err)
		}
		defer locked.Close()
		mnt = locked
	}
	return ctr.MoveInto(mnt, dest)
}

func mountRecord(im *Image, dev *loopdev.Device) MountRecord {
	mode := "ro"
	if im.RW {
		mode = "rw"
	}
	return MountRecord{
		Name: im.Name, ImagePath: im.ImagePath, ImageDev: im.Dev, ImageIno: im.Ino, ImageSize: im.Size,
		FSType: im.FSType, Mode: mode, Dest: im.Dest,
		Device: dev.Path(), Devnum: dev.Devnum(), DiskSeq: dev.DiskSeq(), Phase: PhaseAttached,
	}
}
