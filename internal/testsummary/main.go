// Command testsummary reads `go test -json` on stdin, prints what plain
// `go test` would (each package's result line and the output of failing
// tests; everything with -v), and ends with one summary line for the pass:
//
//	integration: 212 ran, 3 skipped, 209 passed, 0 failed
//
// preceded by one line per skipped test with its reason. It exits 1 if a
// test or a package (a build) failed, so `make test` stops there; `go test`
// without -v prints nothing about skips, which let missing tools pass
// unnoticed.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

type result struct {
	ran, passed, failed, skipped int
	skips                        []string // "pkg TestX: reason"
	pkgFailed                    []string
}

func main() {
	name := flag.String("pass", "go test", "name of this test pass, printed in the summary")
	verbose := flag.Bool("v", false, "print every test's output, as go test -v")
	flag.Parse()
	r, err := summarize(os.Stdin, os.Stdout, *verbose)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testsummary: %v\n", err)
		os.Exit(1)
	}
	for _, s := range r.skips {
		fmt.Printf("skipped %s\n", s)
	}
	for _, p := range r.pkgFailed {
		fmt.Printf("FAIL package %s\n", p)
	}
	fmt.Printf("%s: %d ran, %d skipped, %d passed, %d failed\n", *name, r.ran, r.skipped, r.passed, r.failed)
	if r.failed > 0 || len(r.pkgFailed) > 0 {
		os.Exit(1)
	}
}

func summarize(in io.Reader, out io.Writer, verbose bool) (result, error) {
	var r result
	// Output of each running test, printed only if it fails (or -v).
	pending := map[string][]string{}
	// Packages with a failing test: their own "fail" is not a separate
	// failure. One that fails with no failing test did not build or
	// crashed outside a test.
	testFailed := map[string]bool{}
	var pkgFails []string
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if err := json.Unmarshal(line, &e); err != nil || e.Action == "" {
			// Not JSON: go's own messages (build errors) pass through.
			fmt.Fprintln(out, string(line))
			continue
		}
		key := e.Package + " " + e.Test
		switch e.Action {
		case "output":
			if e.Test == "" || verbose {
				fmt.Fprint(out, e.Output)
			} else {
				pending[key] = append(pending[key], e.Output)
			}
		case "pass", "fail", "skip":
			if e.Test == "" {
				if e.Action == "fail" {
					pkgFails = append(pkgFails, e.Package)
				}
				continue
			}
			r.ran++
			switch e.Action {
			case "pass":
				r.passed++
			case "fail":
				r.failed++
				testFailed[e.Package] = true
				for _, o := range pending[key] {
					fmt.Fprint(out, o)
				}
			case "skip":
				r.skipped++
				r.skips = append(r.skips, fmt.Sprintf("%s %s: %s", e.Package, e.Test, skipReason(pending[key])))
			}
			delete(pending, key)
		}
	}
	if err := sc.Err(); err != nil {
		return r, err
	}
	for _, p := range pkgFails {
		if !testFailed[p] {
			r.pkgFailed = append(r.pkgFailed, p)
		}
	}
	sort.Strings(r.skips)
	return r, nil
}

// skipReason finds the t.Skip message in a skipped test's output: the
// indented "file.go:NN: reason" line before "--- SKIP".
func skipReason(lines []string) string {
	reason := ""
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- ") {
			continue
		}
		if i := strings.Index(t, ".go:"); i > 0 {
			if j := strings.Index(t[i:], ": "); j > 0 {
				t = t[i+j+2:]
			}
		}
		reason = t
	}
	if reason == "" {
		return "(no reason given)"
	}
	return reason
}
