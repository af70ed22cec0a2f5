// Package snapservice serves a snapshotter over containerd's snapshots gRPC
// API with containerd's error codes, logs every failed call, and exposes
// the Prometheus metrics of the snapshotter and of its calls.
//
// containerd's contrib/snapshotservice converts errdefs classes to gRPC
// codes, but a raw errno becomes Unknown and Walk's error (a bad filter)
// leaves unconverted. Here every error is classified first (ENOSPC and
// EDQUOT: ResourceExhausted; EIO: DataLoss, with the path the error
// carries) and converted last.
//
// Use:
//
//	svc := snapservice.New(sn)
//	srv := grpc.NewServer(svc.ServerOptions()...)
//	svc.Register(srv)
//	http.Handle("/metrics", svc.MetricsHandler())
package snapservice

import (
	"context"
	"errors"
	"net/http"
	"path"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// Snapshotter is what the service serves: a containerd snapshotter that is
// also a Prometheus collector of its own state.
type Snapshotter interface {
	snapshots.Snapshotter
	prometheus.Collector
}

// Service is the gRPC face of one snapshotter and its call metrics.
type Service struct {
	sn       Snapshotter
	duration *prometheus.HistogramVec
	failures *prometheus.CounterVec
}

// New returns the service of sn.
func New(sn Snapshotter) *Service {
	return &Service{
		sn: sn,
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "loop_snapshotter_rpc_duration_seconds",
			Help:    "Snapshots API call latency.",
			Buckets: []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10},
		}, []string{"method"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loop_snapshotter_rpc_errors_total",
			Help: "Snapshots API calls that returned an error.",
		}, []string{"method"}),
	}
}

// Register registers the snapshots service on srv.
func (s *Service) Register(srv *grpc.Server) {
	snapshotsapi.RegisterSnapshotsServer(srv, server{snapshotservice.FromSnapshotter(classifier{s.sn})})
}

// ServerOptions are the interceptors to create the gRPC server with: each
// call is timed, and each failed one is counted and logged at warn with
// method, key, code and error.
func (s *Service) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			start := time.Now()
			resp, err := h(ctx, req)
			s.observe(ctx, info.FullMethod, req, time.Since(start), err)
			return resp, err
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			start := time.Now()
			err := h(srv, ss)
			s.observe(ss.Context(), info.FullMethod, nil, time.Since(start), err)
			return err
		}),
	}
}

func (s *Service) observe(ctx context.Context, fullMethod string, req any, d time.Duration, err error) {
	method := path.Base(fullMethod)
	s.duration.WithLabelValues(method).Observe(d.Seconds())
	if err == nil {
		return
	}
	s.failures.WithLabelValues(method).Inc()
	fields := log.Fields{"method": method, "code": status.Code(err).String(), "duration": d}
	if r, ok := req.(interface{ GetKey() string }); ok && r.GetKey() != "" {
		fields["key"] = r.GetKey()
	}
	if r, ok := req.(interface{ GetName() string }); ok && r.GetName() != "" {
		fields["name"] = r.GetName()
	}
	// The status message is the error's text; no gRPC prefix.
	msg := err.Error()
	if st, ok := status.FromError(err); ok {
		msg = st.Message()
	}
	log.G(ctx).WithFields(fields).WithField("error", msg).Warn("rpc failed")
}

// MetricsHandler serves the snapshotter's metrics, the call metrics, and
// the Go runtime and process collectors in the Prometheus formats.
func (s *Service) MetricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.sn, s.duration, s.failures,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: promLogger{}})
}

type promLogger struct{}

func (promLogger) Println(v ...any) { log.L.Warn(v...) }

// Classify gives err the errdefs class containerd's gRPC conversion maps
// to the right code: ENOSPC and EDQUOT are ResourceExhausted, EIO is
// DataLoss. An error that already has a class keeps it.
func Classify(err error) error {
	if err == nil || hasClass(err) {
		return err
	}
	switch {
	case errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT):
		return classed{err, errdefs.ErrResourceExhausted}
	case errors.Is(err, unix.EIO):
		return classed{err, errdefs.ErrDataLoss}
	}
	return err
}

func hasClass(err error) bool {
	for _, c := range []error{errdefs.ErrInvalidArgument, errdefs.ErrNotFound, errdefs.ErrAlreadyExists,
		errdefs.ErrFailedPrecondition, errdefs.ErrUnavailable, errdefs.ErrNotImplemented,
		errdefs.ErrResourceExhausted, errdefs.ErrDataLoss, errdefs.ErrInternal, errdefs.ErrAborted,
		errdefs.ErrOutOfRange, errdefs.ErrPermissionDenied, errdefs.ErrUnauthenticated,
		context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, c) {
			return true
		}
	}
	return false
}

// classed is err with an errdefs class, keeping err's text.
type classed struct{ err, class error }

func (c classed) Error() string   { return c.err.Error() }
func (c classed) Unwrap() []error { return []error{c.err, c.class} }

// classifier classifies every error of the snapshotter it wraps.
type classifier struct{ sn Snapshotter }

func (c classifier) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	info, err := c.sn.Stat(ctx, key)
	return info, Classify(err)
}

func (c classifier) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	info, err := c.sn.Update(ctx, info, fieldpaths...)
	return info, Classify(err)
}

func (c classifier) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	u, err := c.sn.Usage(ctx, key)
	return u, Classify(err)
}

func (c classifier) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	ms, err := c.sn.Mounts(ctx, key)
	return ms, Classify(err)
}

func (c classifier) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	ms, err := c.sn.Prepare(ctx, key, parent, opts...)
	return ms, Classify(err)
}

func (c classifier) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	ms, err := c.sn.View(ctx, key, parent, opts...)
	return ms, Classify(err)
}

func (c classifier) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return Classify(c.sn.Commit(ctx, name, key, opts...))
}

func (c classifier) Remove(ctx context.Context, key string) error {
	return Classify(c.sn.Remove(ctx, key))
}

func (c classifier) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return Classify(c.sn.Walk(ctx, fn, filters...))
}

func (c classifier) Close() error { return c.sn.Close() }

func (c classifier) Cleanup(ctx context.Context) error {
	cl, ok := c.sn.(snapshots.Cleaner)
	if !ok {
		return errdefs.ErrNotImplemented
	}
	return Classify(cl.Cleanup(ctx))
}

// server converts the errors upstream's service leaves unconverted (List,
// that is Walk) to gRPC statuses.
type server struct{ snapshotsapi.SnapshotsServer }

func (s server) List(r *snapshotsapi.ListSnapshotsRequest, ss snapshotsapi.Snapshots_ListServer) error {
	return errgrpc.ToGRPC(s.SnapshotsServer.List(r, ss))
}
