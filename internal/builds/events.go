package builds

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/store"
)

// Event kinds kiln adds to BuildKit's progress vocabulary.
const (
	// KindStatus reports a status change (Event.Status).
	KindStatus progress.Kind = "status"
	// KindEnd is the last event of every build; its status is terminal.
	KindEnd progress.Kind = "end"
)

// Event is what a build's event stream carries and persists.
type Event struct {
	progress.Event
	Status string `json:"status,omitempty"`
}

// StoredEvent is an Event with its per-build sequence number.
type StoredEvent struct {
	Seq   int64
	Event Event
}

// hub wakes event-stream readers when a build gets a new event. Readers
// always read from the database; the hub only says "look again", so a
// slow reader can never miss or duplicate an event.
type hub struct {
	mu   sync.Mutex
	subs map[string]map[chan struct{}]struct{}
}

func newHub() *hub { return &hub{subs: map[string]map[chan struct{}]struct{}{}} }

func (h *hub) subscribe(id string) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	h.mu.Lock()
	if h.subs[id] == nil {
		h.subs[id] = map[chan struct{}]struct{}{}
	}
	h.subs[id][ch] = struct{}{}
	h.mu.Unlock()
	return ch, func() {
		h.mu.Lock()
		delete(h.subs[id], ch)
		if len(h.subs[id]) == 0 {
			delete(h.subs, id)
		}
		h.mu.Unlock()
	}
}

func (h *hub) notify(id string) {
	h.mu.Lock()
	for ch := range h.subs[id] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	h.mu.Unlock()
}

// emit persists an event and wakes readers. Persisting must not depend on
// the build's own context: the events of a canceled build still land.
func (s *Service) emit(id string, e Event) {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	data, err := json.Marshal(e)
	if err != nil {
		s.log.Error("encode build event", "build", id, "err", err)
		return
	}
	if _, err := store.AppendEvent(context.Background(), s.db.SQL, id, string(e.Kind), data); err != nil {
		s.log.Error("persist build event", "build", id, "kind", e.Kind, "err", err)
		return
	}
	s.hub.notify(id)
}

func (s *Service) message(id, format string, args ...any) {
	s.emit(id, Event{Event: progress.Event{Kind: progress.Message, Message: fmt.Sprintf(format, args...)}})
}

func (s *Service) phase(id, phase string) {
	if err := store.SetPhase(context.Background(), s.db.SQL, id, phase); err != nil {
		s.log.Error("set phase", "build", id, "err", err)
	}
	s.emit(id, Event{Event: progress.Event{Kind: progress.Phase, Phase: phase}})
}

// Events returns up to limit events of a build after seq.
func (s *Service) Events(ctx context.Context, id string, after int64, limit int) ([]StoredEvent, error) {
	rows, err := store.Events(ctx, s.db.SQL, id, after, limit)
	if err != nil {
		return nil, err
	}
	out := make([]StoredEvent, 0, len(rows))
	for _, r := range rows {
		var e Event
		if err := json.Unmarshal(r.Data, &e); err != nil {
			return nil, err
		}
		out = append(out, StoredEvent{Seq: r.Seq, Event: e})
	}
	return out, nil
}

// Watch returns a channel that receives a value whenever build id gets a
// new event, and a function to stop watching.
func (s *Service) Watch(id string) (<-chan struct{}, func()) { return s.hub.subscribe(id) }

func eventOfKind(k progress.Kind) progress.Event { return progress.Event{Kind: k} }
