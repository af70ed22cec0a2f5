package hookcli

import (
	"fmt"
	"io"

	toml "github.com/pelletier/go-toml/v2"

	"github.com/loopkit/loopkit/pkg/config"
)

// printConfigDefaults ends --help with every configuration key and its
// built-in default, and examples.
func printConfigDefaults(w io.Writer) {
	defaults, err := toml.Marshal(config.DefaultHook())
	if err != nil {
		defaults = []byte("(cannot render defaults: " + err.Error() + ")\n")
	}
	fmt.Fprintf(w, `
Examples:
  oci-loop-hook check-config
  oci-loop-hook --config /etc/oci-loop-hook/config.toml setup < state.json
  podman --hooks-dir /usr/share/containers/oci/hooks.d run \
    --annotation org.ociloop.image=dataset1 --annotation org.ociloop.dest=/data ...

Configuration file %s (root-owned, not writable by group or
others; unknown keys are errors). Without it nothing is allowed. Every key
with its built-in default (images are listed as [images.NAME] tables):

%s`, config.DefaultHookPath, defaults)
}
