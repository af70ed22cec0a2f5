// Command snapbench compares loop-snapshotter with containerd's overlayfs
// snapshotter (same containerd 1.6 daemon) and blockfile (in-process from
// the containerd v2 module): unpack time of a 5-layer image, disk space
// after unpack, `ctr run --rm` start latency, and the conformance suite's
// 128LayersMount. Each backing filesystem (ext4, reflink XFS) is a fresh
// sparse image mounted through pkg/loopdev, so free-space deltas belong to
// the benchmark alone. Markdown on stdout, progress on stderr. Needs root.
//
//	go build -o bin/snapbench ./bench/snapbench && bin/snapbench -fs ext4,xfs
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

type result struct {
	fs, snapshotter, mode string
	unpack                time.Duration
	freeDelta, allocated  int64
	p50, p99, l128        time.Duration
	err                   error
}

func main() {
	var (
		work      = flag.String("work", "/var/tmp", "directory for the backing filesystem images")
		fsList    = flag.String("fs", "ext4,xfs", "backing filesystems: ext4, xfs (reflink=1)")
		layers    = flag.Int("layers", 5, "image layers")
		layerMB   = flag.Int64("layer-mb", 40, "MiB of data per layer")
		runs      = flag.Int("runs", 50, "ctr run --rm repetitions for the latency")
		imgSize   = flag.Int64("image-size", 1<<30, "filesystem size of loop images and of blockfile's scratch")
		snapBin   = flag.String("snapshotter-bin", "", "loop-snapshotter binary (default: go build ./cmd/loop-snapshotter)")
		skipBlock = flag.Bool("skip-blockfile", false, "leave blockfile out")
	)
	flag.Parse()
	if err := run(*work, strings.Split(*fsList, ","), *layers, *layerMB<<20, *runs, *imgSize, *snapBin, *skipBlock); err != nil {
		fmt.Fprintln(os.Stderr, "snapbench:", err)
		os.Exit(1)
	}
}

func logf(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }

func run(work string, fss []string, nLayers int, layerBytes int64, runs int, imgSize int64, snapBin string, skipBlock bool) error {
	ctx := context.Background()
	base, err := os.MkdirTemp(work, "snapbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(base)
	if snapBin == "" {
		snapBin = filepath.Join(base, "loop-snapshotter")
		cmd := exec.Command("go", "build", "-o", snapBin, "./cmd/loop-snapshotter")
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("build loop-snapshotter (run from the repository root): %w", err)
		}
	}
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return err
	}
	img, err := makeImage("loopkit.bench/snapbench:v1", busybox, nLayers, layerBytes)
	if err != nil {
		return err
	}
	archive := filepath.Join(base, "image.tar")
	if err := img.writeArchive(archive); err != nil {
		return err
	}
	logf("image: %d layers, %d MiB", nLayers, img.size()>>20)

	var results []result
	for _, fsType := range fss {
		rs, err := benchFS(ctx, base, fsType, img, archive, runs, imgSize, snapBin, skipBlock)
		results = append(results, rs...)
		if err != nil {
			return fmt.Errorf("%s: %w", fsType, err)
		}
	}
	report(results, img, runs, imgSize)
	return nil
}

