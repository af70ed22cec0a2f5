package loopdev

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Sentinels; test with errors.Is. Errors returned by the package also keep
// the underlying errno, so errors.Is(err, unix.EBUSY) works through the chain.
var (
	// ErrBusy: every allocation attempt collided with another user.
	ErrBusy = &errnoSentinel{"loop devices busy after all attempts", unix.EBUSY}
	// ErrNotOwned: Detach on a handle this process did not create, or relinquished.
	ErrNotOwned = errors.New("loop device not owned by this handle")
	// ErrForeign: the handle is not a loop binding (plain block device or unbound loop device).
	ErrForeign = errors.New("not a bound loop device")
	// ErrReused: the devnum or diskseq no longer matches: the number now belongs to someone else.
	ErrReused = &errnoSentinel{"loop device reused by another attachment", unix.ENXIO}
	// ErrGone: the device node is absent or the device is unbound.
	ErrGone = &errnoSentinel{"loop device gone", unix.ENXIO}
	// ErrDetachDeferred: LOOP_CLR_FD was accepted but another opener (a
	// mount, udev, a process) still holds the device; the kernel unbinds it
	// at the last close.
	ErrDetachDeferred = errors.New("loop detach deferred: device still in use")
	// ErrInUse: an exclusive detach found a filesystem mounted from the
	// device (the mount claims it; the O_EXCL open gives EBUSY). Nothing was
	// touched.
	ErrInUse = &errnoSentinel{"loop device in use (mounted)", unix.EBUSY}
	// ErrRemoveBusy: the device was cleared but LOOP_CTL_REMOVE stayed busy.
	ErrRemoveBusy = &errnoSentinel{"loop device cleared but not removed (busy)", unix.EBUSY}
	// ErrUnsupported: the kernel lacks a feature (diskseq, LOOP_CONFIGURE,
	// partscan). It matches errors.ErrUnsupported, so callers that handle
	// "unsupported" generically need not know this package.
	ErrUnsupported = &errnoSentinel{"not supported by this kernel", errors.ErrUnsupported}
	// ErrInvalidArgument: bad options or an unusable backing file.
	ErrInvalidArgument = &errnoSentinel{"invalid argument", unix.EINVAL}
)

// errnoSentinel is a sentinel that also matches the error it implies: an
// errno, or errors.ErrUnsupported.
type errnoSentinel struct {
	msg  string
	also error
}

func (e *errnoSentinel) Error() string { return e.msg }

func (e *errnoSentinel) Is(target error) bool { return target == e.also }

// invalidf builds an ErrInvalidArgument error with context.
func invalidf(format string, args ...any) error {
	return &wrapped{msg: fmt.Sprintf(format, args...), err: ErrInvalidArgument}
}

type wrapped struct {
	msg string
	err error
}

func (w *wrapped) Error() string { return w.msg + ": " + w.err.Error() }
func (w *wrapped) Unwrap() error { return w.err }

// retryable reports whether an attempt's error means "try another device".
func retryable(err error) bool {
	return errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO) ||
		errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EBUSY) ||
		errors.Is(err, unix.EUCLEAN) || errors.Is(err, unix.ENOANO)
}

// unsupportedErrno reports the errnos a kernel answers for an ioctl it does
// not implement: EINVAL on 64-bit, ENOTTY on 32-bit compat, ENOSYS under
// qemu-user, and the EOPNOTSUPP family.
func unsupportedErrno(err error) bool {
	for _, e := range []unix.Errno{unix.EOPNOTSUPP, unix.ENOTTY, unix.ENOSYS, unix.EAFNOSUPPORT,
		unix.EPFNOSUPPORT, unix.EPROTONOSUPPORT, unix.ESOCKTNOSUPPORT, unix.ENOPROTOOPT, unix.EINVAL} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// opError wraps err with "op path: ", dropping the path from an
// *os.PathError about that same path, so the message names it once
// ("attach F: open: no such file or directory", not "attach F: open F: ...").
func opError(op, path string, err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) && pe.Path == path {
		return fmt.Errorf("%s %s: %s: %w", op, path, pe.Op, pe.Err)
	}
	return fmt.Errorf("%s %s: %w", op, path, err)
}
