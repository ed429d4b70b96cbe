package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
)

// State is where a digest stands in the store.
type State string

// States a digest can be in.
const (
	StatePending    State = "pending"    // not converted, nothing running
	StateConverting State = "converting" // a conversion is running
	StateReady      State = "ready"      // converted; Ensure returns at once
	StateFailed     State = "failed"     // the last conversion failed; Ensure retries
)

// ErrRemoved is returned to Ensure callers whose conversion Remove stopped.
var ErrRemoved = errors.New("image removed while it was being converted")

// Store holds converted root filesystems below <dir>/by-digest/<digest>/
// and converts each digest at most once at a time. One Store must own a
// directory; two processes sharing one would each sweep the other's work.
type Store struct {
	dir string
	src Source
	opt Options

	conversions atomic.Int64

	mu       sync.Mutex
	inflight map[string]*conversion
	failed   map[string]string
	closed   bool
}

// conversion is one running Convert that any number of Ensure calls wait on.
type conversion struct {
	done    chan struct{}
	cancel  context.CancelFunc
	waiters int
	// stopped is set once the conversion was canceled (all waiters left,
	// Remove or Close); new callers wait for it to end and start afresh.
	stopped bool
	removed bool
	art     Artifact
	err     error
}

// Open opens (creating if needed) a store in dir that converts images read
// from src with opt. Leftovers of conversions interrupted by a crash are
// removed.
func Open(dir string, src Source, opt Options) (*Store, error) {
	opt, err := opt.withDefaults()
	if err != nil {
		return nil, err
	}
	byDigest := filepath.Join(dir, "by-digest")
	if err := os.MkdirAll(byDigest, 0o755); err != nil {
		return nil, fmt.Errorf("open rootfs store: %w", err)
	}
	entries, err := os.ReadDir(byDigest)
	if err != nil {
		return nil, fmt.Errorf("open rootfs store: %w", err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			if err := os.RemoveAll(filepath.Join(byDigest, e.Name())); err != nil {
				return nil, fmt.Errorf("open rootfs store: remove leftover %s: %w", e.Name(), err)
			}
		}
	}
	return &Store{dir: dir, src: src, opt: opt, inflight: map[string]*conversion{}, failed: map[string]string{}}, nil
}

// Ensure returns the converted root filesystem of dgst, converting it first
// if needed. Concurrent calls for one digest share a single conversion.
// Canceling ctx abandons the wait; the conversion itself stops (and cleans
// up) once no caller waits for it any more.
func (s *Store) Ensure(ctx context.Context, dgst string) (Artifact, error) {
	if err := validDigest(dgst); err != nil {
		return Artifact{}, err
	}
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return Artifact{}, errors.New("rootfs store is closed")
		}
		c, ok := s.inflight[dgst]
		if ok && c.stopped {
			s.mu.Unlock()
			select {
			case <-c.done:
				continue
			case <-ctx.Done():
				return Artifact{}, fmt.Errorf("wait for rootfs of %s: %w", dgst, ctx.Err())
			}
		}
		if !ok {
			if art, err := readArtifact(s.path(dgst)); err == nil {
				s.mu.Unlock()
				return art, nil
			} else if !errors.Is(err, os.ErrNotExist) {
				s.mu.Unlock()
				return Artifact{}, fmt.Errorf("rootfs of %s: %w; remove the image's rootfs to convert it again", dgst, err)
			}
			c = s.start(ctx, dgst)
		}
		c.waiters++
		s.mu.Unlock()

		select {
		case <-c.done:
			return c.art, c.err
		case <-ctx.Done():
			s.mu.Lock()
			c.waiters--
			last := c.waiters == 0 && !c.stopped
			if last {
				c.stopped = true
				c.cancel()
			}
			s.mu.Unlock()
			if last {
				<-c.done // let it clean up before the caller moves on
			}
			return Artifact{}, fmt.Errorf("convert %s: %w", dgst, ctx.Err())
		}
	}
}

