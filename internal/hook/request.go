package hook

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/hookpolicy"
)

// MaxAnnotationValue caps every annotation value the hook reads.
const MaxAnnotationValue = 4096

// maxDestLen caps a destination or image path: PATH_MAX (4096) counts the
// terminating NUL, so a 4096-byte path already fails with ENAMETOOLONG.
const maxDestLen = unix.PathMax - 1

// Request is one mount asked for by an annotation or a --mount argument.
// Nothing in it is trusted until policy turns it into a Plan.
type Request struct {
	Image  string // catalog name, or an absolute path (raw path mode)
	Dest   string // absolute container path
	RW     bool
	Noexec bool
	Source string // "annotation" or "argument", for messages
}

// Annotation key suffixes under the configured prefix.
const (
	keyImage   = "image"
	keyDest    = "dest"
	keyRW      = "rw"
	keyOptions = "options"
	keyMounts  = "mounts"
)

// ParseAnnotations extracts the requests carried by annotations under prefix:
// either the single-mount keys (image, dest, rw, options) or the JSON list
// under "mounts", never both. Unknown keys under the prefix, oversized
// values, partial requests and more than maxMounts entries are errors
// matching ErrInvalid. No key under the prefix yields no request.
func ParseAnnotations(untrusted map[string]string, prefix string, maxMounts int) ([]Request, error) {
	var keys = map[string]string{}
	for k, v := range untrusted {
		if !strings.HasPrefix(k, prefix) {
			continue
		}
		suffix := strings.TrimPrefix(k, prefix)
		switch suffix {
		case keyImage, keyDest, keyRW, keyOptions, keyMounts:
		default:
			return nil, invalidf("annotation %q: unknown key under prefix %q", truncate(k, 128), prefix)
		}
		if len(v) > MaxAnnotationValue {
			return nil, invalidf("annotation %s: value longer than %d bytes", k, MaxAnnotationValue)
		}
		keys[suffix] = v
	}
	if len(keys) == 0 {
		return nil, nil
	}
	if list, ok := keys[keyMounts]; ok {
		if len(keys) > 1 {
			return nil, invalidf("annotations %s%s and %s%s (or %s/%s) are mutually exclusive", prefix, keyMounts, prefix, keyImage, keyRW, keyOptions)
		}
		return parseMountList(prefix+keyMounts, list, maxMounts)
	}
	image, hasImage := keys[keyImage]
	dest, hasDest := keys[keyDest]
	if !hasImage || !hasDest {
		return nil, invalidf("annotations %s%s and %s%s must be given together", prefix, keyImage, prefix, keyDest)
	}
	r := Request{Image: image, Dest: dest, Source: "annotation"}
	if v, ok := keys[keyRW]; ok {
		switch v {
		case "true":
			r.RW = true
		case "false":
		default:
			return nil, invalidf("annotation %s%s: value %q is neither true nor false", prefix, keyRW, truncate(v, 32))
		}
	}
	if v, ok := keys[keyOptions]; ok {
		for _, o := range strings.Split(v, ",") {
			switch o {
			case "noexec":
				r.Noexec = true
			case "":
			default:
				return nil, invalidf("annotation %s%s: unknown option %q", prefix, keyOptions, truncate(o, 32))
			}
		}
	}
	if err := checkRequestSyntax(r); err != nil {
		return nil, err
	}
	return []Request{r}, nil
}

func parseMountList(key, untrusted string, maxMounts int) ([]Request, error) {
	data := []byte(untrusted)
	if err := checkJSON(data); err != nil {
		return nil, invalidf("annotation %s: %v", key, err)
	}
	var items []json.RawMessage
	if err := json.Unmarshal(data, &items); err != nil {
		return nil, invalidf("annotation %s: %v", key, describeJSONError(err))
	}
	if len(items) == 0 {
		return nil, invalidf("annotation %s: empty list", key)
	}
	if len(items) > maxMounts {
		return nil, refusedf("annotation %s: %d mounts requested, max_mounts is %d", key, len(items), maxMounts)
	}
	reqs := make([]Request, 0, len(items))
	for i, item := range items {
		r := Request{Source: "annotation"}
		err := decodeFields(item, map[string]any{
			"image": &r.Image, "dest": &r.Dest, "rw": &r.RW, "noexec": &r.Noexec,
		}, false)
		if err != nil {
			return nil, invalidf("annotation %s[%d]: %v", key, i, err)
		}
		if r.Image == "" || r.Dest == "" {
			return nil, invalidf("annotation %s[%d]: image and dest are required", key, i)
		}
		if err := checkRequestSyntax(r); err != nil {
			return nil, err
		}
		reqs = append(reqs, r)
	}
	return reqs, nil
}

// ParseMountArg parses an admin-given --mount value:
// image=NAME,dest=/path[,rw][,noexec].
func ParseMountArg(spec string) (Request, error) {
	r := Request{Source: "argument"}
	if len(spec) > MaxAnnotationValue {
		return r, invalidf("--mount: value longer than %d bytes", MaxAnnotationValue)
	}
	seen := map[string]bool{}
	for _, part := range strings.Split(spec, ",") {
		k, v, hasValue := strings.Cut(part, "=")
		if seen[k] {
			return r, invalidf("--mount %q: %s given twice", truncate(spec, 128), k)
		}
		seen[k] = true
		switch {
		case k == "image" && hasValue:
			r.Image = v
		case k == "dest" && hasValue:
			r.Dest = v
		case k == "rw" && !hasValue:
			r.RW = true
		case k == "noexec" && !hasValue:
			r.Noexec = true
		default:
			return r, invalidf("--mount %q: unknown or malformed field %q", truncate(spec, 128), truncate(part, 64))
		}
	}
	if r.Image == "" || r.Dest == "" {
		return r, invalidf("--mount %q: image= and dest= are required", truncate(spec, 128))
	}
	return r, checkRequestSyntax(r)
}

// checkRequestSyntax checks what needs no policy: the image is a catalog
// name or an absolute path, the destination is absolute, bounded, NUL-free.
func checkRequestSyntax(r Request) error {
	if !strings.HasPrefix(r.Image, "/") && strings.Contains(r.Image, "/") {
		return refusedf("image %q: relative image paths are never allowed", truncate(r.Image, 128))
	}
	if strings.HasPrefix(r.Image, "/") {
		if len(r.Image) > maxDestLen || strings.ContainsRune(r.Image, 0) {
			return invalidf("image path %q is not a valid path", truncate(r.Image, 128))
		}
	} else if !hookpolicy.IsCatalogName(r.Image) {
		return invalidf("image %q is not a valid catalog name", truncate(r.Image, 64))
	}
	if len(r.Dest) > maxDestLen {
		return invalidf("destination longer than %d bytes (PATH_MAX)", maxDestLen)
	}
	if strings.ContainsRune(r.Dest, 0) {
		return invalidf("destination %q contains a NUL byte", truncate(r.Dest, 128))
	}
	if !filepath.IsAbs(r.Dest) {
		return invalidf("destination %q is not an absolute path", truncate(r.Dest, 128))
	}
	return nil
}

func (r Request) String() string {
	return fmt.Sprintf("%s -> %s", r.Image, r.Dest)
}
