// Package nsthread runs functions on throwaway OS threads, for namespace
// changes (unshare, setns) that must not leak into the rest of the process.
package nsthread

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// Run runs fn on a dedicated, locked OS thread other than the main thread,
// and returns its error. The thread is discarded afterwards: the goroutine
// exits without UnlockOSThread, so the Go runtime kills the tainted thread
// instead of reusing it. Processes fn starts inherit the thread's
// namespaces.
func Run(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			// The main thread can never be discarded (Go wedges it instead)
			// and /proc/self follows it: keep it locked here, untouched, so
			// that the worker below is scheduled on another thread.
			defer runtime.UnlockOSThread()
			done := make(chan struct{})
			go func() {
				defer close(done)
				runtime.LockOSThread()
				errc <- fn()
			}()
			<-done
			return
		}
		errc <- fn()
	}()
	return <-errc
}
