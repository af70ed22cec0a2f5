// Command hookbench measures oci-loop-hook latency: setup and teardown of n
// containers under runc (the hook's own timing from its log, split into the
// pkg/loopdev attach and the rest), the end-to-end `runc run -d` and
// `runc delete` times around it, and the wall-clock time of the hook
// process itself (exec included) against a bare mount namespace. Markdown
// on stdout, progress on stderr. Needs root, runc, mksquashfs, busybox,
// unshare.
//
//	CGO_ENABLED=0 go build -o bin/oci-loop-hook ./cmd/oci-loop-hook
//	go build -o bin/hookbench ./bench/hookbench && bin/hookbench -hook bin/oci-loop-hook -n 50
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

func main() {
	hookBin := flag.String("hook", "bin/oci-loop-hook", "oci-loop-hook binary (static)")
	n := flag.Int("n", 50, "containers per mode")
	work := flag.String("work", os.TempDir(), "parent of the scratch directory")
	flag.Parse()
	if err := run(*hookBin, *n, *work); err != nil {
		fmt.Fprintln(os.Stderr, "hookbench:", err)
		os.Exit(1)
	}
}

type world struct {
	dir, bin, config, log, bundle, runcRoot, image string
}

func run(hookBin string, n int, work string) error {
	bin, err := filepath.Abs(hookBin)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp(work, "hookbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	w := &world{dir: dir, bin: bin, log: filepath.Join(dir, "hook.log"), runcRoot: filepath.Join(dir, "runc")}
	if err := w.prepare(); err != nil {
		return err
	}
	var runcRun, runcDelete []time.Duration
	for i := range n {
		id := fmt.Sprintf("hb-%d-%d", os.Getpid(), i)
		t0 := time.Now()
		// stdio to /dev/null: a pipe would be inherited by the container.
		if err := exec.Command("runc", "--root", w.runcRoot, "run", "--detach", "--bundle", w.bundle, id).Run(); err != nil {
			return fmt.Errorf("runc run -d %s: %w", id, err)
		}
		t1 := time.Now()
		_ = cmd("runc", "--root", w.runcRoot, "kill", id, "KILL")
		t2 := time.Now()
		if err := deleteWhenStopped(w.runcRoot, id); err != nil {
			return err
		}
		runcRun = append(runcRun, t1.Sub(t0))
		runcDelete = append(runcDelete, time.Since(t2))
		fmt.Fprintf(os.Stderr, "\rrunc %d/%d", i+1, n)
	}
	fmt.Fprintln(os.Stderr)
	setup, attach, teardown, err := parseLog(w.log)
	if err != nil {
		return err
	}
	execSetup, execTeardown, err := w.direct(n, false)
	if err != nil {
		return err
	}
	// A container in a user namespace of its own gets its mount flags
	// locked: one more namespace copy and a helper process per mount.
	execSetupUserNS, _, err := w.direct(n, true)
	if err != nil {
		return err
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	fmt.Printf("## oci-loop-hook latency (%d containers, runc, squashfs image, kernel %s)\n\n", n, strings.TrimSpace(string(kernel)))
	fmt.Println("| measurement | p50 | p99 | max |")
	fmt.Println("|---|---|---|---|")
	row := func(name string, d []time.Duration) {
		fmt.Printf("| %s | %s | %s | %s |\n", name, pct(d, 50), pct(d, 99), pct(d, 100))
	}
	row("setup inside the hook (Setup(): request to return, from its log)", setup)
	row("  of which pkg/loopdev attach", attach)
	row("teardown inside the hook (Teardown(), from its log)", teardown)
	row("hook process wall time, setup (exec included)", execSetup)
	row("hook process wall time, setup, user-namespaced container (flags locked)", execSetupUserNS)
	row("hook process wall time, teardown (exec included)", execTeardown)
	row("`runc run -d` end to end (hook included)", runcRun)
	row("`runc delete` end to end (poststop hook included)", runcDelete)
	fmt.Printf("\nattach share of the in-hook setup time: %.1f%% (sum of attach / sum of setup)\n", 100*float64(sum(attach))/float64(sum(setup)))
	return nil
}

func (w *world) prepare() error {
	images := filepath.Join(w.dir, "images")
	src := filepath.Join(w.dir, "src")
	rootfs := filepath.Join(w.dir, "bundle", "rootfs")
	for _, d := range []string{images, src, w.runcRoot, filepath.Join(w.dir, "state"), filepath.Join(rootfs, "bin"), filepath.Join(rootfs, "data"), filepath.Join(rootfs, "proc"), filepath.Join(rootfs, "dev"), filepath.Join(rootfs, "sys")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	os.Chmod(w.dir, 0o755)
	if err := os.WriteFile(filepath.Join(src, "hello.txt"), []byte("hello\n"), 0o644); err != nil {
		return err
	}
	w.image = filepath.Join(images, "bench.sqfs")
	if err := cmd("mksquashfs", src, w.image, "-noappend", "-quiet", "-no-progress"); err != nil {
		return err
	}
	os.Chmod(w.image, 0o644)
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return err
	}
	if err := cmd("cp", bb, filepath.Join(rootfs, "bin", "busybox")); err != nil {
		return err
	}
	os.Symlink("busybox", filepath.Join(rootfs, "bin", "sleep"))
	w.config = filepath.Join(w.dir, "config.toml")
	cfg := fmt.Sprintf("version = 1\nstate_dir = %q\nlog = \"file:%s\"\n[images.bench]\npath = %q\nfstype = \"squashfs\"\n", filepath.Join(w.dir, "state"), w.log, w.image)
	if err := os.WriteFile(w.config, []byte(cfg), 0o644); err != nil {
		return err
	}
	w.bundle = filepath.Join(w.dir, "bundle")
	if err := cmd("runc", "spec", "--bundle", w.bundle); err != nil {
		return err
	}
	raw, err := os.ReadFile(filepath.Join(w.bundle, "config.json"))
	if err != nil {
		return err
	}
	var spec map[string]any
	if err := json.Unmarshal(raw, &spec); err != nil {
		return err
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = []string{"/bin/sleep", "600"}
	spec["annotations"] = map[string]string{"org.ociloop.image": "bench", "org.ociloop.dest": "/data"}
	entry := func(c string) []any {
		return []any{map[string]any{"path": w.bin, "args": []string{"oci-loop-hook", "--config", w.config, c}, "timeout": 30}}
	}
	spec["hooks"] = map[string]any{"createRuntime": entry("setup"), "poststop": entry("teardown")}
	out, _ := json.Marshal(spec)
	return os.WriteFile(filepath.Join(w.bundle, "config.json"), out, 0o644)
}

// direct runs the hook binary itself against a process in a private mount
// namespace (runc init's view before pivot_root), with userNS in a user
// namespace of its own too, timing the process.
func (w *world) direct(n int, userNS bool) (setup, teardown []time.Duration, err error) {
	args := []string{"--mount", "--propagation", "private", "sleep", "600"}
	if userNS {
		args = append([]string{"--user", "--map-root-user"}, args...)
	}
	for i := range n {
		ns := exec.Command("unshare", args...)
		if err := ns.Start(); err != nil {
			return nil, nil, err
		}
		for range 1000 {
			if b, _ := os.ReadFile("/proc/" + strconv.Itoa(ns.Process.Pid) + "/comm"); strings.TrimSpace(string(b)) == "sleep" {
				break
			}
			time.Sleep(time.Millisecond)
		}
		id := fmt.Sprintf("hbd-%d-%d-%t", os.Getpid(), i, userNS)
		state := func(status string, pid int) string {
			b, _ := json.Marshal(map[string]any{"ociVersion": "1.0.2", "id": id, "status": status, "pid": pid, "bundle": w.bundle,
				"annotations": map[string]string{"org.ociloop.image": "bench", "org.ociloop.dest": "/data"}})
			return string(b)
		}
		d, err := hookExec(w.bin, w.config, "setup", state("creating", ns.Process.Pid))
		if err != nil {
			ns.Process.Kill()
			ns.Wait()
			return nil, nil, err
		}
		setup = append(setup, d)
		ns.Process.Kill()
		ns.Wait()
		d, err = hookExec(w.bin, w.config, "teardown", state("stopped", 0))
		if err != nil {
			return nil, nil, err
		}
		teardown = append(teardown, d)
		fmt.Fprintf(os.Stderr, "\rdirect %d/%d", i+1, n)
	}
	fmt.Fprintln(os.Stderr)
	return setup, teardown, nil
}

func hookExec(bin, config, command, state string) (time.Duration, error) {
	c := exec.Command(bin, "--config", config, command)
	c.Stdin = strings.NewReader(state)
	c.Env = []string{}
	t0 := time.Now()
	out, err := c.CombinedOutput()
	d := time.Since(t0)
	if err != nil {
		return 0, fmt.Errorf("hook %s: %v: %s", command, err, out)
	}
	return d, nil
}

func deleteWhenStopped(root, id string) error {
	var last error
	for range 500 {
		out, err := exec.Command("runc", "--root", root, "delete", id).CombinedOutput()
		if err == nil {
			return nil
		}
		last = fmt.Errorf("runc delete %s: %v: %s", id, err, out)
		time.Sleep(2 * time.Millisecond)
	}
	return last
}

var (
	reSetup    = regexp.MustCompile(`msg="setup done".* duration="?([^ "]+)"?`)
	reAttach   = regexp.MustCompile(`attach_duration="?([^ "]+)"?`)
	reTeardown = regexp.MustCompile(`msg="teardown done".* duration="?([^ "]+)"?`)
)

func parseLog(path string) (setup, attach, teardown []time.Duration, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, nil, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if m := reSetup.FindStringSubmatch(l); m != nil {
			a := reAttach.FindStringSubmatch(l)
			ds, e1 := time.ParseDuration(m[1])
			da, e2 := time.ParseDuration(a[1])
			if e1 != nil || e2 != nil {
				return nil, nil, nil, fmt.Errorf("log line %q", l)
			}
			setup, attach = append(setup, ds), append(attach, da)
		}
		if m := reTeardown.FindStringSubmatch(l); m != nil {
			d, err := time.ParseDuration(m[1])
			if err != nil {
				return nil, nil, nil, fmt.Errorf("log line %q", l)
			}
			teardown = append(teardown, d)
		}
	}
	return setup, attach, teardown, nil
}

func pct(d []time.Duration, p int) string {
	if len(d) == 0 {
		return "-"
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p+99)/100 - 1
	i = max(0, min(i, len(s)-1))
	return s[i].Round(10 * time.Microsecond).String()
}

func sum(d []time.Duration) time.Duration {
	var t time.Duration
	for _, x := range d {
		t += x
	}
	return t
}

func cmd(argv ...string) error {
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %v: %s", argv, err, out)
	}
	return nil
}
