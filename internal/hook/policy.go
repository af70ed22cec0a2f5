package hook

import (
	"path/filepath"
	"slices"
	"strings"

	"github.com/loopkit/loopkit/internal/hookpolicy"
	"github.com/loopkit/loopkit/pkg/config"
)

// Plan is a request approved by policy: which file to open beneath which
// trusted directory, how to mount it and where.
type Plan struct {
	Name      string // catalog name; empty for a raw path
	ImagePath string // absolute path of the image, for records and logs
	FSType    string // declared fstype; empty = detect from the magic (raw paths)
	RW        bool
	Noexec    bool
	Dest      string // lexically clean absolute destination
}

// MakePlans applies the policy of cfg to the requests. Errors match
// ErrRefused (policy) or ErrInvalid (malformed request).
func MakePlans(cfg *config.Hook, reqs []Request) ([]Plan, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	if !cfg.Enabled {
		return nil, refusedf("the hook is disabled by configuration (enabled = false)")
	}
	if len(reqs) > cfg.MaxMounts {
		return nil, refusedf("%d mounts requested, max_mounts is %d", len(reqs), cfg.MaxMounts)
	}
	plans := make([]Plan, 0, len(reqs))
	for _, r := range reqs {
		if err := checkRequestSyntax(r); err != nil {
			return nil, err
		}
		p, err := planImage(cfg, r)
		if err != nil {
			return nil, err
		}
		if p.Dest, err = CheckDest(cfg, r.Dest); err != nil {
			return nil, err
		}
		for _, q := range plans {
			if q.Dest == p.Dest {
				return nil, invalidf("destination %s requested twice", p.Dest)
			}
			// The inner mount would land on the rootfs under the outer one:
			// invisible, yet holding a loop device. ResolveDests checks the
			// resolved locations the same way.
			if hookpolicy.HasPathPrefix(p.Dest, q.Dest) || hookpolicy.HasPathPrefix(q.Dest, p.Dest) {
				return nil, invalidf("destinations %s and %s are nested; nested destinations are refused", q.Dest, p.Dest)
			}
			if q.ImagePath == p.ImagePath && (q.RW || p.RW) {
				return nil, refusedf("image %q requested twice with rw", r.Image)
			}
		}
		plans = append(plans, p)
	}
	return plans, nil
}

func (p Plan) displayName() string {
	if p.Name != "" {
		return p.Name
	}
	return p.ImagePath
}

func planImage(cfg *config.Hook, r Request) (Plan, error) {
	if !strings.HasPrefix(r.Image, "/") {
		img, ok := cfg.Images[r.Image]
		if !ok {
			return Plan{}, refusedf("image %q is not in the catalog", r.Image)
		}
		if !slices.Contains(cfg.AllowedFSTypes, img.FSType) {
			return Plan{}, refusedf("image %q: fstype %s is not allowed", r.Image, img.FSType)
		}
		if r.RW && !(cfg.AllowRW && img.AllowRW) {
			return Plan{}, refusedf("image %q: rw is not allowed", r.Image)
		}
		return Plan{
			Name:      r.Image,
			ImagePath: img.Path,
			FSType:    img.FSType,
			RW:        r.RW,
			Noexec:    r.Noexec || img.Noexec,
		}, nil
	}
	if len(cfg.AllowedImageDirs) == 0 {
		return Plan{}, refusedf("image %q: raw image paths are not allowed (no allowed_image_dirs)", truncate(r.Image, 128))
	}
	if filepath.Clean(r.Image) != r.Image {
		return Plan{}, refusedf("image %q: path is not clean", truncate(r.Image, 128))
	}
	if r.RW {
		return Plan{}, refusedf("image %q: rw needs a catalog entry", truncate(r.Image, 128))
	}
	for _, d := range cfg.AllowedImageDirs {
		if r.Image != d && hookpolicy.HasPathPrefix(r.Image, d) {
			return Plan{
				ImagePath: r.Image,
				Noexec:    r.Noexec,
			}, nil
		}
	}
	return Plan{}, refusedf("image %q is not beneath an allowed image directory", truncate(r.Image, 128))
}

// CheckDest checks a requested destination lexically and returns its clean
// form: absolute, not "/", /proc, /sys, /dev or below, and at or below one of
// dest_allowed_prefixes. Symlinks and ".." after symlinks are the resolver's
// job (resolveDest), never this string check's.
func CheckDest(cfg *config.Hook, untrusted string) (string, error) {
	if len(untrusted) > maxDestLen {
		return "", invalidf("destination longer than %d bytes (PATH_MAX)", maxDestLen)
	}
	if strings.ContainsRune(untrusted, 0) {
		return "", invalidf("destination %q contains a NUL byte", truncate(untrusted, 128))
	}
	if !filepath.IsAbs(untrusted) {
		return "", invalidf("destination %q is not an absolute path", truncate(untrusted, 128))
	}
	clean := filepath.Clean(untrusted)
	if hookpolicy.IsDeniedDest(clean) {
		return "", refusedf("destination %s is always denied", truncate(clean, 128))
	}
	for _, p := range cfg.DestAllowedPrefixes {
		if hookpolicy.HasPathPrefix(clean, p) {
			return clean, nil
		}
	}
	return "", refusedf("destination %s is not below an allowed prefix (%s)", truncate(clean, 128), strings.Join(cfg.DestAllowedPrefixes, ", "))
}
