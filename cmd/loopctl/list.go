package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

func runList(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("list", "[FLAGS]", stderr)
	under := fs.String("under", "", "only devices whose backing file lies under this directory")
	tagPrefix := fs.String("tag-prefix", "", "only devices whose owner tag (lo_file_name) starts with this prefix")
	inspect := fs.Bool("inspect", false, "open each listed device read-only to show its owner tag and backing dev/ino (implied by -under and -tag-prefix; the open makes a concurrent detach by the device's owner lazy)")
	asJSON := fs.Bool("json", false, "print a JSON array")
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	dir := ""
	if *under != "" {
		abs, err := filepath.Abs(*under)
		if err != nil {
			return usageError{err.Error()}
		}
		if r, err := filepath.EvalSymlinks(abs); err == nil {
			abs = r
		}
		dir = abs
	}
	// The listing reads sysfs only; the owner tag and the backing's dev/ino
	// need an open of the device, done only for the devices selected.
	infos, err := loopdev.List(func(i loopdev.Info) (bool, bool) {
		return dir != "" && !pathUnder(i.BackingFile, dir), false
	})
	if err != nil {
		return fmt.Errorf("list loop devices: %w", err)
	}
	views := []deviceView{}
	for _, i := range infos {
		if dir != "" || *tagPrefix != "" || *inspect {
			if i, err = loopdev.Inspect(i); err != nil {
				continue // detached or reused meanwhile
			}
		}
		if *tagPrefix != "" && !strings.HasPrefix(i.FileName, *tagPrefix) {
			continue
		}
		views = append(views, viewOfInfo(i))
	}
	sort.Slice(views, func(a, b int) bool { return views[a].Nr < views[b].Nr })
	if *asJSON {
		return writeJSON(stdout, views)
	}
	return writeListText(stdout, views)
}

func pathUnder(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

func runInfo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("info", "[FLAGS] DEVICE", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args, 1); err != nil {
		return err
	}
	path := fs.Arg(0)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	d, err := loopdev.Open(ctx, path, loopdev.OpenOptions{Access: loopdev.AccessReadOnly})
	if err != nil {
		return fmt.Errorf("info: %w", err) // "open F: ..."
	}
	defer d.Close()
	info, err := findInfo(d)
	if err != nil {
		return fmt.Errorf("info: %w", err) // names the device
	}
	v := viewOfInfo(info)
	if err := v.addDevice(d); err != nil {
		return fmt.Errorf("info: %w", err) // "partitions of F: ..."
	}
	if *asJSON {
		return writeJSON(stdout, v)
	}
	return writeInfoText(stdout, v)
}
