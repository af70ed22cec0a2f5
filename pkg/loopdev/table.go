package loopdev

import (
	"context"
	"errors"
	"fmt"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/ptable"
	"golang.org/x/sys/unix"
)

// AddPartitions parses the device's own partition table and creates every
// partition synchronously with BLKPG_ADD_PARTITION: no uevent
// wait, and it works on kernels without partition parsers. Partitions the
// kernel's scan already created (EBUSY) are fine. It returns the partitions
// as sysfs shows them afterwards.
func (d *Device) AddPartitions(ctx context.Context) ([]Partition, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.errClosedLocked(); err != nil {
		return nil, err
	}
	if err := d.checkAlive(); err != nil {
		return nil, err
	}
	r, err := reopen(d.file, openBase|unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	table, err := ptable.Read(r, d.sectorSize)
	r.Close()
	if errors.Is(err, ptable.ErrMalformed) {
		return nil, fmt.Errorf("read partition table of %s: %w: %w", d.path, err, ErrInvalidArgument)
	}
	if err != nil {
		return nil, fmt.Errorf("read partition table of %s: %w", d.path, err)
	}
	for _, e := range table {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if e.Start+e.Size > d.size {
			return nil, fmt.Errorf("partition %d of %s ends past the device: %w", e.Nr, d.path, ErrInvalidArgument)
		}
		if err := d.addPartitionLocked(e.Nr, e.Start, e.Size); err != nil {
			return nil, err
		}
	}
	return d.partitionsLocked()
}
