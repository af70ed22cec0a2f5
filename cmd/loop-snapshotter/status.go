package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"

	"github.com/loopkit/loopkit/pkg/snapshot"
)

// The status service rides on the snapshotter's socket: the running
// instance holds the metadata database, so only it can answer. Messages are
// JSON (gRPC content-subtype "json"); no generated code is needed.
const statusMethod = "/loopkit.snapshotter.v1.Status/Get"

type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (jsonCodec) Name() string                       { return "json" }

func init() { encoding.RegisterCodec(jsonCodec{}) }

type statusServer interface {
	Status(ctx context.Context) (snapshot.Status, error)
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

func registerStatus(s *grpc.Server, sn statusServer) { s.RegisterService(&statusDesc, sn) }

func runStatus(args []string, stdout io.Writer) error {
	var asJSON bool
	o, fs, err := parseFlags("status", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print JSON")
	})
	if errors.Is(err, flag.ErrHelp) {
		printCommandUsage(stdout, fs, statusUsage)
		return nil
	}
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient("unix://"+o.cfg.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var st snapshot.Status
	if err := conn.Invoke(ctx, statusMethod, &struct{}{}, &st, grpc.CallContentSubtype("json")); err != nil {
		return fmt.Errorf("query %s: %s", o.cfg.Address, status.Convert(err).Message())
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	if st.LayerBacking != "" {
		fmt.Fprintf(stdout, "mode: %s (layers: %s-backed erofs)\n\n", st.Mode, st.LayerBacking)
	} else {
		fmt.Fprintf(stdout, "mode: %s\n\n", st.Mode)
	}
	w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "KEY\tID\tKIND\tSIZE LIMIT\tUSAGE\tDEVICE\tDISKSEQ")
	for _, s := range st.Snapshots {
		dev, seq := "-", "-"
		if s.Device != "" {
			dev, seq = s.Device, fmt.Sprint(s.DiskSeq)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", s.Key, s.ID, s.Kind, s.SizeLimit, s.Usage, dev, seq)
	}
	w.Flush()
	fmt.Fprintf(stdout, "\norphan devices: %d\n", len(st.Orphans))
	for _, d := range st.Orphans {
		fmt.Fprintf(stdout, "  %s diskseq %d backing %s\n", d.Device, d.DiskSeq, d.BackingFile)
	}
	fmt.Fprintf(stdout, "trash entries: %d, staging entries: %d\n", st.Trash, st.Staging)
	return nil
}
