package hook

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Store is the state directory: one <name>.json record and one <name>.lock
// per container with mounts (the lock file goes with the record). Every operation is relative to the directory fd, so a path
// swapped after the checks does not redirect writes.
type Store struct {
	dir   string
	dirfd int
}

// OpenStore opens (creating it 0700 if missing) the state directory. A
// symlink, a non-directory, a non-root owner or group/world write access is
// refused (ErrInvalid): whoever controls the directory controls what
// teardown detaches.
func OpenStore(dir string) (*Store, error) {
	if err := unix.Mkdir(dir, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, invalidf("state directory %s: create: %s", dir, errnoText(err))
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return nil, invalidf("state directory %s: is a symlink or not a directory", dir)
		}
		return nil, invalidf("state directory %s: open: %s", dir, errnoText(err))
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("state directory %s: fstat: %w", dir, err)
	}
	if st.Uid != 0 || st.Mode&0o022 != 0 {
		unix.Close(fd)
		return nil, invalidf("state directory %s: must be owned by root and not group- or world-writable", dir)
	}
	return &Store{dir: dir, dirfd: fd}, nil
}

// Close releases the directory fd.
func (s *Store) Close() error { return unix.Close(s.dirfd) }

// Dir is the state directory path.
func (s *Store) Dir() string { return s.dir }

// Lock is a held per-container lock on <name>.lock.
type Lock struct {
	s    *Store
	name string
	f    *os.File
}

// Unlock releases the lock. When no record of the container remains, the
// lock file is unlinked first, while still held: a waiter that opened the
// old file then finds it is no longer the one linked at the path and starts
// over (see lockFile), so one lock file per container ever run does not
// pile up.
func (l *Lock) Unlock() error {
	var err error
	if !l.s.hasRecord(l.name) {
		if uerr := unix.Unlinkat(l.s.dirfd, l.name+".lock", 0); uerr != nil && !errors.Is(uerr, unix.ENOENT) {
			err = fmt.Errorf("remove lock %s/%s.lock: %w", l.s.dir, l.name, uerr)
		}
	}
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (s *Store) hasRecord(name string) bool {
	var st unix.Stat_t
	return unix.Fstatat(s.dirfd, name+".json", &st, unix.AT_SYMLINK_NOFOLLOW) == nil
}

func (s *Store) openLock(name string) (*os.File, error) {
	fd, err := unix.Openat(s.dirfd, name+".lock", unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock %s/%s.lock: %s", s.dir, name, errnoText(err))
	}
	return os.NewFile(uintptr(fd), name+".lock"), nil
}

// stillLinked reports whether the locked file f is the one at <name>.lock:
// the previous holder may have unlinked it while we waited.
func (s *Store) stillLinked(f *os.File, name string) (bool, error) {
	var held, linked unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &held); err != nil {
		return false, fmt.Errorf("fstat lock %s/%s.lock: %w", s.dir, name, err)
	}
	if err := unix.Fstatat(s.dirfd, name+".lock", &linked, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("stat lock %s/%s.lock: %w", s.dir, name, err)
	}
	return held.Dev == linked.Dev && held.Ino == linked.Ino, nil
}

// lockFile takes the per-container lock; with wait false it returns
// ok false at once when somebody else holds it, else it polls until ctx is
// done.
func (s *Store) lockFile(ctx context.Context, name string, wait bool) (l *Lock, ok bool, err error) {
	delay := time.Millisecond
	for {
		f, err := s.openLock(name)
		if err != nil {
			return nil, false, err
		}
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			linked, lerr := s.stillLinked(f, name)
			if lerr != nil {
				f.Close()
				return nil, false, lerr
			}
			if linked {
				return &Lock{s: s, name: name, f: f}, true, nil
			}
			f.Close()
			continue // unlinked by its last holder: lock the new file
		}
		f.Close()
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return nil, false, fmt.Errorf("lock %s/%s.lock: %w", s.dir, name, err)
		}
		if !wait {
			return nil, false, nil
		}
		select {
		case <-ctx.Done():
			return nil, false, fmt.Errorf("lock %s/%s.lock: %w", s.dir, name, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 50*time.Millisecond)
	}
}

// Lock takes the per-container lock, polling until ctx is done.
func (s *Store) Lock(ctx context.Context, name string) (*Lock, error) {
	l, _, err := s.lockFile(ctx, name, true)
	return l, err
}

// TryLock takes the per-container lock without waiting; ok is false when
// somebody else holds it.
func (s *Store) TryLock(name string) (l *Lock, ok bool, err error) {
	return s.lockFile(context.Background(), name, false)
}

// Read returns the record of name, or nil when there is none. A record that
// cannot be read or parsed is an ErrInvalid error and is left in place.
func (s *Store) Read(name string) (*Record, error) {
	fd, err := unix.Openat(s.dirfd, name+".json", unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, invalidf("state file %s/%s.json: open: %s", s.dir, name, errnoText(err))
	}
	f := os.NewFile(uintptr(fd), name+".json")
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, invalidf("state file %s/%s.json: not a regular file", s.dir, name)
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxRecordSize+1))
	if err != nil {
		return nil, invalidf("state file %s/%s.json: read: %w", s.dir, name, err)
	}
	rec, err := ParseRecord(data)
	if err != nil {
		return nil, invalidf("state file %s/%s.json: corrupt: %v", s.dir, name, err)
	}
	return rec, nil
}

// Write replaces the record of name atomically: temp file in the same
// directory, fsync, rename, fsync of the directory.
func (s *Store) Write(name string, rec *Record) error {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode record: %w", err)
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := ".tmp-" + name + "-" + hex.EncodeToString(rnd[:])
	if len(tmp) > 250 {
		tmp = ".tmp-" + hex.EncodeToString(rnd[:])
	}
	fd, err := unix.Openat(s.dirfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("write state %s/%s.json: %w", s.dir, name, err)
	}
	f := os.NewFile(uintptr(fd), tmp)
	_, werr := f.Write(append(data, '\n'))
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = unix.Renameat(s.dirfd, tmp, s.dirfd, name+".json")
	}
	if werr != nil {
		_ = unix.Unlinkat(s.dirfd, tmp, 0)
		return fmt.Errorf("write state %s/%s.json: %w", s.dir, name, werr)
	}
	s.syncDir()
	return nil
}

// Remove deletes the record of name; a missing record is fine.
func (s *Store) Remove(name string) error {
	if err := unix.Unlinkat(s.dirfd, name+".json", 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove state %s/%s.json: %w", s.dir, name, err)
	}
	s.syncDir()
	return nil
}

func (s *Store) syncDir() {
	fd, err := unix.Openat(s.dirfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err == nil {
		_ = unix.Fsync(fd)
		unix.Close(fd)
	}
}

// Names lists the names that have a record, sorted.
func (s *Store) Names() ([]string, error) { return s.list(".json") }

// LockNames lists the names that have a lock file, sorted.
func (s *Store) LockNames() ([]string, error) { return s.list(".lock") }

func (s *Store) list(suffix string) ([]string, error) {
	fd, err := unix.Openat(s.dirfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", s.dir, err)
	}
	d := os.NewFile(uintptr(fd), s.dir)
	defer d.Close()
	entries, err := d.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", s.dir, err)
	}
	var names []string
	for _, e := range entries {
		if n, ok := strings.CutSuffix(e, suffix); ok && !strings.HasPrefix(e, ".") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names, nil
}
