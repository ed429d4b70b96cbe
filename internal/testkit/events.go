package testkit

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/progress"
)

// Recorder is a progress.Sink that keeps every event for assertions and
// can signal when a given event arrives.
type Recorder struct {
	mu      sync.Mutex
	events  []progress.Event
	waiters []waiter
}

type waiter struct {
	match func(progress.Event) bool
	ch    chan struct{}
}

var _ progress.Sink = (*Recorder)(nil)

// Emit records e.
func (r *Recorder) Emit(e progress.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
	kept := r.waiters[:0]
	for _, w := range r.waiters {
		if w.match(e) {
			close(w.ch)
		} else {
			kept = append(kept, w)
		}
	}
	r.waiters = kept
}

// Events returns a copy of everything recorded so far.
func (r *Recorder) Events() []progress.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]progress.Event(nil), r.events...)
}

// Logs concatenates the data of all Log events.
func (r *Recorder) Logs() string {
	var b strings.Builder
	for _, e := range r.Events() {
		if e.Kind == progress.Log {
			b.WriteString(e.Data)
		}
	}
	return b.String()
}

// Find returns the recorded events of kind whose vertex name contains
// nameContains.
func (r *Recorder) Find(kind progress.Kind, nameContains string) []progress.Event {
	var out []progress.Event
	for _, e := range r.Events() {
		if e.Kind == kind && strings.Contains(e.Name, nameContains) {
			out = append(out, e)
		}
	}
	return out
}

// Await returns a channel closed once an event of kind whose vertex name
// contains nameContains has been (or is later) emitted.
func (r *Recorder) Await(kind progress.Kind, nameContains string) <-chan struct{} {
	match := func(e progress.Event) bool { return e.Kind == kind && strings.Contains(e.Name, nameContains) }
	ch := make(chan struct{})
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.events {
		if match(e) {
			close(ch)
			return ch
		}
	}
	r.waiters = append(r.waiters, waiter{match: match, ch: ch})
	return ch
}

// Contains reports whether any text field of any event contains s.
func (r *Recorder) Contains(s string) bool {
	for _, e := range r.Events() {
		for _, f := range []string{e.Phase, e.Vertex, e.Name, e.Error, e.Data, e.Message} {
			if strings.Contains(f, s) {
				return true
			}
		}
	}
	return false
}

// Canceler cancels a build half a second after a step starts, as a user
// hitting Ctrl-C mid-step would.
type Canceler struct {
	Ctx     context.Context
	started <-chan struct{}
	at      chan time.Time
}

// CancelWhenStarted returns a Canceler whose Ctx ends 500ms after rec sees
// the vertex named by step start, or after limit if it never does.
func CancelWhenStarted(rec *Recorder, step string, limit time.Duration) *Canceler {
	ctx, cancel := context.WithCancel(context.Background())
	c := &Canceler{Ctx: ctx, started: rec.Await(progress.VertexStarted, step), at: make(chan time.Time, 1)}
	go func() {
		select {
		case <-c.started:
			time.Sleep(500 * time.Millisecond)
		case <-time.After(limit):
		}
		c.at <- time.Now()
		cancel()
	}()
	return c
}

// Since is how long ago the cancel happened; it waits for it. It fails
// the test if the step never started.
func (c *Canceler) Since(t testing.TB, runErr error) time.Duration {
	t.Helper()
	took := time.Since(<-c.at)
	select {
	case <-c.started:
	default:
		t.Fatalf("the step to cancel never started: %v", runErr)
	}
	return took
}
