package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// deviceView is what loopctl prints about one loop device, in JSON with
// snake_case keys. The kernel's view (sysfs, LOOP_GET_STATUS64) is the
// source of every field.
type deviceView struct {
	Path        string          `json:"path"`
	Nr          int             `json:"nr"`
	Devnum      loopdev.Devnum  `json:"devnum"`
	DiskSeq     uint64          `json:"diskseq"`
	BackingFile string          `json:"backing_file"`
	BackingDev  uint64          `json:"backing_dev"`
	BackingIno  uint64          `json:"backing_ino"`
	Offset      uint64          `json:"offset"`
	SizeLimit   uint64          `json:"size_limit"`
	Size        uint64          `json:"size,omitempty"`
	SectorSize  uint32          `json:"sector_size,omitempty"`
	ReadOnly    bool            `json:"read_only"`
	Autoclear   bool            `json:"autoclear"`
	Partscan    bool            `json:"partscan"`
	DirectIO    bool            `json:"direct_io"`
	FileName    string          `json:"file_name"`
	Partitions  []partitionView `json:"partitions,omitempty"`
	// Record is what a caller persists to detach this attachment later.
	Record *loopdev.Record `json:"record,omitempty"`
}

type partitionView struct {
	Nr     int            `json:"nr"`
	Path   string         `json:"path"`
	Devnum loopdev.Devnum `json:"devnum"`
	Start  uint64         `json:"start"`
	Size   uint64         `json:"size"`
}

func viewOfInfo(i loopdev.Info) deviceView {
	return deviceView{
		Path:        i.Path,
		Nr:          i.Nr,
		Devnum:      i.Devnum,
		DiskSeq:     i.DiskSeq,
		BackingFile: i.BackingFile,
		BackingDev:  i.Backing.Dev,
		BackingIno:  i.Backing.Ino,
		Offset:      i.Offset,
		SizeLimit:   i.SizeLimit,
		ReadOnly:    i.ReadOnly,
		Autoclear:   i.Autoclear,
		Partscan:    i.Partscan,
		DirectIO:    i.DirectIO,
		FileName:    i.FileName,
	}
}

// addDevice fills in what only an open handle knows: size, sector size,
// partitions.
func (v *deviceView) addDevice(d *loopdev.Device) error {
	v.Size = d.Size()
	v.SectorSize = d.SectorSize()
	parts, err := d.Partitions()
	if err != nil {
		return fmt.Errorf("partitions of %s: %w", d.Path(), err)
	}
	for _, p := range parts {
		v.Partitions = append(v.Partitions, partitionView{Nr: p.Nr, Path: p.Path, Devnum: p.Devnum, Start: p.Start, Size: p.Size})
	}
	return nil
}

// findInfo returns the listing entry of the attachment d, matched by devnum
// and diskseq so a reused number is never reported as ours.
func findInfo(d *loopdev.Device) (loopdev.Info, error) {
	infos, err := loopdev.List(func(i loopdev.Info) (bool, bool) {
		ours := i.Devnum == d.Devnum() && (d.DiskSeq() == 0 || i.DiskSeq == d.DiskSeq())
		return !ours, ours
	})
	if err != nil {
		return loopdev.Info{}, err
	}
	if len(infos) == 1 {
		// Our own device: reading its owner tag is ours to do.
		return loopdev.Inspect(infos[0])
	}
	return loopdev.Info{}, fmt.Errorf("%s (devnum %s, diskseq %d) not in the device list: %w",
		d.Path(), d.Devnum(), d.DiskSeq(), loopdev.ErrGone)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func flagWords(v deviceView) string {
	words := []string{"read-write"}
	if v.ReadOnly {
		words[0] = "read-only"
	}
	for _, f := range []struct {
		on   bool
		name string
	}{{v.Autoclear, "autoclear"}, {v.Partscan, "partscan"}, {v.DirectIO, "direct-io"}} {
		if f.on {
			words = append(words, f.name)
		}
	}
	return strings.Join(words, ",")
}

// writeInfoText prints one device in a form meant for people.
func writeInfoText(w io.Writer, v deviceView) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "device:\t%s (devnum %s)\n", v.Path, v.Devnum)
	fmt.Fprintf(tw, "diskseq:\t%d\n", v.DiskSeq)
	fmt.Fprintf(tw, "backing file:\t%s\n", v.BackingFile)
	fmt.Fprintf(tw, "offset:\t%d\n", v.Offset)
	fmt.Fprintf(tw, "size limit:\t%d\n", v.SizeLimit)
	fmt.Fprintf(tw, "size:\t%d (%s)\n", v.Size, humanSize(v.Size))
	fmt.Fprintf(tw, "sector size:\t%d\n", v.SectorSize)
	fmt.Fprintf(tw, "flags:\t%s\n", flagWords(v))
	fmt.Fprintf(tw, "tag:\t%s\n", v.FileName)
	fmt.Fprintf(tw, "partitions:\t%d\n", len(v.Partitions))
	for _, p := range v.Partitions {
		fmt.Fprintf(tw, "  %s\tdevnum %s\tstart %d\tsize %d (%s)\n", p.Path, p.Devnum, p.Start, p.Size, humanSize(p.Size))
	}
	return tw.Flush()
}

// writeListText prints one line per device.
func writeListText(w io.Writer, views []deviceView) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tDEVNUM\tDISKSEQ\tFLAGS\tOFFSET\tSIZELIMIT\tTAG\tBACKING FILE")
	for _, v := range views {
		tag := v.FileName
		if tag == "" {
			tag = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%d\t%s\t%s\n", v.Path, v.Devnum, v.DiskSeq, flagWords(v), v.Offset, v.SizeLimit, tag, v.BackingFile)
	}
	return tw.Flush()
}
