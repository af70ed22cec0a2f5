//go:build integration

package integration

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/internal/ociimage"
	"github.com/loopkit/loopkit/internal/testutil"
)

// BenchmarkContainerdRunRm times `ctr run --rm IMAGE ID true` on containerd
// 2.x, one whole ctr process per sample, for the loop snapshotter in every
// mode (each its own daemon, proxy plugins loop-<mode>) against
// containerd's own overlayfs, erofs and blockfile snapshotters, all in one
// private containerd with the same image (about 26 MB in 4 layers)
// unpacked into each. Samples are interleaved, the order rotating each
// round, so that a drifting machine affects every snapshotter alike.
// b.N is the number of rounds; -benchtime 40x gives 40 samples each.
// Reports p50 and p99 in ms per snapshotter and each one's p50 ratio to
// overlayfs, and logs a markdown table (-v).
//
//	go test -tags integration -run '^$' -bench BenchmarkContainerdRunRm -benchtime 40x -v ./integration
func BenchmarkContainerdRunRm(b *testing.B) {
	var d2 ctdDaemon
	for _, d := range ctdDaemons(b) {
		if d.major == 2 {
			d2 = d
		}
	}
	if d2.containerd == "" {
		b.Skip("needs containerd " + containerd2Version + " (make tools)")
	}
	benchRunRm(b, d2)
}

