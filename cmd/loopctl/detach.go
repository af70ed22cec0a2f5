package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

func runDetach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("detach", "[FLAGS] DEVICE", stderr)
	diskseq := fs.Uint64("diskseq", 0, "detach only if the device is still the attachment with this diskseq (0 = no check)")
	wait := fs.Bool("wait", false, "wait until the kernel has unbound the device (it defers while a mount or opener holds it)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	if err := parseFlags(fs, args, 1); err != nil {
		return err
	}
	path := fs.Arg(0)
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	d, err := loopdev.Open(ctx, path, loopdev.OpenOptions{Access: loopdev.AccessReadOnly, ExpectDiskSeq: *diskseq, Logger: logger(ctx)})
	if err != nil {
		return fmt.Errorf("detach: %w", err) // "open F: ..."
	}
	// Open hands back a handle we do not own; taking ownership is the
	// explicit step that allows Detach.
	if err := d.Unrelinquish(); err != nil {
		d.Close()
		return fmt.Errorf("detach: %w", err) // names the device
	}
	err = d.DetachWith(ctx, loopdev.DetachOptions{Wait: *wait})
	if errors.Is(err, loopdev.ErrDetachDeferred) {
		fmt.Fprintf(stderr, "loopctl detach: %s still in use; the kernel unbinds it at its last close\n", path)
		return nil
	}
	return err // "detach /dev/loopN: ..." already
}
