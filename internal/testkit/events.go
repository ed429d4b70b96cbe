package testkit

import (
	"strings"
	"sync"

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