func benchRunRm(b *testing.B, d ctdDaemon) {
	testutil.RequireRoot(b)
	testutil.RequireBinaries(b, "runc", "busybox", "mkfs.ext4", "mkfs.erofs", "go")

	dir, err := os.MkdirTemp("/var/tmp", "loopkit-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	testutil.NoLeaks(b, dir)
	shimDir, err := os.MkdirTemp("", "lkb")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(shimDir) })
	for _, s := range []string{"run", "bin", "etc", "logs"} {
		if err := os.MkdirAll(filepath.Join(dir, s), 0o700); err != nil {
			b.Fatal(err)
		}
	}
	bin := criGoBuild(b, criRepoRoot(b), "cmd/loop-snapshotter", filepath.Join(dir, "bin"))

	// One snapshotter daemon per mode.
	var proxies strings.Builder
	var names []string
	for _, mode := range snapshotterModes {
		name := "loop-" + mode
		root := filepath.Join(dir, "root", "io.containerd.snapshotter.v1."+name)
		sock := filepath.Join(dir, "run", name+".sock")
		cfg := filepath.Join(dir, "etc", name+".toml")
		if err := os.WriteFile(cfg, []byte(fmt.Sprintf("mode = %q\ndefault_size = \"256MiB\"\n", mode)), 0o644); err != nil {
			b.Fatal(err)
		}
		p := criStart(b, name, filepath.Join(dir, "logs", name+".log"), nil, bin, "--config", cfg, "--root", root, "--address", sock)
		b.Cleanup(func() { p.stop(30 * time.Second) })
		criWaitSocket(b, p, sock, time.Minute)
		fmt.Fprintf(&proxies, "  [proxy_plugins.%q]\n    type = \"snapshot\"\n    address = %q\n", name, sock)
		names = append(names, name)
	}
	// blockfile needs a scratch filesystem image to copy for each snapshot.
	scratch := filepath.Join(dir, "blockfile-scratch")
	if out, err := exec.Command("sh", "-c", "truncate -s 256M "+scratch+" && mkfs.ext4 -q -F "+scratch).CombinedOutput(); err != nil {
		b.Fatalf("blockfile scratch: %v\n%s", err, out)
	}
	sock := filepath.Join(dir, "run", "containerd.sock")
	snapshotters := append(slices.Clone(names), "overlayfs", "erofs", "blockfile")
	conf := ctdConfig2(ctdPaths{dir: dir, sock: sock, proxies: proxies.String(), shimDir: shimDir, unpack: snapshotters}, false)
	conf += fmt.Sprintf(`  [plugins.'io.containerd.snapshotter.v1.blockfile']
    scratch_file = %q
    fs_type = 'ext4'
    recreate_scratch = true
`, scratch)
	cfgPath := filepath.Join(dir, "etc", "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(conf), 0o600); err != nil {
		b.Fatal(err)
	}
	ctrd := criStart(b, "containerd", filepath.Join(dir, "logs", "containerd.log"), d.env(), d.containerd, "--config", cfgPath)
	criWaitSocket(b, ctrd, sock, time.Minute)
	b.Cleanup(func() {
		if b.Failed() {
			b.Logf("containerd log tail:\n%s", ctrd.tail(60))
		}
	})

	ns := "loopkit-bench"
	ctr := func(args ...string) error {
		c := exec.Command(d.ctr, append([]string{"--address", sock, "--namespace", ns}, args...)...)
		var buf bytes.Buffer
		c.Stdout, c.Stderr = &buf, &buf
		if err := c.Run(); err != nil {
			return fmt.Errorf("ctr %s: %w\n%s", strings.Join(args, " "), err, buf.String())
		}
		return nil
	}
	archive := filepath.Join(dir, "image.tar")
	const ref = "loopkit.test/bench:v1"
	benchImage(b, archive, ref)
	for _, s := range snapshotters {
		if err := ctr("images", "import", "--snapshotter", s, archive); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() {
		_ = ctr("images", "rm", "--sync", ref)
		ctrd.stop(30 * time.Second)
	})
	samples := map[string][]time.Duration{}
	// A failed run is counted and retried (up to 3 times): containerd's own
	// loop attach (blockfile) races with other loop users of a shared
	// machine (ENXIO when a device it picked was removed meanwhile).
	failures := map[string]int{}
	run := func(s string, i int) {
		for attempt := 0; ; attempt++ {
			id := fmt.Sprintf("bench-%s-%d-%d", s, i, attempt)
			start := time.Now()
			err := ctr("run", "--rm", "--snapshotter", s, ref, id, "/bin/true")
			if err == nil {
				samples[s] = append(samples[s], time.Since(start))
				return
			}
			failures[s]++
			b.Logf("%s (attempt %d): %v", s, attempt+1, err)
			if attempt == 2 {
				b.Fatal(err)
			}
			_ = ctr("containers", "rm", id)
		}
	}
	// One warm-up each (page cache, shim binary).
	for _, s := range snapshotters {
		run(s, 999999)
	}
	samples = map[string][]time.Duration{}
	failures = map[string]int{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for k := range snapshotters {
			s := snapshotters[(i+k)%len(snapshotters)]
			run(s, i)
		}
	}
	b.StopTimer()
	pct := func(ds []time.Duration, p float64) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		idx := int(float64(len(s)-1) * p)
		return float64(s[idx]) / float64(time.Millisecond)
	}
	base := pct(samples["overlayfs"], 0.5)
	var tbl strings.Builder
	fmt.Fprintf(&tbl, "| snapshotter | samples | failed runs | p50 ms | p99 ms | p50 / overlayfs | p50 / erofs |\n|---|---|---|---|---|---|---|\n")
	erofs := pct(samples["erofs"], 0.5)
	for _, s := range snapshotters {
		p50, p99 := pct(samples[s], 0.5), pct(samples[s], 0.99)
		b.ReportMetric(p50, s+"-p50-ms")
		b.ReportMetric(p99, s+"-p99-ms")
		fmt.Fprintf(&tbl, "| %s | %d | %d | %.0f | %.0f | %.2fx | %.2fx |\n", s, len(samples[s]), failures[s], p50, p99, p50/base, p50/erofs)
	}
	b.Logf("ctr run --rm on containerd %s, %d rounds:\n%s", containerd2Version, b.N, tbl.String())
	if out := os.Getenv("LOOPKIT_BENCH_OUT"); out != "" {
		_ = os.WriteFile(out, []byte(tbl.String()), 0o644)
	}
}

// benchImage writes a 4-layer image of about 26 MB: static busybox, then
// three layers of 8 MiB of incompressible data each.
func benchImage(b *testing.B, path, ref string) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		b.Fatal(err)
	}
	bbData, err := os.ReadFile(bb)
	if err != nil {
		b.Fatal(err)
	}
	base := busyboxEntries(bbData, []string{"true", "sh"}, "tmp/", "proc/", "sys/", "dev/", "run/", "etc/")
	layers := []ociimage.Blob{criTarLayer(b, base)}
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 3; i++ {
		data := make([]byte, 8<<20)
		rng.Read(data)
		layers = append(layers, criTarLayer(b, []ociimage.Entry{
			{Name: "data/", Mode: 0o755, Dir: true},
			{Name: fmt.Sprintf("data/blob%d", i), Mode: 0o644, Data: data},
		}))
	}
	ctdWriteImage(b, path, ref, layers, []string{"/bin/true"})
}
