// Package loopdev attaches image files (or block devices) to Linux loop
// devices, locks them against udev and cooperating tools, identifies every
// attachment by (devnum, diskseq), and tears it down without ever touching a
// binding it does not own.
//
// The protocol follows systemd's src/shared/loop-util.c:
//
//   - /dev/loop-control is opened anew for every attach and locked with
//     flock(LOCK_EX) around get-free→configure, so cooperating allocators
//     never hand out the same device. A teardown takes it only for
//     LOOP_CTL_REMOVE, after the device is closed.
//   - The device is locked on a second open file description (a reopen
//     through /proc/self/fd, never a dup), because flock locks belong to the
//     open file description and the lock fd must be closed before
//     LOOP_CLR_FD, or the clear degrades into a lazy autoclear.
//   - Lock order: the control lock first, then the device lock (an
//     allocator waits for a fresh device's lock under the control lock). A
//     teardown never waits for a device lock while holding the control lock:
//     it clears under the device lock alone (an allocator handed the number
//     blocks on that lock, then re-checks that the device is unbound), so a
//     prober holding one device stalls no Attach elsewhere on the host.
//   - LOOP_CONFIGURE is used first and its result verified; a kernel that
//     refuses or misapplies it is remembered process-wide (one atomic flag,
//     the package's only mutable global apart from the control lock's
//     process-local queue) and LOOP_SET_FD+LOOP_SET_STATUS64 are used
//     instead.
//   - Collisions (EBUSY, a device that vanished, stale partitions, direct I/O
//     refused) are retried up to 64 times with randomized, growing backoff.
//   - Every wait honours a context: locks are taken with LOCK_NB and polled.
//     Within one process, goroutines queue in FIFO order before polling the
//     control flock (flock itself has no fairness).
//
// What the package never does: exec a program, use cgo, decide by kernel
// version strings, detach a device by name alone, clear a binding it did not
// create, or issue BLKRRPART.
package loopdev
