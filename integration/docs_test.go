//go:build integration

package integration

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/loopkit/loopkit/internal/testutil"
)

// Documentation blocks are marked for this test with an HTML comment on the
// line right before the opening fence:
//
//	<!-- doc-test -->                 run the block; it must exit 0
//	<!-- doc-test: skip <reason> -->  do not run it, for the stated reason
//
// Only ```sh, ```bash and ```shell blocks can be marked. Every shell block in
// docs/*.md and in the README's Quickstart section must carry one of the two
// markers, so a documented command cannot silently go untested.

// docBlock is one fenced shell block of a Markdown file.
type docBlock struct {
	file, heading string
	line          int
	code          string
	run           bool
	skip          string // reason, when marked skip
	marked        bool
}

var docMarker = regexp.MustCompile(`^<!--\s*doc-test(:\s*skip\b\s*(.*?))?\s*-->$`)

// docBlocks parses the fenced shell blocks of a Markdown file.
func docBlocks(t *testing.T, path string) []docBlock {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var (
		out      []docBlock
		heading  string
		prev     string
		cur      *docBlock
		fenceLen int
		lineNo   int
	)
	s := bufio.NewScanner(f)
	for s.Scan() {
		lineNo++
		line := s.Text()
		trimmed := strings.TrimSpace(line)
		if cur != nil {
			if strings.HasPrefix(trimmed, "```") && len(strings.TrimLeft(trimmed, "`")) == 0 && len(trimmed) >= fenceLen {
				out = append(out, *cur)
				cur = nil
				prev = trimmed // a marker never carries over to the next block
			} else {
				cur.code += line + "\n"
			}
			continue
		}
		if strings.HasPrefix(line, "#") {
			heading = strings.TrimSpace(strings.TrimLeft(line, "#"))
		}
		if strings.HasPrefix(trimmed, "```") {
			info := strings.TrimLeft(trimmed, "`")
			fenceLen = len(trimmed) - len(info)
			lang := strings.Fields(info + " x")[0]
			b := &docBlock{file: path, heading: heading, line: lineNo}
			if m := docMarker.FindStringSubmatch(strings.TrimSpace(prev)); m != nil {
				b.marked = true
				if m[1] != "" {
					b.skip = m[2]
					if b.skip == "" {
						t.Errorf("%s:%d: skip marker without a reason", path, lineNo-1)
					}
				} else {
					b.run = true
				}
			}
			if lang != "sh" && lang != "bash" && lang != "shell" {
				if b.marked {
					t.Errorf("%s:%d: doc-test marker on a %q block; only sh/bash blocks can run", path, lineNo, lang)
				}
				b.file = "" // read past the body, then drop it
			}
			cur = b
		}
		if trimmed != "" {
			prev = line
		}
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	var shell []docBlock
	for _, b := range out {
		if b.file != "" {
			shell = append(shell, b)
		}
	}
	return shell
}

// docFiles returns README.md and docs/*.md of the repository.
func docFiles(t *testing.T, repo string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repo, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(repo, "README.md")); err == nil {
		files = append([]string{filepath.Join(repo, "README.md")}, files...)
	}
	return files
}

// TestDocsRunnableBlocks runs every documentation block marked doc-test, in
// file order, from the repository root, as root, with freshly built binaries
// first on PATH and DESTDIR pointing at a scratch directory (install steps
// write there; the Makefile honours DESTDIR too). A block passes when bash
// -euo pipefail exits 0.
func TestDocsRunnableBlocks(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinaries(t, "bash", "go", "make")
	repo := criRepoRoot(t)
	scratch := t.TempDir()
	testutil.NoLeaks(t, scratch)
	// A failed block may leave what it started behind (a daemon of the
	// smoke test, an attached image): remove it so the next run starts clean.
	t.Cleanup(func() {
		if t.Failed() {
			criKillProcessesUnder(t, scratch)
			criUnmountUnder(t, scratch)
			criDetachUnder(t, scratch)
		}
	})

	var blocks []docBlock
	for _, f := range docFiles(t, repo) {
		bs := docBlocks(t, f)
		for _, b := range bs {
			rel, _ := filepath.Rel(repo, b.file)
			switch {
			case b.marked:
			case rel != "README.md":
				t.Errorf("%s:%d: shell block under %q has no doc-test marker", rel, b.line, b.heading)
			case strings.Contains(strings.ToLower(b.heading), "quickstart"):
				t.Errorf("README.md:%d: quickstart block under %q has no doc-test marker", b.line, b.heading)
			default:
				t.Logf("README.md:%d: unmarked shell block under %q is not run", b.line, b.heading)
			}
		}
		blocks = append(blocks, bs...)
	}
	if t.Failed() {
		return
	}

	bin := filepath.Join(scratch, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"loop-snapshotter", "oci-loop-hook", "loopctl"} {
		if _, err := os.Stat(filepath.Join(repo, "cmd", cmd)); err == nil {
			criGoBuild(t, repo, "cmd/"+cmd, bin)
		}
	}
	destdir := filepath.Join(scratch, "destdir")
	env := append(os.Environ(),
		"PATH="+bin+":"+os.Getenv("PATH"),
		"DESTDIR="+destdir,
		"TMPDIR="+scratch,
	)
	ran := 0
	for _, b := range blocks {
		rel, _ := filepath.Rel(repo, b.file)
		name := rel + ":" + strconv.Itoa(b.line)
		switch {
		case b.skip != "":
			t.Logf("%s (%s): skipped: %s", name, b.heading, b.skip)
			continue
		case !b.run:
			continue
		}
		ran++
		t.Run(strings.ReplaceAll(name, "/", "_"), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", b.code)
			cmd.Dir = repo
			cmd.Env = env
			// The block runs in its own process group: whatever it leaves
			// running (a daemon started with &) is found and killed by
			// group, and cannot keep the output pipe, and so the test, open.
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
			cmd.WaitDelay = 10 * time.Second
			out, err := cmd.CombinedOutput()
			if cmd.Process != nil && syscall.Kill(-cmd.Process.Pid, 0) == nil {
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				t.Errorf("block under %q left processes running (killed)", b.heading)
			}
			if err != nil {
				t.Fatalf("block under %q failed: %v\n--- block ---\n%s--- output ---\n%s", b.heading, err, b.code, out)
			}
			t.Logf("ok:\n%s", out)
		})
	}
	t.Logf("%d documentation blocks run", ran)
}

