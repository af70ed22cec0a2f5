//go:build !mips && !mipsle && !mips64 && !mips64le && !ppc64 && !ppc64le

package loopdev

// Ioctl numbers x/sys does not export, with the generic _IOC layout
// (direction bits 30-31, _IOC_WRITE = 1).
const (
	// blkpgIoctl is BLKPG, _IO(0x12, 105).
	blkpgIoctl = 0x1269
	// iocWrite is _IOC_WRITE.
	iocWrite = 1
	// btrfsIocForgetDev is BTRFS_IOC_FORGET_DEV, _IOW(0x94, 5, struct
	// btrfs_ioctl_vol_args), 4096 bytes.
	btrfsIocForgetDev = 0x50009405
)
