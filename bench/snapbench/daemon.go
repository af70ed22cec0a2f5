package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"syscall"
	"time"
)

// daemons is a private containerd 1.6 (default snapshotter overlayfs)
// with loop-snapshotter as proxy plugin "loop", sockets under run.
type daemons struct {
	dir, run, sock, snapSock, snapRoot, runcRoot string
	snap, ctrd                                   *proc
}

type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func startDaemons(snapBin, dir, run string, defaultSize int64) (*daemons, error) {
	d := &daemons{
		dir: dir, run: run,
		sock:     filepath.Join(run, "containerd.sock"),
		snapSock: filepath.Join(run, "loop.sock"),
		snapRoot: filepath.Join(dir, "root", "io.containerd.snapshotter.v1.loop"),
		runcRoot: filepath.Join(run, "runc"),
	}
	for _, p := range []string{run, filepath.Join(dir, "etc")} {
		if err := os.MkdirAll(p, 0o700); err != nil {
			return nil, err
		}
	}
	cfg := filepath.Join(dir, "etc", "loop-snapshotter.toml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("mode = \"flat\"\ndefault_size = %d\n", defaultSize)), 0o600); err != nil {
		return nil, err
	}
	var err error
	if d.snap, err = startLogged(filepath.Join(dir, "loop-snapshotter.log"), snapBin, "--config", cfg, "--root", d.snapRoot, "--address", d.snapSock); err != nil {
		return nil, err
	}
	if err := waitSocket(d.snapSock); err != nil {
		d.stop()
		return nil, err
	}
	ccfg := filepath.Join(dir, "etc", "containerd.toml")
	body := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[proxy_plugins.loop]
  type = "snapshot"
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(run, "state"), d.sock, d.sock+".ttrpc", d.snapSock)
	if err := os.WriteFile(ccfg, []byte(body), 0o600); err != nil {
		d.stop()
		return nil, err
	}
	if d.ctrd, err = startLogged(filepath.Join(dir, "containerd.log"), "containerd", "--config", ccfg); err != nil {
		d.stop()
		return nil, err
	}
	if err := waitSocket(d.sock); err != nil {
		d.stop()
		return nil, err
	}
	return d, nil
}

func startLogged(logPath string, argv ...string) (*proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); f.Close(); close(p.done) }()
	return p, nil
}

func waitSocket(p string) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.Dial("unix", p)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not serving: %w", p, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop stops containerd, then loop-snapshotter, by pid.
func (d *daemons) stop() {
	for _, p := range []*proc{d.ctrd, d.snap} {
		if p == nil {
			continue
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	}
}

func (d *daemons) ctr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"--address", d.sock, "--namespace", "snapbench"}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("ctr %v: %w: %s", args, err, out.String())
	}
	return out.String(), nil
}

// startLatency runs `ctr run --rm` n times and returns p50 and p99
// (nearest rank).
func (d *daemons) startLatency(sn, ref string, n int) (p50, p99 time.Duration, err error) {
	var ds []time.Duration
	for i := range n {
		start := time.Now()
		if _, err := d.ctr("run", "--rm", "--snapshotter", sn, "--runc-root", d.runcRoot, ref, fmt.Sprintf("lat-%s-%d", sn, i), "/bin/true"); err != nil {
			return 0, 0, err
		}
		ds = append(ds, time.Since(start))
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	rank := func(p float64) time.Duration {
		i := int(p*float64(len(ds))+0.999999) - 1
		return ds[max(0, min(i, len(ds)-1))]
	}
	return rank(0.50), rank(0.99), nil
}