// TestTroubleshootingMessagesExist keeps docs/troubleshooting.md honest:
// every message quoted in the first column of a "Message" table must still
// be produced by loopkit's code. Quoted messages are split at <placeholders>
// and at ": " (where errors are wrapped); each literal piece must occur in a
// non-test Go file under cmd/, pkg/ or internal/. Rows marked "*from ...*"
// quote another program and are not checked.
func TestTroubleshootingMessagesExist(t *testing.T) {
	repo := criRepoRoot(t)
	var corpus strings.Builder
	for _, top := range []string{"cmd", "pkg", "internal"} {
		err := filepath.WalkDir(filepath.Join(repo, top), func(p string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
				return nil
			}
			b, err := os.ReadFile(p)
			corpus.Write(b)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	src := corpus.String()
	doc, err := os.ReadFile(filepath.Join(repo, "docs", "troubleshooting.md"))
	if err != nil {
		t.Fatal(err)
	}
	quoted := regexp.MustCompile("`([^`]+)`")
	placeholder := regexp.MustCompile(`<[^<>]+>`)
	inMessageTable := false
	checked := 0
	for i, line := range strings.Split(string(doc), "\n") {
		if !strings.HasPrefix(line, "|") {
			inMessageTable = false
			continue
		}
		cells := strings.Split(line, "|")
		first := strings.TrimSpace(cells[1])
		switch {
		case first == "Message":
			inMessageTable = true
			continue
		case !inMessageTable, strings.HasPrefix(first, "---"), strings.Contains(first, "*from "):
			continue
		}
		for _, m := range quoted.FindAllStringSubmatch(first, -1) {
			for _, part := range placeholder.Split(m[1], -1) {
				for _, piece := range strings.Split(part, ": ") {
					piece = strings.Trim(piece, "\" ,:")
					if piece == "" {
						continue
					}
					checked++
					if !strings.Contains(src, piece) {
						t.Errorf("troubleshooting.md:%d: %q (from %q) is not in the source any more", i+1, piece, m[1])
					}
				}
			}
		}
	}
	if checked < 50 {
		t.Errorf("only %d message pieces checked; did the table format change?", checked)
	}
	t.Logf("%d message pieces found in the source", checked)
}

// TestDocBlocksParser pins the marker rules on a small document.
func TestDocBlocksParser(t *testing.T) {
	md := "# Top\n\n<!-- doc-test -->\n```sh\necho run\n```\n```sh\necho unmarked\n```\n" +
		"## Second\n<!--doc-test: skip needs a registry-->\n```bash\necho skipped\n```\n\n" +
		"<!-- doc-test -->\n\n````sh\necho four\n```\n````\n```toml\nx = 1\n```\n"
	p := filepath.Join(t.TempDir(), "doc.md")
	if err := os.WriteFile(p, []byte(md), 0o644); err != nil {
		t.Fatal(err)
	}
	got := docBlocks(t, p)
	type want struct {
		heading, code, skip string
		run, marked         bool
	}
	exp := []want{
		{"Top", "echo run\n", "", true, true},
		{"Top", "echo unmarked\n", "", false, false},
		{"Second", "echo skipped\n", "needs a registry", false, true},
		{"Second", "echo four\n```\n", "", true, true},
	}
	if len(got) != len(exp) {
		t.Fatalf("got %d blocks, want %d: %+v", len(got), len(exp), got)
	}
	for i, e := range exp {
		g := got[i]
		if g.heading != e.heading || g.code != e.code || g.skip != e.skip || g.run != e.run || g.marked != e.marked {
			t.Errorf("block %d: got %+v, want %+v", i, g, e)
		}
	}
}

// TestDocsReferencedFilesExist fails when README.md or docs/*.md name a
// contrib/, scripts/ or docs/ file (or glob) that the repository does not
// have, so documentation cannot point at files that were renamed or never
// written.
func TestDocsReferencedFilesExist(t *testing.T) {
	repo := criRepoRoot(t)
	ref := regexp.MustCompile(`\b(?:contrib|scripts|docs)/[A-Za-z0-9._*/-]*[A-Za-z0-9*/]`)
	checked := 0
	for _, f := range docFiles(t, repo) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(repo, f)
		for i, line := range strings.Split(string(b), "\n") {
			for _, m := range ref.FindAllString(line, -1) {
				m = strings.TrimSuffix(m, "/")
				// docs/ links are relative to docs/ inside docs/*.md.
				base := repo
				if strings.HasPrefix(rel, "docs/") && !strings.HasPrefix(m, "docs/") && !strings.HasPrefix(m, "contrib/") && !strings.HasPrefix(m, "scripts/") {
					base = filepath.Join(repo, "docs")
				}
				matches, err := filepath.Glob(filepath.Join(base, m))
				checked++
				if err != nil || len(matches) == 0 {
					t.Errorf("%s:%d: %s does not exist", rel, i+1, m)
				}
			}
		}
	}
	t.Logf("%d references checked", checked)
}
