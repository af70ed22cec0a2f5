// Package hook implements oci-loop-hook: an OCI runtime hook that attaches
// admin-approved image files to loop devices and mounts them into a
// container at createRuntime, and releases them at poststop without ever
// touching a loop device somebody else has reused. docs/security.md says
// what it trusts and refuses, docs/operations.md how it is configured.
//
// Everything that comes from the container side (state, annotations, the
// rootfs contents) is untrusted; the root-owned configuration is policy.
package hook

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"

	"github.com/loopkit/loopkit/pkg/config"
	"github.com/loopkit/loopkit/pkg/loopdev"
)

// Hook runs the hook commands under one configuration.
type Hook struct {
	cfg     *config.Hook
	log     *logrus.Entry
	version string

	// hookForceAfterAttach, when set by tests, runs after each attach while
	// setup still holds the loop device fd.
	hookForceAfterAttach func(*loopdev.Device)
}

// New returns a Hook; version is recorded in state files.
func New(cfg *config.Hook, log *logrus.Entry, version string) *Hook {
	return &Hook{cfg: cfg, log: log, version: version}
}

// HookForceAfterAttach installs a function that runs after each attach while
// setup still holds the loop device fd. Only tests use it (through an
// ldflags-set variable in internal/hookcli), to kill or race the hook at
// that point.
func (h *Hook) HookForceAfterAttach(f func(*loopdev.Device)) { h.hookForceAfterAttach = f }

// ownerTagPrefix marks our loop devices in lo_file_name.
const ownerTagPrefix = "ociloop:"

// maxBundleConfig caps the bundle's config.json.
const maxBundleConfig = 16 << 20

// rootfsPath reads root.path from <bundle>/config.json, joined with the
// bundle when relative (not with the cwd, which the hook ignores).
func rootfsPath(bundle string) (string, error) {
	if bundle == "" || !filepath.IsAbs(bundle) {
		return "", invalidf("state: bundle %q is not an absolute path", truncate(bundle, 128))
	}
	f, err := os.Open(filepath.Join(bundle, "config.json"))
	if err != nil {
		return "", invalidf("bundle config %s/config.json: %s", bundle, errnoText(err))
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxBundleConfig+1))
	if err != nil {
		return "", fmt.Errorf("read bundle config %s/config.json: %w", bundle, err)
	}
	if len(data) > maxBundleConfig {
		return "", invalidf("bundle config larger than %d bytes", maxBundleConfig)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return "", invalidf("bundle config %s/config.json: %v", bundle, describeJSONError(err))
	}
	if spec.Root == nil || spec.Root.Path == "" {
		return "", invalidf("bundle config %s/config.json: no root.path", bundle)
	}
	p := spec.Root.Path
	if !filepath.IsAbs(p) {
		p = filepath.Join(bundle, p)
	}
	return filepath.Clean(p), nil
}

// requests collects the annotation requests and the admin's --mount ones.
func (h *Hook) requests(st *State, args []Request) ([]Request, error) {
	reqs, err := ParseAnnotations(st.Annotations, h.cfg.AnnotationPrefix, h.cfg.MaxMounts)
	if err != nil {
		return nil, err
	}
	all := append(append([]Request{}, args...), reqs...)
	if len(all) > h.cfg.MaxMounts {
		return nil, refusedf("%d mounts requested, max_mounts is %d", len(all), h.cfg.MaxMounts)
	}
	return all, nil
}

// entry returns the logger with the container's fields.
func (h *Hook) entry(st *State, step string) *logrus.Entry {
	return h.log.WithFields(logrus.Fields{"container_id": st.ID, "step": step})
}
