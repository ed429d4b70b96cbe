package cachevol

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// errBusy means another build (in this or another process) holds the volume.
var errBusy = errors.New("volume busy")

// Locking has two layers. slots serialize goroutines of one Manager and let
// waiters honour ctx; an open-file-description (OFD) lock on <vol>/lock
// excludes other processes (and other Managers) on the same data dir. OFD
// locks rather than flock because F_OFD_GETLK can tell List whether a
// volume is attached without briefly taking the lock and making a
// concurrent TryAcquire fail.

type slot struct {
	ch   chan struct{}
	refs int
}

func (m *Manager) takeSlot(ctx context.Context, id string, wait bool) (release func(), err error) {
	m.mu.Lock()
	s := m.slots[id]
	if s == nil {
		s = &slot{ch: make(chan struct{}, 1)}
		m.slots[id] = s
	}
	s.refs++
	m.mu.Unlock()
	drop := func() {
		m.mu.Lock()
		if s.refs--; s.refs == 0 {
			delete(m.slots, id)
		}
		m.mu.Unlock()
	}
	if wait {
		select {
		case s.ch <- struct{}{}:
		case <-ctx.Done():
			drop()
			return nil, ctx.Err()
		}
	} else {
		select {
		case s.ch <- struct{}{}:
		default:
			drop()
			return nil, errBusy
		}
	}
	return func() { <-s.ch; drop() }, nil
}

func (m *Manager) slotHeld(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.slots[id]
	return s != nil && len(s.ch) == 1
}

// lockDir takes the OFD lock of dir/lock. With create it makes dir first;
// without, a missing dir yields os.ErrNotExist. Whoever deletes a volume
// removes the lock file while holding it, so after locking we check that
// the file is still the one at the path; otherwise we locked a corpse and
// retry.
func lockDir(ctx context.Context, dir string, create, wait bool) (*os.File, error) {
	lockPath := filepath.Join(dir, lockName)
	backoff := 10 * time.Millisecond
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if create {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return nil, err
			}
		}
		f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) && create {
				continue // dir removed by a concurrent delete; make it again
			}
			return nil, err
		}
		ok, err := setOFDLock(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", lockPath, err)
		}
		if !ok {
			f.Close()
			if !wait {
				return nil, errBusy
			}
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			backoff = min(backoff*2, 500*time.Millisecond)
			continue
		}
		held, err1 := f.Stat()
		cur, err2 := os.Stat(lockPath)
		if err1 == nil && err2 == nil && os.SameFile(held, cur) {
			return f, nil
		}
		f.Close()
		if err2 != nil && !create {
			return nil, os.ErrNotExist
		}
	}
}

func setOFDLock(f *os.File) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart}
	err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
		return false, nil
	}
	return err == nil, err
}

// lockedElsewhere reports whether another open file description holds the
// lock of dir, without taking it.
func lockedElsewhere(dir string) bool {
	f, err := os.Open(filepath.Join(dir, lockName))
	if err != nil {
		return false
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return false
	}
	return lk.Type != unix.F_UNLCK
}

// scopeLock is both layers held for one scope volume.
type scopeLock struct {
	file    *os.File
	release func()
}

func (l *scopeLock) unlock() {
	l.file.Close()
	l.release()
}

func (m *Manager) lockScope(ctx context.Context, id string, create, wait bool) (*scopeLock, error) {
	release, err := m.takeSlot(ctx, id, wait)
	if err != nil {
		return nil, err
	}
	f, err := lockDir(ctx, m.volDir(id), create, wait)
	if err != nil {
		release()
		return nil, err
	}
	return &scopeLock{file: f, release: release}, nil
}
