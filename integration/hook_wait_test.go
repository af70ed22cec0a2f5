//go:build integration

package integration

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func hookRequireUnshare(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("needs unshare")
	}
}

func waitComm(t *testing.T, pid int, comm string) {
	t.Helper()
	for range 1000 {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
		if strings.TrimSpace(string(b)) == comm {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("process %d never became %s", pid, comm)
}

func waitFile(t *testing.T, p string) {
	t.Helper()
	for range 2000 {
		if _, err := os.Stat(p); err == nil {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("%s never appeared", p)
}
