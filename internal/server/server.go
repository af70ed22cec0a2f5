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
	"path"
	"path/filepath"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/loopkit/loopkit/pkg/snapshot"
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

// Listen returns the listener to serve on: the socket systemd passed
// (LISTEN_FDS, LISTEN_PID), else a new socket at address. The second result
// reports whether the socket was inherited. A passed socket is used as it is:
// systemd owns its path, mode and lifetime.
func Listen(address string) (net.Listener, bool, error) {
	// Listeners unsets LISTEN_* and marks the fds close-on-exec, so child
	// processes (mkfs, e2fsck) do not believe the sockets are meant for them.
	ls, err := activation.Listeners()
	if err != nil {
		return nil, false, fmt.Errorf("%w: %w", ErrActivation, err)
	}
	switch len(ls) {
	case 0:
		l, err := listenUnix(address)
		return l, false, err
	case 1:
		if ls[0] == nil || ls[0].Addr().Network() != "unix" {
			return nil, false, fmt.Errorf("%w: the passed socket is not a unix stream socket (ListenStream= in the .socket unit)", ErrActivation)
		}
		return ls[0], true, nil
	default:
		for _, l := range ls {
			if l != nil {
				l.Close()
			}
		}
		return nil, false, fmt.Errorf("%w: %d sockets passed, want one", ErrActivation, len(ls))
	}
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

// Run serves sn on l until ctx is cancelled (the caller cancels it on
// SIGTERM or SIGINT, with the handler installed before sn was built) or a
// server fails. It sends READY=1 to systemd once serving, STOPPING=1 when
// stopping, and closes sn before returning. Loop devices stay attached.
func Run(ctx context.Context, sn *snapshot.Snapshotter, l net.Listener, o Options) error {
	defer sn.Close()
	srv := grpc.NewServer(
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			start := time.Now()
			resp, err := h(ctx, req)
			sn.ObserveRPC(path.Base(info.FullMethod), time.Since(start), err)
			return resp, err
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			start := time.Now()
			err := h(srv, ss)
			sn.ObserveRPC(path.Base(info.FullMethod), time.Since(start), err)
			return err
		}),
	)
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	RegisterStatus(srv, sn)

	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(l) }()
	if o.MetricsAddress != "" {
		hs, err := serveMetrics(ctx, sn, o.MetricsAddress, errc)
		if err != nil {
			srv.Stop()
			return err
		}
		defer hs.Close()
	}
	log.G(ctx).WithFields(log.Fields{"address": l.Addr().String(), "root": o.Root, "version": o.Version}).Info("serving")
	// READY only now: reconciliation ran inside snapshot.New, and the
	// listener accepts. Without NOTIFY_SOCKET this does nothing.
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

func serveMetrics(ctx context.Context, sn *snapshot.Snapshotter, address string, errc chan<- error) (*http.Server, error) {
	ml, err := net.Listen("tcp", address)
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		if err := sn.WriteMetrics(r.Context(), w); err != nil {
			log.G(ctx).WithError(err).Warn("write metrics")
		}
	})
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { errc <- hs.Serve(ml) }()
	log.G(ctx).WithField("address", ml.Addr().String()).Info("serving metrics")
	return hs, nil
}
