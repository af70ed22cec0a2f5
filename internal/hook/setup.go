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

// Setup runs the setup algorithm of oci-hook-spec section 7.7 for the
// container in st, with the admin's --mount requests in args. Each resource
// registers its undo as soon as it exists; on failure everything is undone in
// reverse, because podman runs no poststop after a failed setup.
func (h *Hook) Setup(ctx context.Context, st *State, args []Request) (err error) {
	start := time.Now()
	log := h.entry(st, "setup")
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
	store, err := OpenStore(h.cfg.StateDir)
	if err != nil {
		return err
	}
	defer store.Close()
	name := StateName(st.ID)
	lock, err := store.Lock(ctx, name)
	if err != nil {
		return err
	}
	defer lock.Unlock()
	// Registered after the lock and store defers so it runs before them.
	var undo undoStack
	defer func() {
		if err != nil {
			undo.run()
		}
	}()
	if err := h.teardownLocked(ctx, store, name, st.ID, log.WithField("step", "setup-leftover")); err != nil {
		return err
	}
	if err := lockImages(images); err != nil {
		return err
	}
	ctr, err := PinContainer(st.Pid)
	if err != nil {
		return err
	}
	defer ctr.Close()
	rootfs, err := rootfsPath(st.Bundle)
	if err != nil {
		return err
	}

	placements := make([]Placement, len(images))
	for i, im := range images {
		placements[i] = Placement{Rootfs: rootfs, Dest: im.Dest, InRoot: h.cfg.DestSymlinks == "in-root", CreateDest: h.cfg.CreateDest}
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
		if err := store.Remove(name); err != nil {
			log.WithError(err).Warn("rollback: remove state")
		}
	})
	var attachTime time.Duration
	var devs []*loopdev.Device
	for i, im := range images {
		t0 := time.Now()
		dev, err := h.attach(ctx, im, st.ID, &undo, log)
		attachTime += time.Since(t0)
		if err != nil {
			return err
		}
		devs = append(devs, dev)
		mrec := mountRecord(im, dev)
		rec.Mounts = append(rec.Mounts, mrec)
		// Written only after the attach, so every record on disk names a
		// complete, verifiable binding.
		if err := store.Write(name, rec); err != nil {
			return err
		}
		if err := h.mountOne(ctr, im, dev, dests[i]); err != nil {
			return err
		}
		rec.Mounts[len(rec.Mounts)-1].Phase = PhaseMounted
		if err := store.Write(name, rec); err != nil {
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
			if im.RW || !b.ReadOnly {
				return refusedf("image %q is already attached (%s, read-only=%t); rw needs exclusive use", im.displayName(), b.Path, b.ReadOnly)
			}
		}
	}
	return nil
}

func (im *Image) displayName() string {
	if im.Name != "" {
		return im.Name
	}
	return im.ImagePath
}

// attach binds the image to a loop device with autoclear (the default of
// pkg/loopdev unless Keep): if this process dies, closing its fds frees the
// device. Rollback detaches it.
func (h *Hook) attach(ctx context.Context, im *Image, id string, undo *undoStack, log *logrus.Entry) (*loopdev.Device, error) {
	opts := loopdev.Options{Access: loopdev.AccessReadOnly, FileName: ownerTag(id), BackingLock: loopdev.LockShared}
	if im.RW {
		opts.Access, opts.BackingLock = loopdev.AccessReadWrite, loopdev.LockExclusive
	}
	dev, err := loopdev.AttachFile(ctx, im.File, opts)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, refusedf("image %q is locked by another container (rw and ro never mix)", im.displayName())
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", im.ImagePath, err)
	}
	undo.push(func() {
		if err := dev.Detach(ctx); err != nil && !errors.Is(err, loopdev.ErrDetachDeferred) {
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

func ownerTag(id string) string {
	tag := ownerTagPrefix + StateName(id)
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
	return ctr.MoveInto(mnt, dest)
}

func mountRecord(im *Image, dev *loopdev.Device) MountRecord {
	mode := "ro"
	if im.RW {
		mode = "rw"
	}
	dn := dev.Devnum()
	return MountRecord{
		Name: im.Name, ImagePath: im.ImagePath, ImageDev: im.Dev, ImageIno: im.Ino, ImageSize: im.Size,
		FSType: im.FSType, Mode: mode, Dest: im.Dest,
		LoopName:  fmt.Sprintf("loop%d", dev.Nr()),
		LoopMajor: uint32(dn.Major()), LoopMinor: uint32(dn.Minor()),
		Diskseq: dev.DiskSeq(), Phase: PhaseAttached,
	}
}
