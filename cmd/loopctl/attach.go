package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// triFlag is "auto", "on" or "off".
type triFlag struct{ v *bool }

func (f *triFlag) String() string {
	if f == nil || f.v == nil {
		return "auto"
	}
	if *f.v {
		return "on"
	}
	return "off"
}

func (f *triFlag) Set(s string) error {
	var b bool
	switch s {
	case "auto":
		f.v = nil
		return nil
	case "on", "true", "1":
		b = true
	case "off", "false", "0":
		b = false
	default:
		return errors.New(`want "auto", "on" or "off"`)
	}
	f.v = &b
	return nil
}

// sectorFlag is a logical block size: 0 (default), "auto" (GPT probe) or 512..4096.
type sectorFlag uint32

func (f *sectorFlag) String() string {
	if uint32(*f) == loopdev.SectorSizeAuto {
		return "auto"
	}
	return strconv.FormatUint(uint64(*f), 10)
}

func (f *sectorFlag) Set(s string) error {
	if s == "auto" {
		*f = sectorFlag(loopdev.SectorSizeAuto)
		return nil
	}
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return errors.New(`want "auto", 0, 512, 1024, 2048 or 4096`)
	}
	*f = sectorFlag(v)
	return nil
}

func runAttach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("attach", "[FLAGS] FILE", stderr)
	readOnly := fs.Bool("read-only", false, "attach read-only")
	var offset, size sizeFlag
	fs.Var(&offset, "offset", "start of the device in the file, bytes (suffixes K, M, G), a multiple of 512")
	fs.Var(&size, "size", "size limit in bytes (suffixes K, M, G), 0 = to the end of the file")
	var sector sectorFlag
	fs.Var(&sector, "sector-size", `logical block size: 0 (default), 512..4096, or "auto" (GPT probe)`)
	partscan := fs.Bool("partscan", false, "enable partitions and create one device per entry of the GPT or MBR table")
	var dio triFlag
	fs.Var(&dio, "direct-io", `direct I/O to the backing file: "auto", "on" or "off"`)
	tag := fs.String("tag", "loopctl", "owner tag written into lo_file_name (at most 63 bytes, not empty)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	asJSON := fs.Bool("json", false, "print the device as JSON, including the record to detach it by")
	if err := parseFlags(fs, args, 1); err != nil {
		return err
	}

	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	opts := loopdev.Options{
		Access:     loopdev.AccessReadWrite,
		Offset:     uint64(offset),
		Size:       uint64(size),
		SectorSize: uint32(sector),
		Partscan:   *partscan,
		DirectIO:   dio.v,
		FileName:   *tag,
		// The device must outlive this process: configured without
		// autoclear from the start (no second LOOP_SET_STATUS64, which
		// freezes the queue for 3-23 ms), relinquished. A crash inside
		// Attach then leaves a device bound, found again by its tag.
		Keep:          true,
		KeepFromStart: true,
		Logger:        logger(ctx),
	}
	if *tag == "" {
		return usageError{"--tag: an owner tag is needed, so that a device left by a crash can be found"}
	}
	if *readOnly {
		opts.Access = loopdev.AccessReadOnly
	}
	backing := fs.Arg(0)
	d, err := loopdev.Attach(ctx, backing, opts)
	if err != nil {
		return err // "attach F: ..." already
	}
	defer d.Close()

	// Create the partitions from the table ourselves (BLKPG), synchronously:
	// kernels built without partition parsers never create them from a
	// scan, and udev may not be there to wait for.
	if *partscan {
		if _, err := d.AddPartitions(ctx); err != nil {
			if derr := detachKept(ctx, d); derr != nil {
				return fmt.Errorf("%s: add partitions: %w (detach: %v)", d.Path(), err, derr)
			}
			return fmt.Errorf("%s: add partitions: %w", d.Path(), err)
		}
	}
	if !*asJSON {
		fmt.Fprintln(stdout, d.Path())
		return nil
	}
	info, err := findInfo(d)
	if err != nil {
		return fmt.Errorf("%s attached, but: %w", d.Path(), err)
	}
	v := viewOfInfo(info)
	if err := v.addDevice(d); err != nil {
		return fmt.Errorf("%s attached, but: %w", d.Path(), err)
	}
	rec := d.Record()
	v.Record = &rec
	return writeJSON(stdout, v)
}

// detachKept undoes an attach made with Keep: the handle was relinquished,
// so ownership is taken back before the locked teardown.
func detachKept(ctx context.Context, d *loopdev.Device) error {
	if err := d.Unrelinquish(); err != nil {
		return err
	}
	return d.Detach(ctx)
}
