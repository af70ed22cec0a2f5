// Package server wires a loop snapshotter into the containerd snapshots gRPC
// API and runs it as a daemon: it listens on the configured unix socket or
// on one inherited from systemd (socket activation), serves the snapshots
// and status services and the optional metrics endpoint, tells systemd when
// it is ready, and stops gracefully on SIGTERM or SIGINT.
package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/loopkit/loopkit/internal/snapadmin"
	"github.com/loopkit/loopkit/internal/snapservice"
)

// ErrActivation is returned when systemd passed sockets this daemon cannot
// serve on (more than one, or not a unix stream socket).
var ErrActivation = errors.New("socket activation")

// Options says where and how to serve.
type Options struct {
	// Address is the unix socket to create when systemd passed none.
	Address string
	// MetricsAddress, if set, is the TCP address of the /metrics endpoint.
	MetricsAddress string
	// Root and Version are logged when serving starts.
	Root    string
	Version string
	// StopTimeout bounds the graceful stop; running RPCs are cut after it.
	StopTimeout time.Duration
}

// inherited returns the socket systemd passed (LISTEN_FDS, LISTEN_PID), or
// nil when there is none. A passed socket is used as it is: systemd owns its
// path, mode and lifetime.
func inherited() (net.Listener, error) {
	// Listeners unsets LISTEN_* and marks the fds close-on-exec, so child
	// processes (mkfs, e2fsck) do not believe the sockets are meant for them.
	ls, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrActivation, err)
	}
	switch {
	case len(ls) == 0:
		return nil, nil
	case len(ls) == 1 && ls[0] != nil && ls[0].Addr().Network() == "unix":
		return ls[0], nil
	}
	for _, l := range ls {
		if l != nil {
			l.Close()
		}
	}
	if len(ls) == 1 {
		return nil, fmt.Errorf("%w: the passed socket is not a unix stream socket (ListenStream= in the .socket unit)", ErrActivation)
	}
	return nil, fmt.Errorf("%w: %d sockets passed, want one", ErrActivation, len(ls))
}

// listenUnix creates the socket directory (0700), replaces a stale socket
// (the caller holds the root lock, so it is not a live instance's) and
// serves mode 0660.
func listenUnix(address string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket: %w", err)
	}
	// The umask closes the window between bind and chmod in which another
	// user could connect.
	old := unix.Umask(0o177)
	l, err := net.Listen("unix", address)
	unix.Umask(old)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(address, 0o660); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Build creates the snapshotter: it takes the root lock and reconciles,
// which may take long. snapadmin.From(snapshot.NewSnapshotter(ctx, cfg))
// is one.
type Build func(ctx context.Context) (snapadmin.Snapshotter, error)

// Run builds the snapshotter and serves it until ctx is cancelled (the
// caller cancels it on SIGTERM or SIGINT, with the handler installed before
// Run) or a server fails. It sends READY=1 to systemd once the snapshotter
// serves, STOPPING=1 when stopping, and closes the snapshotter before
// returning. Loop devices stay attached.
//
// On a socket systemd passed, gRPC serves at once and requests wait until
// build returns: containerd 2.x gives a proxy connection's handshake one
// second (its ConnectParams set no MinConnectTimeout, so the first
// attempt's deadline is the 1 s base backoff), and CRI drops the images it
// cannot check at startup. Without a passed socket, build runs first: it
// takes the root lock, so a second instance fails before it could replace a
// live instance's socket.
func Run(ctx context.Context, o Options, build Build) error {
	l, err := inherited()
	if err != nil {
		return err
	}
	p := newPending()
	srv, svc := newGRPCServer(p)
	errc := make(chan error, 2)
	if l != nil {
		log.G(ctx).WithField("address", l.Addr().String()).Info("socket activation: serving on the socket systemd passed")
		go func() { errc <- srv.Serve(l) }()
	}
	sn, err := build(ctx)
	if err != nil {
		p.set(nil)
		srv.Stop()
		if ctx.Err() != nil {
			// Stopped during reconciliation: a requested stop, not a
			// failure; the next start reconciles again.
			log.G(ctx).WithError(err).WithField("cause", context.Cause(ctx)).Info("stopped before serving")
			return nil
		}
		return err
	}
	p.set(sn)
	defer sn.Close()
	if l == nil {
		if l, err = listenUnix(o.Address); err != nil {
			return err
		}
		go func() { errc <- srv.Serve(l) }()
	}
	if o.MetricsAddress != "" {
		// Registered only now: the snapshotter's collectors describe
		// themselves once it exists.
		hs, err := serveMetrics(ctx, svc, o.MetricsAddress, errc)
		if err != nil {
			srv.Stop()
			return err
		}
		defer hs.Close()
	}
	log.G(ctx).WithFields(log.Fields{"address": l.Addr().String(), "root": o.Root, "version": o.Version}).Info("serving")
	// READY only now: reconciliation ran inside build, and the listener
	// accepts. Without NOTIFY_SOCKET this does nothing.
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.G(ctx).WithError(err).Warn("sd_notify READY")
	}

	var serveErr error
	select {
	case serveErr = <-errc:
	case <-ctx.Done():
		log.G(ctx).WithField("cause", context.Cause(ctx)).Info("stopping; loop devices stay attached")
	}
	if _, err := daemon.SdNotify(false, daemon.SdNotifyStopping); err != nil {
		log.G(ctx).WithError(err).Warn("sd_notify STOPPING")
	}
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	timeout := o.StopTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	select {
	case <-done:
	case <-time.After(timeout):
		srv.Stop()
	}
	if err := sn.Close(); err != nil {
		return errors.Join(serveErr, err)
	}
	return serveErr
}

// newGRPCServer serves the snapshots service (snapservice: containerd's
// error codes, call metrics, a log line per failed call) and the status
// service, both through p.
func newGRPCServer(p *pending) (*grpc.Server, *snapservice.Service) {
	lazy := lazySnapshotter{p}
	svc := snapservice.New(lazy)
	srv := grpc.NewServer(svc.ServerOptions()...)
	svc.Register(srv)
	RegisterStatus(srv, lazy)
	return srv, svc
}

func serveMetrics(ctx context.Context, svc *snapservice.Service, address string, errc chan<- error) (*http.Server, error) {
	ml, err := net.Listen("tcp", address)
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", svc.MetricsHandler())
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { errc <- hs.Serve(ml) }()
	log.G(ctx).WithField("address", ml.Addr().String()).Info("serving metrics")
	return hs, nil
}
