//go:build mips || mipsle || mips64 || mips64le || ppc64 || ppc64le

package loopdev

// Ioctl numbers x/sys does not export, with the _IOC layout of mips and
// powerpc (direction bits 29-31, _IOC_NONE = 1, _IOC_WRITE = 4).
const (
	// blkpgIoctl is BLKPG, _IO(0x12, 105).
	blkpgIoctl = 0x20001269
	// iocWrite is _IOC_WRITE.
	iocWrite = 4
	// btrfsIocForgetDev is BTRFS_IOC_FORGET_DEV, _IOW(0x94, 5, struct
	// btrfs_ioctl_vol_args), 4096 bytes.
	btrfsIocForgetDev = 0x90009405
)
