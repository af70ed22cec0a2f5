//go:build integration

package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// criRepoRoot returns the module root (the directory holding go.mod).
func criRepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

// criGoBuild builds the main package pkg (relative to the repository root)
// into dir and returns the binary's path.
func criGoBuild(t testing.TB, repo, pkg, dir string) string {
	t.Helper()
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, "./"+pkg)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// criCrictlVersion is the cri-tools release the Kubernetes node path is
// tested with.
const criCrictlVersion = "v1.37.0"

// criFindCrictl returns crictl from PATH, from <repo>/bin/tools (where
// .ci/run installs it), or installs it there through the Go module proxy.
func criFindCrictl(t *testing.T, repo string) string {
	t.Helper()
	if p, err := exec.LookPath("crictl"); err == nil {
		return p
	}
	tools := filepath.Join(repo, "bin", "tools")
	p := filepath.Join(tools, "crictl")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	if err := os.MkdirAll(tools, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "install", "sigs.k8s.io/cri-tools/cmd/crictl@"+criCrictlVersion)
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), "GOBIN="+tools, "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go install crictl %s: %v\n%s", criCrictlVersion, err, b)
	}
	return p
}

// criProc is a daemon started by the test, stopped by pid.
type criProc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func criStart(t testing.TB, name, logPath string, env []string, argv ...string) *criProc {
	t.Helper()
	return criStartActivated(t, name, logPath, env, nil, argv...)
}

// criBindSocket binds and listens on a unix socket as systemd does for a
// .socket unit, and returns the listening socket as a file to pass on.
func criBindSocket(t *testing.T, path string) *os.File {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	// The file is a dup; the socket path stays after the listener closes,
	// as with RemoveOnStop=no.
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close(); os.Remove(path) })
	return f
}

// criStartActivated is criStart passing listen (when not nil) as fd 3 with
// LISTEN_FDS=1 and LISTEN_PID set to the child's pid, the socket-activation
// protocol. LISTEN_PID must be the child's own pid, known only after fork:
// the child is started through sh, which sets it and execs the daemon.
func criStartActivated(t testing.TB, name, logPath string, env []string, listen *os.File, argv ...string) *criProc {
	t.Helper()
	if listen != nil {
		argv = append([]string{"/bin/sh", "-c", `export LISTEN_PID=$$; exec "$@"`, "sh"}, argv...)
		env = append(env, "LISTEN_FDS=1", "LISTEN_FDNAMES=loop-snapshotter.socket")
	}
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(), env...)
	// Own process group: a ^C of the test run must not hit the daemons
	// before the cleanups stop them in order. Pdeathsig: if the test
	// process itself dies (killed, SIGPIPE), the daemons get SIGTERM, their
	// graceful stop, instead of running on.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if listen != nil {
		cmd.ExtraFiles = []*os.File{listen} // fd 3, SD_LISTEN_FDS_START
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &criProc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p
}

func (p *criProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits; SIGKILL after grace. It reports whether the
// process ended on SIGTERM (or had already exited).
func (p *criProc) stop(grace time.Duration) (graceful bool) {
	if p.exited() {
		return true
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return true
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	return false
}

func (p *criProc) tail(n int) string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// criWaitSocket waits until a unix socket accepts connections, failing early
// if the daemon that should serve it exits.
func criWaitSocket(t testing.TB, p *criProc, sock string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if p.exited() {
			t.Fatalf("%s exited before serving %s: %v\n%s", p.name, sock, p.err, p.tail(40))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: socket %s not ready after %s: %v\n%s", p.name, sock, timeout, err, p.tail(40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// criRun runs a command with a bounded time and returns its stdout; it fails
// the test with stderr on error.
func criRun(t *testing.T, timeout time.Duration, argv ...string) string {
	t.Helper()
	out, err := criTry(timeout, argv...)
	if err != nil {
		t.Fatalf("%s: %v", strings.Join(argv, " "), err)
	}
	return out
}

func criTry(timeout time.Duration, argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("%w\nstdout: %s\nstderr: %s", err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// criProcessesUnder lists processes (other than this one) whose command line
// mentions dir: containerd, the snapshotter and every shim started for the
// test carry a path under it.
func criProcessesUnder(dir string) []string {
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	var out []string
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(dir)) {
			continue
		}
		out = append(out, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")))
	}
	return out
}

// criKillProcessesUnder kills, by pid, the processes criProcessesUnder finds;
// only used on the failure path, after containerd itself was stopped.
func criKillProcessesUnder(t *testing.T, dir string) {
	for _, line := range criProcessesUnder(dir) {
		pid, _ := strconv.Atoi(strings.Fields(line)[0])
		t.Logf("killing leftover process %s", line)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			t.Logf("kill %d: %v", pid, err)
		}
	}
}

// criNotifySocket listens for sd_notify datagrams, as systemd does for a
// Type=notify service.
func criNotifySocket(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// criWaitReady waits for READY=1 on the notify socket.
func criWaitReady(t *testing.T, p *criProc, c *net.UnixConn, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 4096)
	for {
		if err := c.SetReadDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		n, err := c.Read(buf)
		if err == nil {
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				if line == "READY=1" {
					return
				}
			}
			continue
		}
		if p.exited() {
			t.Fatalf("%s exited before READY=1: %v\n%s", p.name, p.err, p.tail(40))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no READY=1 on NOTIFY_SOCKET after %s\n%s", p.name, timeout, p.tail(40))
		}
	}
}
