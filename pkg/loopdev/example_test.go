package loopdev_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// image makes a sparse 8 MiB file in a fresh directory on a real
// filesystem (a tmpfs would refuse nothing, but hides direct I/O).
func image() (string, func()) {
	dir, err := os.MkdirTemp("/var/tmp", "loopdev-example-")
	if err != nil {
		panic(err)
	}
	p := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		panic(err)
	}
	if err := os.Truncate(p, 8<<20); err != nil {
		panic(err)
	}
	return p, func() { os.RemoveAll(dir) }
}

// Attach a file and keep the device bound after this process exits, as
// `losetup -f` does. KeepFromStart saves a LOOP_SET_STATUS64 that would
// clear autoclear afterwards; it requires an owner tag, so the owner can
// find the device again after a crash.
func Example_attachAndKeep() {
	img, cleanup := image()
	defer cleanup()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	d, err := loopdev.Attach(ctx, img, loopdev.Options{Keep: true, KeepFromStart: true, FileName: "example:kept"})
	if err != nil {
		fmt.Println(err)
		return
	}
	rec := d.Record()
	d.Close() // releases the handle; the binding stays
	fmt.Println("bound after Close:", loopdev.Verify(rec) == nil)

	// Later, from any process: the guarded detach by record.
	err = loopdev.DetachRecord(ctx, rec, loopdev.DetachOptions{Wait: true})
	fmt.Println("detached:", err == nil)
	// Output:
	// bound after Close: true
	// detached: true
}

// A Record persisted as JSON (in a state file, say) detaches exactly the
// attachment it was made for: once the device is gone, or bound again by
// someone else, DetachRecord touches nothing and says so.
func ExampleDetachRecord() {
	img, cleanup := image()
	defer cleanup()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	d, err := loopdev.Attach(ctx, img, loopdev.Options{Keep: true, KeepFromStart: true, FileName: "example:record"})
	if err != nil {
		fmt.Println(err)
		return
	}
	state, _ := json.Marshal(d.Record())
	d.Close()

	var rec loopdev.Record
	if err := json.Unmarshal(state, &rec); err != nil {
		fmt.Println(err)
		return
	}
	// Exclusive refuses a device with a filesystem mounted (ErrInUse);
	// Wait returns once the kernel has really unbound it.
	opts := loopdev.DetachOptions{Exclusive: true, Wait: true}
	fmt.Println("first:", loopdev.DetachRecord(ctx, rec, opts))
	err = loopdev.DetachRecord(ctx, rec, opts)
	fmt.Println("second is ErrGone:", errors.Is(err, loopdev.ErrGone))
	// Output:
	// first: <nil>
	// second is ErrGone: true
}

// Attaching a block device read-only with nothing to change (no offset,
// size or sector size) hands back the block device itself: no loop device
// is made, and Detach only closes it.
func ExampleAttach_readOnlyBlockDevice() {
	img, cleanup := image()
	defer cleanup()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// A block device to attach: here a loop device of our own.
	blk, err := loopdev.Attach(ctx, img, loopdev.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer blk.Detach(ctx)

	d, err := loopdev.Attach(ctx, blk.Path(), loopdev.Options{Access: loopdev.AccessReadOnly})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("same device:", d.Devnum() == blk.Devnum(), "read-only:", d.ReadOnly())
	fmt.Println("detach:", d.Detach(ctx))
	// Output:
	// same device: true read-only: true
	// detach: <nil>
}
