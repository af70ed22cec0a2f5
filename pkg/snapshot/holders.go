package snapshot

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// holder is a process whose mount namespace has the device mounted, or
// that has the device open.
type holder struct {
	pid     int
	comm    string // the process's name
	mountNS string // "mnt:[4026531841]"
	where   string // mount point in that namespace, or "open fd"
}

func (h holder) String() string {
	return fmt.Sprintf("pid %d %s (%s) at %s", h.pid, h.comm, h.mountNS, h.where)
}

// maxHolders bounds how many holders an error names.
const maxHolders = 3

// findHolders scans /proc for mount namespaces that have a filesystem
// mounted from devnum (one process per namespace) and, with openers, for
// processes holding the device open. Only failure paths call it: it reads
// every process's mountinfo.
func findHolders(devnum loopdev.Devnum, devPath string, openers bool) []holder {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	seen := map[string]bool{}
	var out []holder
	major, minor := int(devnum.Major()), int(devnum.Minor())
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(p))
		if err != nil {
			continue
		}
		ns, err := os.Readlink(p + "/ns/mnt")
		if err != nil {
			continue
		}
		if !seen[ns] {
			seen[ns] = true
			if f, err := os.Open(p + "/mountinfo"); err == nil {
				mounts, _ := mountinfo.GetMountsFromReader(f, func(i *mountinfo.Info) (bool, bool) {
					return i.Major != major || i.Minor != minor, false
				})
				f.Close()
				if len(mounts) > 0 {
					out = append(out, holder{pid: pid, comm: comm(p), mountNS: ns, where: mounts[0].Mountpoint})
				}
			}
		}
		if openers && devPath != "" {
			fds, _ := os.ReadDir(p + "/fd")
			for _, fd := range fds {
				if t, err := os.Readlink(p + "/fd/" + fd.Name()); err == nil && t == devPath {
					out = append(out, holder{pid: pid, comm: comm(p), mountNS: ns, where: "open fd " + fd.Name()})
					break
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pid < out[j].pid })
	return out
}

func comm(procDir string) string {
	b, _ := os.ReadFile(procDir + "/comm")
	return strings.TrimSpace(string(b))
}

// describeHolders renders at most maxHolders holders for an error message.
func describeHolders(hs []holder) string {
	if len(hs) == 0 {
		return "holder not found in /proc"
	}
	parts := make([]string, 0, maxHolders)
	for i, h := range hs {
		if i == maxHolders {
			parts = append(parts, fmt.Sprintf("%d more", len(hs)-maxHolders))
			break
		}
		parts = append(parts, h.String())
	}
	return "held by " + strings.Join(parts, ", ")
}
