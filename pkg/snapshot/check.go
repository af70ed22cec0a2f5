package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/loopkit/loopkit/internal/ext4"
)

// damagedMarker, next to an image, records why a Commit refused it: a
// retried Commit must not succeed once the cause (a failed fsync, whose
// error the kernel reports to one caller only) is no longer visible.
const damagedMarker = "damaged"

// checkFilesystem makes an unmounted ext4 image safe to read offline, or
// says why its content cannot be trusted. It replays a journal that needs
// recovery (and nothing else: e2fsck -p would also "repair" a filesystem
// that lost data, deleting what it cannot link, and exit 1 as for a replay),
// then refuses, with an error matching errdefs.ErrDataLoss, an image whose
// superblock records errors (the s_state error bit, s_error_count: the
// kernel sets them on a failed metadata write, and a replay copies the
// journal's saved error there) or that a read-only e2fsck finds
// inconsistent. A clean superblock, the common case, costs one read.
// It never writes beyond the replay. Both modes call it: flat mode on the
// image at Commit, layered mode on the upper filesystem before it is read.
func checkFilesystem(ctx context.Context, image string) (replayed bool, err error) {
	sb, err := readSuperblock(image)
	if err != nil {
		return false, err
	}
	if sb.NeedsRecovery() {
		// -E journal_only: replay, no check, no repair; exit status 1 says
		// the replay modified the filesystem.
		code, out, err := e2fsck(ctx, image, "-p", "-E", "journal_only")
		if err != nil {
			return false, fmt.Errorf("replay journal of %s: %w", image, err)
		}
		if code > 1 {
			return false, fmt.Errorf("%s: journal replay failed (e2fsck exit status %d: %s): %w", image, code, lastLine(out), errdefs.ErrDataLoss)
		}
		replayed = true
		if sb, err = readSuperblock(image); err != nil {
			return replayed, err
		}
		if sb.NeedsRecovery() {
			return replayed, fmt.Errorf("%s: journal still needs recovery after replay: %w", image, errdefs.ErrDataLoss)
		}
	}
	if sb.HasErrors() {
		what := fmt.Sprintf("%d errors", sb.ErrorCount)
		if sb.ErrorCount == 0 {
			what = "the error state"
		} else if sb.FirstErrorFunc != "" {
			what += ", first in " + sb.FirstErrorFunc
		}
		return replayed, fmt.Errorf("%s: filesystem recorded %s: %w", image, what, errdefs.ErrDataLoss)
	}
	if sb.Clean() {
		return replayed, nil
	}
	// Not marked clean: e2fsck -n checks it fully without changing it;
	// exit status 4 means it found errors it would have to correct.
	code, out, err := e2fsck(ctx, image, "-n")
	switch {
	case err != nil:
		return replayed, fmt.Errorf("e2fsck -n %s: %w", image, err)
	case code == 4:
		return replayed, fmt.Errorf("%s: e2fsck found errors it would have to correct (%s): %w", image, lastLine(out), errdefs.ErrDataLoss)
	case code != 0:
		return replayed, fmt.Errorf("e2fsck -n %s: exit status %d: %s", image, code, out)
	}
	return replayed, nil
}

// e2fsck runs e2fsck with args on image and returns its exit status and
// output; err is set only when it could not run.
func e2fsck(ctx context.Context, image string, args ...string) (int, string, error) {
	cmd := exec.CommandContext(ctx, "e2fsck", append(args, image)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) && ctx.Err() == nil {
		return exitErr.ExitCode(), strings.TrimSpace(out.String()), nil
	}
	return 0, strings.TrimSpace(out.String()), err
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if l := strings.TrimSpace(lines[i]); l != "" && !strings.HasPrefix(l, "e2fsck ") {
			return l
		}
	}
	return ""
}

// markDamaged records reason next to image (best effort: the disk may be
// the full one that caused the damage; the in-memory record covers that
// until a restart).
func markDamaged(image string, reason error) {
	p := filepath.Join(filepath.Dir(image), damagedMarker)
	if err := os.WriteFile(p, []byte(reason.Error()+"\n"), 0o600); err == nil {
		syncPath(p)
		syncDir(filepath.Dir(image))
	}
}

// damagedReason returns the recorded reason a Commit refused image, if any.
func damagedReason(image string) (string, bool) {
	b, err := os.ReadFile(filepath.Join(filepath.Dir(image), damagedMarker))
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(b)), true
}

// readSuperblock reads the image's ext4 superblock as the device last
// wrote it. A loop device with direct I/O writes around the image file's
// page cache, so clean pages cached from an earlier read can be stale:
// they are dropped first (FADV_DONTNEED drops only clean pages).
func readSuperblock(image string) (ext4.Superblock, error) {
	f, err := os.Open(image)
	if err != nil {
		return ext4.Superblock{}, err
	}
	defer f.Close()
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
	sb, err := ext4.Read(f)
	if err != nil {
		return ext4.Superblock{}, fmt.Errorf("%s: %w", image, err)
	}
	return sb, nil
}
