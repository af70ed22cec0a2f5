// Command oci-loop-hook is an OCI runtime hook that mounts admin-approved
// image files (squashfs, erofs, ext4) into containers through loop devices.
// Its command line lives in internal/hookcli, its logic in internal/hook.
package main

import (
	"os"

	"github.com/loopkit/loopkit/internal/hookcli"
)

// Set by the linker: -X main.version=... -X main.commit=...
var (
	version = "dev"
	commit  = "unknown"
)

func main() {
	os.Exit(hookcli.Main(hookcli.Build{Version: version, Commit: commit}, os.Args[1:]))
}