// withFS makes a fresh sparse filesystem image, mounts it and returns the
// mountpoint and an undo function.
func withFS(ctx context.Context, base, fsType string) (string, func(), error) {
	imgPath := filepath.Join(base, fsType+".img")
	if err := os.WriteFile(imgPath, nil, 0o600); err != nil {
		return "", nil, err
	}
	if err := os.Truncate(imgPath, 32<<30); err != nil {
		return "", nil, err
	}
	var mkfs *exec.Cmd
	switch fsType {
	case "ext4":
		mkfs = exec.Command("mkfs.ext4", "-q", "-F", imgPath)
	case "xfs":
		mkfs = exec.Command("mkfs.xfs", "-q", "-f", "-m", "reflink=1", imgPath)
	default:
		return "", nil, fmt.Errorf("unknown filesystem %q", fsType)
	}
	if out, err := mkfs.CombinedOutput(); err != nil {
		return "", nil, fmt.Errorf("%v: %s", err, out)
	}
	dev, err := loopdev.Attach(ctx, imgPath, loopdev.Options{Access: loopdev.AccessReadWrite})
	if err != nil {
		return "", nil, err
	}
	mnt := filepath.Join(base, fsType)
	if err := os.Mkdir(mnt, 0o755); err != nil {
		dev.Detach(ctx)
		return "", nil, err
	}
	if err := unix.Mount(dev.Path(), mnt, fsType, 0, ""); err != nil {
		dev.Detach(ctx)
		return "", nil, err
	}
	return mnt, func() {
		err := unix.Unmount(mnt, 0)
		for i := 0; i < 50 && errors.Is(err, unix.EBUSY); i++ {
			time.Sleep(200 * time.Millisecond)
			err = unix.Unmount(mnt, 0)
		}
		if err != nil {
			logf("unmount %s: %v", mnt, err)
			for _, h := range holders(mnt) {
				logf("  held by %s", h)
			}
			if infos, err := loopdev.List(nil); err == nil {
				for _, i := range infos {
					if strings.HasPrefix(i.BackingFile, mnt+"/") {
						logf("  still attached: %s -> %s", i.Path, i.BackingFile)
					}
				}
			}
			if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
				for _, l := range strings.Split(string(b), "\n") {
					if strings.Contains(l, mnt+"/") {
						logf("  still mounted: %s", l)
					}
				}
			}
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
		if err := dev.Detach(ctx); err != nil {
			logf("detach %s: %v", dev.Path(), err)
		}
		os.Remove(imgPath)
	}, nil
}

func freeBytes(path string) int64 {
	unix.Sync()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0
	}
	return int64(st.Bfree) * st.Bsize
}

// allocatedUnder sums st_blocks of regular files under dir. Reflinked
// extents are counted once per file that shares them.
func allocatedUnder(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) == nil {
			n += st.Blocks * 512
		}
		return nil
	})
	return n
}

func benchFS(ctx context.Context, base, fsType string, img *benchImage, archive string, runs int, imgSize int64, snapBin string, skipBlock bool) ([]result, error) {
	mnt, undo, err := withFS(ctx, base, fsType)
	if err != nil {
		return nil, err
	}
	defer undo()
	var out []result

	// In-process: the same unpack code (pkg/rootfs.ApplyLayers) and the
	// 128-layer cycle against each snapshotter.
	cs, layers, err := contentStore(ctx, filepath.Join(mnt, "content"), img)
	if err != nil {
		return nil, err
	}
	kinds := []string{"overlayfs", "loop", "blockfile"}
	if skipBlock {
		kinds = kinds[:2]
	}
	for _, kind := range kinds {
		r := result{fs: fsType, snapshotter: kind, mode: "in-process"}
		root := filepath.Join(mnt, "inproc", kind, "root")
		free0 := freeBytes(mnt)
		p, err := openInproc(ctx, kind, root, imgSize)
		if err != nil {
			return out, err
		}
		free0 = min(free0, freeBytes(mnt)) // blockfile's scratch is not the unpack
		logf("%s/%s: unpack", fsType, kind)
		r.unpack, r.err = unpackInproc(ctx, p.sn, cs, layers)
		r.freeDelta = free0 - freeBytes(mnt)
		r.allocated = allocatedUnder(root)
		if err := p.close(); err != nil {
			logf("close %s: %v", kind, err)
		}
		os.RemoveAll(filepath.Dir(root))

		logf("%s/%s: 128 layers", fsType, kind)
		root = filepath.Join(mnt, "l128", kind, "root")
		p, err = openInproc(ctx, kind, root, 64<<20)
		if err != nil {
			return out, err
		}
		work := filepath.Join(mnt, "l128", kind, "work")
		os.MkdirAll(work, 0o755)
		var lerr error
		r.l128, lerr = layers128(ctx, p.sn, work)
		r.err = errors.Join(r.err, lerr)
		if err := p.close(); err != nil {
			logf("close %s: %v", kind, err)
		}
		os.RemoveAll(filepath.Dir(root))
		out = append(out, r)
	}

	// Daemon: containerd 1.6 unpacks with ctr image import and starts
	// containers with ctr run --rm.
	run, err := os.MkdirTemp("/run", "snapbench-")
	if err != nil {
		return out, err
	}
	defer os.RemoveAll(run)
	d, err := startDaemons(snapBin, filepath.Join(mnt, "daemon"), run, imgSize)
	if err != nil {
		return out, err
	}
	defer func() {
		d.stop()
		purgeLoop(ctx, d.snapRoot)
	}()
	if _, err := d.ctr("image", "import", "--no-unpack", archive); err != nil {
		return out, err
	}
	for _, sn := range []string{"overlayfs", "loop"} {
		r := result{fs: fsType, snapshotter: sn, mode: "containerd 1.6"}
		free0 := freeBytes(mnt)
		logf("%s/%s (daemon): unpack", fsType, sn)
		start := time.Now()
		_, r.err = d.ctr("image", "import", "--snapshotter", sn, archive)
		r.unpack = time.Since(start)
		r.freeDelta = free0 - freeBytes(mnt)
		if sn == "loop" {
			r.allocated = allocatedUnder(filepath.Join(d.snapRoot, "snapshots"))
		} else {
			r.allocated = allocatedUnder(filepath.Join(mnt, "daemon", "root", "io.containerd.snapshotter.v1.overlayfs"))
		}
		if r.err == nil {
			logf("%s/%s (daemon): %d x ctr run --rm", fsType, sn, runs)
			r.p50, r.p99, r.err = d.startLatency(sn, img.ref, runs)
		}
		out = append(out, r)
	}
	return out, nil
}

