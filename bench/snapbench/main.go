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
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/ociimage"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

type result struct {
	fs, snapshotter, mode string
	unpack                time.Duration
	freeDelta, allocated  int64
	p50, p99, l128        time.Duration
	// Daemon rows: disk one new container takes before it writes, and the
	// page cache 10 containers reading one 100 MiB file add.
	perContainer, pageCache int64
	err                     error
}

// scaleResult is one in-process unpack of an image of layers layers.
type scaleResult struct {
	fs, snapshotter string
	layers          int
	unpack          time.Duration
	freeDelta       int64
	err             error
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
		scale     = flag.String("scale", "5,20,50", "layer counts of the unpack-scaling table (empty: skip)")
		scaleMB   = flag.Int64("scale-layer-mb", 4, "MiB of data per layer in the scaling table")
	)
	flag.Parse()
	var scales []int
	for _, f := range strings.Split(*scale, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			scales = append(scales, n)
		}
	}
	opts := options{layers: *layers, layerBytes: *layerMB << 20, runs: *runs, imgSize: *imgSize, snapBin: *snapBin,
		skipBlock: *skipBlock, scales: scales, scaleBytes: *scaleMB << 20}
	if err := run(*work, strings.Split(*fsList, ","), opts); err != nil {
		fmt.Fprintln(os.Stderr, "snapbench:", err)
		os.Exit(1)
	}
}

func logf(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }

type options struct {
	layers     int
	layerBytes int64
	runs       int
	imgSize    int64
	snapBin    string
	skipBlock  bool
	scales     []int
	scaleBytes int64
}

// pageCacheFile is the 100 MiB file of the page-cache image.
const pageCacheFile = "/data0/f000"

func run(work string, fss []string, o options) error {
	nLayers, layerBytes, runs, imgSize, snapBin := o.layers, o.layerBytes, o.runs, o.imgSize, o.snapBin
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
	img, err := makeImage("loopkit.bench/snapbench:v1", busybox, nLayers, layerBytes, 1<<20)
	if err != nil {
		return err
	}
	archive := filepath.Join(base, "image.tar")
	if err := img.WriteArchive(archive); err != nil {
		return err
	}
	logf("image: %d layers, %d MiB", nLayers, img.Size()>>20)
	pc, err := makeImage("loopkit.bench/pagecache:v1", busybox, 1, 100<<20, 100<<20)
	if err != nil {
		return err
	}
	pcArchive := filepath.Join(base, "pagecache.tar")
	if err := pc.WriteArchive(pcArchive); err != nil {
		return err
	}

	var results []result
	var scaled []scaleResult
	for _, fsType := range fss {
		rs, ss, err := benchFS(ctx, base, fsType, img, archive, pc.Ref, pcArchive, busybox, o)
		results = append(results, rs...)
		scaled = append(scaled, ss...)
		if err != nil {
			return fmt.Errorf("%s: %w", fsType, err)
		}
	}
	report(results, img, runs, imgSize)
	reportScale(scaled, o.scaleBytes)
	return nil
}

// inprocKinds are the snapshotters opened in-process: containerd's
// overlayfs, loop in both modes, blockfile.
var inprocKinds = []string{"overlayfs", "loop-flat", "loop-layered", "blockfile"}

// benchScale unpacks images of 5, 20, 50... layers of scaleBytes each
// in-process: time and disk must grow linearly with the layer count.
func benchScale(ctx context.Context, mnt, fsType, busybox string, scales []int, scaleBytes, imgSize int64) ([]scaleResult, error) {
	var out []scaleResult
	for _, n := range scales {
		img, err := makeImage(fmt.Sprintf("loopkit.bench/scale-%d:v1", n), busybox, n, scaleBytes, 1<<20)
		if err != nil {
			return out, err
		}
		cs, layers, err := contentStore(ctx, filepath.Join(mnt, fmt.Sprintf("content-%d", n)), img)
		if err != nil {
			return out, err
		}
		for _, kind := range inprocKinds[:3] {
			r := scaleResult{fs: fsType, snapshotter: kind, layers: n}
			root := filepath.Join(mnt, "scale", kind, "root")
			p, err := openInproc(ctx, kind, root, imgSize)
			if err != nil {
				return out, err
			}
			free0 := freeBytes(mnt)
			logf("%s/%s: unpack %d layers", fsType, kind, n)
			r.unpack, r.err = unpackInproc(ctx, p.sn, cs, layers)
			r.freeDelta = free0 - freeBytes(mnt)
			if err := p.close(); err != nil {
				logf("close %s: %v", kind, err)
			}
			os.RemoveAll(filepath.Dir(root))
			out = append(out, r)
		}
		os.RemoveAll(filepath.Join(mnt, fmt.Sprintf("content-%d", n)))
	}
	return out, nil
}

