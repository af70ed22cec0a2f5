package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/loopkit/loopkit/internal/hook"
)

// runMainEnv makes the test binary run main() instead of the tests, so the
// test sees the real process: its arguments, streams and exit status.
const runMainEnv = "OCI_LOOP_HOOK_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		main()
		panic("main returned without exiting")
	}
	os.Exit(m.Run())
}

func runBinary(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run %v: %v", args, err)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

// TestBinaryWiring checks what main adds to internal/hookcli: the
// arguments without the program name, the linker-set version, the exit
// status of a usage error, and the hidden flag-locking helper the hook runs
// by re-executing itself.
func TestBinaryWiring(t *testing.T) {
	if code, out, errs := runBinary(t, "--version"); code != 0 || out != "oci-loop-hook dev (commit unknown)\n" || errs != "" {
		t.Errorf("--version: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	if code, out, errs := runBinary(t, "frob"); code != 2 || out != "" || errs != "oci-loop-hook: usage: unknown command \"frob\" (see --help)\n" {
		t.Errorf("unknown command: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	if code, out, _ := runBinary(t, "--help"); code != 0 || !strings.HasPrefix(out, "Usage: oci-loop-hook ") {
		t.Errorf("--help: exit %d, stdout %q", code, out)
	}
	missing := t.TempDir() + "/missing"
	if code, _, errs := runBinary(t, hook.LockChildCommand, missing); code != 1 || !strings.HasPrefix(errs, "open_tree "+missing+": ") {
		t.Errorf("lock helper: exit %d, stderr %q", code, errs)
	}
}
