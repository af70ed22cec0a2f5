package main

import (
	"strings"
	"testing"
)

// A captured `go test -json` stream: one pass, one skip with its reason,
// one failing subtest, and a package that did not build.
const stream = `{"Action":"run","Package":"p","Test":"TestA"}
{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN   TestA\n"}
{"Action":"pass","Package":"p","Test":"TestA"}
{"Action":"run","Package":"p","Test":"TestB"}
{"Action":"output","Package":"p","Test":"TestB","Output":"    b_test.go:12: needs podman (apt-get install podman)\n"}
{"Action":"output","Package":"p","Test":"TestB","Output":"--- SKIP: TestB (0.00s)\n"}
{"Action":"skip","Package":"p","Test":"TestB"}
{"Action":"output","Package":"p","Test":"TestC/sub","Output":"    c_test.go:3: boom\n"}
{"Action":"fail","Package":"p","Test":"TestC/sub"}
{"Action":"fail","Package":"p","Test":"TestC"}
{"Action":"output","Package":"p","Output":"FAIL\tp\t0.1s\n"}
{"Action":"fail","Package":"p"}
# q
q/x.go:1:1: syntax error
{"Action":"fail","Package":"q"}
`

func TestSummarize(t *testing.T) {
	var out strings.Builder
	r, err := summarize(strings.NewReader(stream), &out, false)
	if err != nil {
		t.Fatal(err)
	}
	if r.ran != 4 || r.passed != 1 || r.skipped != 1 || r.failed != 2 {
		t.Errorf("counts: %+v", r)
	}
	if len(r.skips) != 1 || r.skips[0] != "p TestB: needs podman (apt-get install podman)" {
		t.Errorf("skips: %q", r.skips)
	}
	if len(r.pkgFailed) != 1 || r.pkgFailed[0] != "q" {
		t.Errorf("packages failed outside a test: %q", r.pkgFailed)
	}
	for _, want := range []string{"c_test.go:3: boom", "FAIL\tp", "q/x.go:1:1: syntax error"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "=== RUN   TestA") {
		t.Errorf("passing test's output printed without -v:\n%s", out.String())
	}
}
