// Package mountinfo parses /proc/self/mountinfo. It is hand-written rather
// than moby/sys/mountinfo because the loopdev module stays stdlib +
// golang.org/x/sys only, so that importers (containerd among them) pull in
// nothing; it reads only the fields loopdev needs.
package mountinfo

import (
	"bufio"
	"io"
	"os"
	"strings"
)

// Mount is one line of mountinfo (proc(5)).
type Mount struct {
	Devnum     string // "major:minor" of the mounted device (field 3)
	MountPoint string // field 5, unescaped
	FSType     string // first field after the "-" separator
	Source     string // second field after the separator, unescaped
}

// Parse reads mountinfo lines; malformed lines are skipped.
func Parse(r io.Reader) ([]Mount, error) {
	var out []Mount
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) < 10 {
			continue
		}
		m := Mount{Devnum: f[2], MountPoint: Unescape(f[4])}
		// Optional fields (shared:N, master:N...) come before the "-".
		for i := 6; i+2 < len(f); i++ {
			if f[i] == "-" {
				m.FSType, m.Source = f[i+1], Unescape(f[i+2])
				break
			}
		}
		out = append(out, m)
	}
	return out, s.Err()
}

// Self parses /proc/self/mountinfo.
func Self() ([]Mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return Parse(f)
}

// Unescape undoes the kernel's octal escapes of space, tab, newline and
// backslash (\040, \011, \012, \134) in mountinfo paths.
func Unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
