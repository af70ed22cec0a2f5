//go:build mips || mipsle || mips64 || mips64le || ppc64 || ppc64le

package loopdev

// blkpgIoctl is BLKPG, _IO(0x12, 105), with these architectures' _IOC_NONE bit.
const blkpgIoctl = 0x20001269