func reportScale(rs []scaleResult, scaleBytes int64) {
	if len(rs) == 0 {
		return
	}
	fmt.Printf("\nUnpack scaling (in-process, %d MiB of data per layer):\n\n", scaleBytes>>20)
	fmt.Println("| backing fs | snapshotter | layers | unpack | per layer | free-space delta | per layer |")
	fmt.Println("|---|---|---|---|---|---|---|")
	for _, r := range rs {
		fmt.Printf("| %s | %s | %d | %.2f s | %.0f ms | %d MiB | %.1f MiB |\n", r.fs, r.snapshotter, r.layers, r.unpack.Seconds(),
			float64(r.unpack.Milliseconds())/float64(r.layers), r.freeDelta>>20, float64(r.freeDelta)/float64(r.layers)/(1<<20))
		if r.err != nil {
			fmt.Printf("\nerror (%s/%s/%d): %v\n\n", r.fs, r.snapshotter, r.layers, r.err)
		}
	}
}

// settle waits (at most 15 s) until f stops moving by more than 1 MiB
// over half a second.
func settle(f func() int64) {
	prev := f()
	for range 30 {
		time.Sleep(500 * time.Millisecond)
		cur := f()
		if d := cur - prev; d < 1<<20 && d > -(1<<20) {
			return
		}
		prev = cur
	}
}

// meminfoCached is the kernel's Cached: in bytes.
func meminfoCached() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Cached:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n << 10
			}
		}
	}
	return 0
}

// evictUnder drops the page cache of every regular file under dir
// (POSIX_FADV_DONTNEED): only the benchmark's own files, not the host's.
func evictUnder(dir string) {
	unix.Sync()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		if f, err := os.Open(p); err == nil {
			unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
			f.Close()
		}
		return nil
	})
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

// allocatedUnder sums st_blocks of regular files under dir, on dir's
// filesystem only (layered mode mounts its layers below its root).
// Reflinked extents are counted once per file that shares them.
func allocatedUnder(dir string) int64 {
	var n int64
	var root unix.Stat_t
	if unix.Stat(dir, &root) != nil {
		return 0
	}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		var st unix.Stat_t
		if unix.Lstat(p, &st) != nil {
			return nil
		}
		if st.Dev != root.Dev {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.Type().IsRegular() {
			n += st.Blocks * 512
		}
		return nil
	})
	return n
}

func benchFS(ctx context.Context, base, fsType string, img *ociimage.Image, archive, pcRef, pcArchive, busybox string, o options) ([]result, []scaleResult, error) {
	runs, imgSize, snapBin, skipBlock := o.runs, o.imgSize, o.snapBin, o.skipBlock
	mnt, undo, err := withFS(ctx, base, fsType)
	if err != nil {
		return nil, nil, err
	}
	defer undo()
	out, err := benchFSOn(ctx, mnt, fsType, img, archive, pcRef, pcArchive, runs, imgSize, snapBin, skipBlock)
	if err != nil {
		return out, nil, err
	}
	ss, err := benchScale(ctx, mnt, fsType, busybox, o.scales, o.scaleBytes, imgSize)
	return out, ss, err
}