// start runs a conversion of dgst; s.mu must be held.
func (s *Store) start(ctx context.Context, dgst string) *conversion {
	// The conversion outlives any one caller's context (others may join),
	// but keeps its values.
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c := &conversion{done: make(chan struct{}), cancel: cancel}
	s.inflight[dgst] = c
	delete(s.failed, dgst)
	s.conversions.Add(1)
	go func() {
		defer cancel()
		res, err := Convert(cctx, s.src, dgst, s.path(dgst), s.opt)
		s.mu.Lock()
		defer s.mu.Unlock()
		delete(s.inflight, dgst)
		switch {
		case c.removed:
			c.err = fmt.Errorf("convert %s: %w", dgst, ErrRemoved)
		case err == nil:
			c.art = res.Artifact
		case cctx.Err() != nil:
			// Canceled, not broken: the digest is simply pending again.
			c.err = err
		default:
			c.err = err
			s.failed[dgst] = err.Error()
		}
		close(c.done)
	}()
	return c
}

// Status reports the state of dgst and, when it failed, why.
func (s *Store) Status(dgst string) (State, string) {
	if validDigest(dgst) != nil {
		return StatePending, ""
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.inflight[dgst]; ok {
		return StateConverting, ""
	}
	if msg, ok := s.failed[dgst]; ok {
		return StateFailed, msg
	}
	if _, err := os.Stat(filepath.Join(s.path(dgst), configName)); err == nil {
		return StateReady, ""
	}
	return StatePending, ""
}

// Get returns the artifact of dgst if it is ready, without converting.
func (s *Store) Get(dgst string) (Artifact, bool) {
	if validDigest(dgst) != nil {
		return Artifact{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	art, err := readArtifact(s.path(dgst))
	return art, err == nil
}

// Remove deletes the root filesystem of dgst, stopping a running
// conversion first. Call it once no image name refers to the digest. A VM
// that already opened the image keeps its open file.
func (s *Store) Remove(dgst string) error {
	if err := validDigest(dgst); err != nil {
		return err
	}
	s.mu.Lock()
	if c, ok := s.inflight[dgst]; ok {
		c.removed = true
		c.stopped = true
		c.cancel()
		s.mu.Unlock()
		<-c.done
		s.mu.Lock()
	}
	delete(s.failed, dgst)
	// Move it aside first so nobody sees a half-deleted directory as ready.
	trash, err := os.MkdirTemp(filepath.Join(s.dir, "by-digest"), "."+dgst+".rm-")
	if err != nil {
		s.mu.Unlock()
		return fmt.Errorf("remove rootfs of %s: %w", dgst, err)
	}
	err = os.Rename(s.path(dgst), filepath.Join(trash, "x"))
	s.mu.Unlock()
	rmErr := os.RemoveAll(trash)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove rootfs of %s: %w", dgst, err)
	}
	if rmErr != nil {
		return fmt.Errorf("remove rootfs of %s: %w", dgst, rmErr)
	}
	return nil
}

// Conversions counts the conversions this Store has started.
func (s *Store) Conversions() int64 { return s.conversions.Load() }

// Close stops running conversions, waits for them to clean up, and makes
// further Ensure calls fail.
func (s *Store) Close() error {
	s.mu.Lock()
	s.closed = true
	var running []*conversion
	for _, c := range s.inflight {
		c.stopped = true
		c.cancel()
		running = append(running, c)
	}
	s.mu.Unlock()
	for _, c := range running {
		<-c.done
	}
	return nil
}

func (s *Store) path(dgst string) string { return filepath.Join(s.dir, "by-digest", dgst) }

func validDigest(dgst string) error {
	if _, err := digest.Parse(dgst); err != nil {
		return fmt.Errorf("image digest %q is invalid (want sha256:<64 hex>): %w", dgst, err)
	}
	return nil
}