func report(rs []result, img *benchImage, runs int, imgSize int64) {
	host, _ := os.Hostname()
	var uts unix.Utsname
	unix.Uname(&uts)
	fmt.Printf("Image: %d layers, %d MiB of incompressible data (uncompressed tars). Loop images and blockfile's scratch: %d MiB; 128-layer runs use 64 MiB images. Kernel %s, host %s.\n\n",
		len(img.layers), img.size()>>20, imgSize>>20, strings.TrimRight(string(uts.Release[:]), "\x00"), host)
	fmt.Println("| backing fs | snapshotter | via | unpack | free-space delta after unpack | allocated (st_blocks sum) | ctr run --rm p50 | p99 | 128LayersMount |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|")
	for _, r := range rs {
		lat, l128 := "-", "-"
		if r.p50 > 0 {
			lat = fmt.Sprintf("%d ms | %d ms", r.p50.Milliseconds(), r.p99.Milliseconds())
		} else {
			lat = "- | -"
		}
		if r.l128 > 0 {
			l128 = fmt.Sprintf("%.1f s", r.l128.Seconds())
		}
		fmt.Printf("| %s | %s | %s | %.2f s | %d MiB | %d MiB | %s | %s |\n", r.fs, r.snapshotter, r.mode, r.unpack.Seconds(), r.freeDelta>>20, r.allocated>>20, lat, l128)
		if r.err != nil {
			fmt.Printf("\nerror (%s/%s/%s): %v\n\n", r.fs, r.snapshotter, r.mode, r.err)
		}
	}
	fmt.Printf("\nLatency: %d sequential `ctr run --rm <image> id /bin/true`, nearest-rank percentiles.\n", runs)
}

// holders lists processes with an open file or cwd under dir.
func holders(dir string) []string {
	var out []string
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		links, _ := filepath.Glob(p + "/fd/*")
		links = append(links, p+"/cwd")
		for _, l := range links {
			if t, err := os.Readlink(l); err == nil && strings.HasPrefix(t, dir+"/") {
				comm, _ := os.ReadFile(p + "/comm")
				out = append(out, fmt.Sprintf("%s (%s): %s", p, strings.TrimSpace(string(comm)), t))
			}
		}
	}
	return out
}