func benchFSOn(ctx context.Context, mnt, fsType string, img *ociimage.Image, archive, pcRef, pcArchive string, runs int, imgSize int64, snapBin string, skipBlock bool) ([]result, error) {
	var out []result

	// In-process: the same unpack code (pkg/rootfs.ApplyLayers) and the
	// 128-layer cycle against each snapshotter.
	cs, layers, err := contentStore(ctx, filepath.Join(mnt, "content"), img)
	if err != nil {
		return nil, err
	}
	kinds := inprocKinds
	if skipBlock {
		kinds = kinds[:3]
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
		for _, sd := range d.snaps {
			purgeLoop(ctx, sd.root)
		}
	}()
	if _, err := d.ctr("image", "import", "--no-unpack", archive); err != nil {
		return out, err
	}
	if _, err := d.ctr("image", "import", "--no-unpack", pcArchive); err != nil {
		return out, err
	}
	free := func() int64 { return freeBytes(mnt) }
	for _, sn := range []string{"overlayfs", "loop", "loopl"} {
		label := sn
		root := filepath.Join(mnt, "daemon", "root", "io.containerd.snapshotter.v1.overlayfs")
		if sd := d.snaps[sn]; sd != nil {
			label, root = "loop-"+sd.mode, sd.root
		}
		r := result{fs: fsType, snapshotter: label, mode: "containerd 1.6"}
		// The previous snapshotter's removals are collected in the
		// background: wait until they are done before the baseline.
		settle(free)
		free0 := freeBytes(mnt)
		logf("%s/%s (daemon): unpack", fsType, label)
		start := time.Now()
		_, r.err = d.ctr("image", "import", "--snapshotter", sn, archive)
		r.unpack = time.Since(start)
		r.freeDelta = free0 - freeBytes(mnt)
		switch sn {
		case "loop":
			r.allocated = allocatedUnder(filepath.Join(root, "snapshots"))
		case "loopl":
			r.allocated = allocatedUnder(filepath.Join(root, "layers"))
		default:
			r.allocated = allocatedUnder(root)
		}
		if r.err == nil {
			logf("%s/%s (daemon): %d x ctr run --rm", fsType, label, runs)
			r.p50, r.p99, r.err = d.startLatency(sn, img.Ref, runs)
		}
		if r.err == nil {
			logf("%s/%s (daemon): new container's disk", fsType, label)
			r.perContainer, r.err = d.newContainerBytes(sn, img.Ref, free)
		}
		if r.err == nil {
			logf("%s/%s (daemon): page cache of 10 readers", fsType, label)
			if _, err := d.ctr("image", "import", "--snapshotter", sn, pcArchive); err != nil {
				r.err = err
			} else {
				r.pageCache, r.err = d.pageCacheGrowth(sn, pcRef, pageCacheFile, root, 10)
			}
		}
		out = append(out, r)
	}
	return out, nil
}

func report(rs []result, img *ociimage.Image, runs int, imgSize int64) {
	host, _ := os.Hostname()
	var uts unix.Utsname
	unix.Uname(&uts)
	fmt.Printf("Image: %d layers, %d MiB of incompressible data (uncompressed tars). Loop images and blockfile's scratch: %d MiB; 128-layer runs use 64 MiB images. Kernel %s, host %s.\n\n",
		len(img.Layers), img.Size()>>20, imgSize>>20, strings.TrimRight(string(uts.Release[:]), "\x00"), host)
	fmt.Println("| backing fs | snapshotter | via | unpack | free-space delta after unpack | allocated (st_blocks sum) | ctr run --rm p50 | p99 | 128LayersMount | new container before writing | page cache, 10 readers of 100 MiB |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|---|")
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
		per, pc := "-", "-"
		if r.mode != "in-process" {
			per, pc = fmt.Sprintf("%.2f MiB", float64(r.perContainer)/(1<<20)), fmt.Sprintf("%d MiB", r.pageCache>>20)
		}
		fmt.Printf("| %s | %s | %s | %.2f s | %d MiB | %d MiB | %s | %s | %s | %s |\n", r.fs, r.snapshotter, r.mode, r.unpack.Seconds(), r.freeDelta>>20, r.allocated>>20, lat, l128, per, pc)
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
