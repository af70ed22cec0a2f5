//go:build !mips && !mipsle && !mips64 && !mips64le && !ppc64 && !ppc64le

package loopdev

// blkpgIoctl is BLKPG, _IO(0x12, 105); x/sys does not export it.
const blkpgIoctl = 0x1269
