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
	"google.golang.org/grpc/status"

	"github.com/loopkit/loopkit/internal/server"
	"github.com/loopkit/loopkit/internal/snapadmin"
)

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
	var st snapadmin.Status
	if err := conn.Invoke(ctx, server.StatusMethod, &struct{}{}, &st, grpc.CallContentSubtype(server.StatusCodec)); err != nil {
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
