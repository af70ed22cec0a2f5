package loopdev

import (
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// blkpg issues BLKPG with a partition argument. x/sys has the structures but
// no typed wrapper, so this pointer ioctl is the package's one hand-written
// syscall; the argument is kept alive across the call.
func blkpg(f *os.File, op int32, p *unix.BlkpgPartition) error {
	arg := unix.BlkpgIoctlArg{Op: op, Datalen: int32(unsafe.Sizeof(*p)), Data: (*byte)(unsafe.Pointer(p))}
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), blkpgIoctl, uintptr(unsafe.Pointer(&arg)))
	runtime.KeepAlive(p)
	runtime.KeepAlive(&arg)
	runtime.KeepAlive(f)
	if e != 0 {
		return e
	}
	return nil
}
