package rootfs

import (
	"context"
	"encoding/json"
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
	// StateFailed: the last conversion failed. Ensure converts again,
	// unless the failure was ErrUnconvertible: that one is kept on disk,
	// Ensure returns it until Retry or Remove, and it lasts across
	// restarts.
	StateFailed State = "failed"
)

// ErrRemoved is returned to Ensure callers whose conversion Remove stopped.
var ErrRemoved = errors.New("image removed while it was being converted")

// Store holds converted root filesystems below <dir>/by-digest/<digest>/
// and converts each digest at most once at a time. One Store must own a
// directory; two processes sharing one would each sweep the other's work.
//
// A digest whose conversion failed with ErrUnconvertible gets, instead of
// an artifact, a directory holding only the file "failed", so restarts do
// not convert it again and again.
type Store struct {
	dir string
	src Source
	opt Options

	conversions atomic.Int64

	mu       sync.Mutex
	inflight map[string]*conversion
	failed   map[string]failure
	closed   bool
}

// failure is the last failed conversion of a digest.
type failure struct {
	err error
	// permanent failures are ErrUnconvertible: Ensure returns them
	// rather than converting again.
	permanent bool
}

// failedName is the file recording an ErrUnconvertible failure, in the
// digest's directory where the artifact would be.
const failedName = "failed"

// failedVersion is the format of failedName. A record in another format,
// or for another platform, is ignored: the digest converts again.
const failedVersion = 1

type failedRecord struct {
	Version  int    `json:"version"`
	Platform string `json:"platform"`
	Error    string `json:"error"`
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
	return &Store{dir: dir, src: src, opt: opt, inflight: map[string]*conversion{}, failed: map[string]failure{}}, nil
}

// Ensure returns the converted root filesystem of dgst, converting it first
// if needed. Concurrent calls for one digest share a single conversion.
// Canceling ctx abandons the wait; the conversion itself stops (and cleans
// up) once no caller waits for it any more. A digest whose conversion
// failed with ErrUnconvertible, in this process or an earlier one, is not
// converted again: Ensure returns that failure until Retry or Remove.
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
			if f, ok := s.permanentFailure(dgst); ok {
				s.mu.Unlock()
				return Artifact{}, f
			}
			// No artifact and no failure that holds: whatever is left
			// in the digest's directory (a record for another platform
			// or format) goes, as Convert needs the path free.
			if err := os.RemoveAll(s.path(dgst)); err != nil {
				s.mu.Unlock()
				return Artifact{}, fmt.Errorf("convert %s: clear its directory: %w", dgst, err)
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
		case errors.Is(err, ErrUnconvertible):
			c.err = err
			s.failed[dgst] = failure{err: err, permanent: true}
			// Should recording it fail, the failure still holds in this
			// process, and the next one tries the digest once more.
			_ = s.recordFailure(dgst, err)
		default:
			c.err = err
			s.failed[dgst] = failure{err: err}
		}
		close(c.done)
	}()
	return c
}

// permanentFailure returns the ErrUnconvertible failure of dgst, from
// memory or from its record on disk; s.mu must be held.
func (s *Store) permanentFailure(dgst string) (error, bool) {
	if f, ok := s.failed[dgst]; ok {
		return f.err, f.permanent
	}
	b, err := os.ReadFile(filepath.Join(s.path(dgst), failedName))
	if err != nil {
		return nil, false
	}
	var rec failedRecord
	if json.Unmarshal(b, &rec) != nil || rec.Version != failedVersion || rec.Platform != s.opt.Platform || rec.Error == "" {
		return nil, false
	}
	f := unconvertible(errors.New(rec.Error))
	s.failed[dgst] = failure{err: f, permanent: true}
	return f, true
}

// recordFailure publishes the directory of dgst holding only the record of
// its ErrUnconvertible failure; s.mu must be held. Like an artifact, it
// is built aside and renamed into place, so it appears whole or not at
// all.
func (s *Store) recordFailure(dgst string, ferr error) error {
	b, err := json.Marshal(failedRecord{Version: failedVersion, Platform: s.opt.Platform, Error: ferr.Error()})
	if err != nil {
		return err
	}
	byDigest := filepath.Join(s.dir, "by-digest")
	tmp, err := os.MkdirTemp(byDigest, "."+dgst+".failed-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, failedName), append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := syncPath(filepath.Join(tmp, failedName)); err != nil {
		return err
	}
	if err := syncPath(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, s.path(dgst)); err != nil {
		return err
	}
	return syncPath(byDigest)
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
	if f, ok := s.failed[dgst]; ok {
		return StateFailed, f.err.Error()
	}
	if _, err := os.Stat(filepath.Join(s.path(dgst), configName)); err == nil {
		return StateReady, ""
	}
	if f, ok := s.permanentFailure(dgst); ok {
		return StateFailed, f.Error()
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
// conversion first, and forgets a failed conversion of it. Call it once no
// image name refers to the digest. A VM that already opened the image
// keeps its open file.
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

// Retry forgets a failed conversion of dgst, the ErrUnconvertible kind
// included, so that the next Ensure converts it again. A ready or
// converting digest is left as it is.
func (s *Store) Retry(dgst string) error {
	if err := validDigest(dgst); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.inflight[dgst]; ok {
		return nil
	}
	delete(s.failed, dgst)
	if _, err := os.Stat(filepath.Join(s.path(dgst), configName)); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("retry the conversion of %s: %w", dgst, err)
	}
	// No artifact: the directory, if any, holds only the failure record.
	if err := os.RemoveAll(s.path(dgst)); err != nil {
		return fmt.Errorf("retry the conversion of %s: %w", dgst, err)
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
