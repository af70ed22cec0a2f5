package server

import (
	"context"
	"encoding/json"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"

	"github.com/loopkit/loopkit/internal/snapadmin"
)

// The status service rides on the snapshotter's socket: the running
// instance holds the metadata database, so only it can answer. Messages are
// JSON (gRPC content-subtype "json"); no generated code is needed.

// StatusMethod is the full gRPC method name of the status query; call it
// with grpc.CallContentSubtype(StatusCodec) and an empty request.
const StatusMethod = "/loopkit.snapshotter.v1.Status/Get"

// StatusCodec is the content subtype of the status messages.
const StatusCodec = "json"

type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (jsonCodec) Name() string                       { return StatusCodec }

// Codecs register process-wide in grpc-go; client and server both need it.
func init() { encoding.RegisterCodec(jsonCodec{}) }

type statusServer interface {
	Status(ctx context.Context) (snapadmin.Status, error)
}

var statusDesc = grpc.ServiceDesc{
	ServiceName: "loopkit.snapshotter.v1.Status",
	HandlerType: (*statusServer)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Get",
		Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var req struct{}
			if err := dec(&req); err != nil {
				return nil, err
			}
			st, err := srv.(statusServer).Status(ctx)
			if err != nil {
				return nil, err
			}
			return &st, nil
		},
	}},
}

// RegisterStatus serves sn's Status on s.
func RegisterStatus(s *grpc.Server, sn statusServer) { s.RegisterService(&statusDesc, sn) }
