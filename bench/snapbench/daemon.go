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
	"strings"
	"syscall"
	"time"
)

// daemons is a private containerd 1.6 (default snapshotter overlayfs)
// with loop-snapshotter as proxy plugins "loop" (flat mode) and "loopl"
// (layered mode), sockets under run.
type daemons struct {
	dir, run, sock, runcRoot string
	snaps                    map[string]*snapd
	ctrd                     *proc
}

type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// snapd is one loop-snapshotter process.
type snapd struct {
	mode, root, sock string
	p                *proc
}

// loopPlugins maps the benchmark's proxy plugin names to storage modes.
var loopPlugins = map[string]string{"loop": "flat", "loopl": "layered"}

func startDaemons(snapBin, dir, run string, defaultSize int64) (*daemons, error) {
	d := &daemons{
		dir: dir, run: run,
		sock:     filepath.Join(run, "containerd.sock"),
		runcRoot: filepath.Join(run, "runc"),
		snaps:    map[string]*snapd{},
	}
	for _, p := range []string{run, filepath.Join(dir, "etc")} {
		if err := os.MkdirAll(p, 0o700); err != nil {
			return nil, err
		}
	}
	var proxies strings.Builder
	for name, mode := range loopPlugins {
		sd := &snapd{mode: mode, root: filepath.Join(dir, "root", "io.containerd.snapshotter.v1."+name), sock: filepath.Join(run, name+".sock")}
		cfg := filepath.Join(dir, "etc", name+".toml")
		if err := os.WriteFile(cfg, []byte(fmt.Sprintf("mode = %q\ndefault_size = %d\n", mode, defaultSize)), 0o600); err != nil {
			return nil, err
		}
		var err error
		if sd.p, err = startLogged(filepath.Join(dir, name+".log"), snapBin, "--config", cfg, "--root", sd.root, "--address", sd.sock); err != nil {
			d.stop()
			return nil, err
		}
		d.snaps[name] = sd
		if err := waitSocket(sd.sock); err != nil {
			d.stop()
			return nil, err
		}
		fmt.Fprintf(&proxies, "[proxy_plugins.%s]\n  type = \"snapshot\"\n  address = %q\n", name, sd.sock)
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
%s`, filepath.Join(dir, "root"), filepath.Join(run, "state"), d.sock, d.sock+".ttrpc", proxies.String())
	if err := os.WriteFile(ccfg, []byte(body), 0o600); err != nil {
		d.stop()
		return nil, err
	}
	var err error
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
	ps := []*proc{d.ctrd}
	for _, sd := range d.snaps {
		ps = append(ps, sd.p)
	}
	for _, p := range ps {
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

// newContainerBytes is the disk space one new container takes before it
// writes anything: free space before and after `ctr run -d` of a sleeping
// container (synced), which is then removed.
func (d *daemons) newContainerBytes(sn, ref string, free func() int64) (int64, error) {
	id := "alloc-" + sn
	settle(free)
	free0 := free()
	if _, err := d.ctr("run", "-d", "--snapshotter", sn, "--runc-root", d.runcRoot, ref, id, "/bin/sleep", "1000"); err != nil {
		return 0, err
	}
	delta := free0 - free()
	return delta, d.rmContainer(id)
}

// rmContainer kills, deletes and removes a running container.
func (d *daemons) rmContainer(id string) error {
	if _, err := d.ctr("task", "kill", "-s", "SIGKILL", id); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := d.ctr("task", "delete", id)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
	_, err := d.ctr("container", "rm", id)
	return err
}

// pageCacheGrowth starts n containers of ref, has each read file once
// (ctr task exec waits for it) and returns how much the kernel's Cached
// grew, after evicting the snapshotter's own files (root) from the page
// cache so the first read comes from disk.
func (d *daemons) pageCacheGrowth(sn, ref, file, root string, n int) (int64, error) {
	evictUnder(root)
	settle(meminfoCached)
	c0 := meminfoCached()
	var ids []string
	defer func() {
		for _, id := range ids {
			d.rmContainer(id)
		}
	}()
	for i := range n {
		id := fmt.Sprintf("pc-%s-%d", sn, i)
		if _, err := d.ctr("run", "-d", "--snapshotter", sn, "--runc-root", d.runcRoot, ref, id, "/bin/sleep", "1000"); err != nil {
			return 0, err
		}
		ids = append(ids, id)
		if _, err := d.ctr("task", "exec", "--exec-id", "read", id, "/bin/sh", "-c", "cat "+file+" > /dev/null"); err != nil {
			return 0, err
		}
	}
	return meminfoCached() - c0, nil
}
