// Package progress defines the structured events a build emits while it
// runs. Runtimes produce them (from BuildKit's solve status, or from the
// guest agent over the channel), the builds package persists and streams
// them. It sits at the bottom of the dependency graph so every layer can
// speak the same vocabulary without importing each other.
package progress

import "time"

// Kind names what an Event reports.
type Kind string

const (
	// Phase marks a change of the build's coarse phase (Event.Phase).
	Phase Kind = "phase"
	// VertexStarted: BuildKit began a step (Event.Vertex, Event.Name).
	VertexStarted Kind = "vertex.started"
	// VertexCached: the step was answered from cache.
	VertexCached Kind = "vertex.cached"
	// VertexCompleted: the step finished successfully.
	VertexCompleted Kind = "vertex.completed"
	// VertexErrored: the step failed (Event.Error).
	VertexErrored Kind = "vertex.errored"
	// Log carries a chunk of a step's output (Event.Data, Event.Stream).
	Log Kind = "log"
	// Message is a human-readable note from kiln itself (Event.Message).
	Message Kind = "message"
)

// Event is one structured progress report.
type Event struct {
	Kind    Kind      `json:"kind"`
	Time    time.Time `json:"time"`
	Phase   string    `json:"phase,omitempty"`
	Vertex  string    `json:"vertex,omitempty"` // vertex digest
	Name    string    `json:"name,omitempty"`   // vertex name, e.g. "[2/4] RUN make"
	Error   string    `json:"error,omitempty"`
	Stream  int       `json:"stream,omitempty"` // 1 stdout, 2 stderr
	Data    string    `json:"data,omitempty"`   // log bytes
	Message string    `json:"message,omitempty"`
}

// Sink receives events. Implementations must be safe for concurrent use
// and must not block for long: the solve loop calls them inline.
type Sink interface {
	Emit(Event)
}

// SinkFunc adapts a function to Sink.
type SinkFunc func(Event)

// Emit calls f(e).
func (f SinkFunc) Emit(e Event) { f(e) }

// Discard drops every event.
var Discard Sink = SinkFunc(func(Event) {})
