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
// per container. Every operation is relative to the directory fd, so a path
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

// Lock is a held per-container lock.
type Lock struct{ f *os.File }

// Unlock releases the lock. The lock file stays: removing it would race with
// waiters that already opened it.
func (l *Lock) Unlock() error { return l.f.Close() }

func (s *Store) openLock(name string) (*os.File, error) {
	fd, err := unix.Openat(s.dirfd, name+".lock", unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock %s/%s.lock: %w", s.dir, name, err)
	}
	return os.NewFile(uintptr(fd), name+".lock"), nil
}

// Lock takes the per-container lock, polling until ctx is done.
func (s *Store) Lock(ctx context.Context, name string) (*Lock, error) {
	f, err := s.openLock(name)
	if err != nil {
		return nil, err
	}
	delay := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return &Lock{f: f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s/%s.lock: %w", s.dir, name, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s/%s.lock: %w", s.dir, name, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 50*time.Millisecond)
	}
}

// TryLock takes the per-container lock without waiting; ok is false when
// somebody else holds it.
func (s *Store) TryLock(name string) (l *Lock, ok bool, err error) {
	f, err := s.openLock(name)
	if err != nil {
		return nil, false, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("lock %s/%s.lock: %w", s.dir, name, err)
	}
	return &Lock{f: f}, true, nil
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
func (s *Store) Names() ([]string, error) {
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
		if n, ok := strings.CutSuffix(e, ".json"); ok && !strings.HasPrefix(e, ".") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names, nil
}
