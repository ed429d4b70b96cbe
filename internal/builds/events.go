package builds

import (
	"context"
	"encoding/json"
	"errors"
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
//
// The hub also knows, for attached builds, since when nobody has been
// watching: a build's subscribers are its open event streams (and
// identical builds waiting for its result), so a build with none has lost
// its client.
type hub struct {
	mu   sync.Mutex
	subs map[string]map[chan struct{}]struct{}
	// attached maps an attached build to the time it was last seen
	// watched: its submission, or when its last subscriber left.
	attached map[string]time.Time
	now      func() time.Time
	// logs closes each build's event log at its end event (see emit).
	logs map[string]*eventLog
}

// eventLog serializes one build's appends; final is set once its
// terminal status landed (only the end event may follow), ended when its
// end event did (zero: not yet).
type eventLog struct {
	mu    sync.Mutex
	final bool
	ended time.Time
}

// endedKept is how long an ended build's log stays closed in memory: far
// longer than a run takes to stop once its build was ended.
const endedKept = 10 * time.Minute

func newHub() *hub {
	return &hub{subs: map[string]map[chan struct{}]struct{}{}, attached: map[string]time.Time{}, now: time.Now,
		logs: map[string]*eventLog{}}
}

// log returns build id's event log, forgetting logs long ended.
func (h *hub) log(id string) *eventLog {
	h.mu.Lock()
	defer h.mu.Unlock()
	l := h.logs[id]
	if l == nil {
		for other, ol := range h.logs {
			if ol.mu.TryLock() {
				if !ol.ended.IsZero() && h.now().Sub(ol.ended) > endedKept {
					delete(h.logs, other)
				}
				ol.mu.Unlock()
			}
		}
		l = &eventLog{}
		h.logs[id] = l
	}
	return l
}

func (h *hub) subscribe(id string) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	h.mu.Lock()
	if h.subs[id] == nil {
		h.subs[id] = map[chan struct{}]struct{}{}
	}
	h.subs[id][ch] = struct{}{}
	h.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			h.mu.Lock()
			delete(h.subs[id], ch)
			if len(h.subs[id]) == 0 {
				delete(h.subs, id)
				if _, ok := h.attached[id]; ok {
					h.attached[id] = h.now()
				}
			}
			h.mu.Unlock()
		})
	}
}

// attach starts watching build id for its client going away; the window
// starts now.
func (h *hub) attach(id string) {
	h.mu.Lock()
	h.attached[id] = h.now()
	h.mu.Unlock()
}

// detach stops watching build id (it finished).
func (h *hub) detach(id string) {
	h.mu.Lock()
	delete(h.attached, id)
	h.mu.Unlock()
}

// unwatched returns the attached builds that have had no subscriber for
// longer than window, and forgets them.
func (h *hub) unwatched(window time.Duration) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	var out []string
	for id, seen := range h.attached {
		if len(h.subs[id]) > 0 {
			continue
		}
		if now.Sub(seen) > window {
			out = append(out, id)
			delete(h.attached, id)
		}
	}
	return out
}

// notifyAll wakes every subscriber once: wakes may have been missed (a
// notification connection was lost).
func (h *hub) notifyAll() {
	h.mu.Lock()
	for _, subs := range h.subs {
		for ch := range subs {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}
	h.mu.Unlock()
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

// emit persists an event and wakes readers, on every node. Persisting must not depend on
// the build's own context: the events of a canceled build still land.
// The end event is the last: a run still stopping after a cancel ended
// its build (a status or message it was about to write, its runtime's
// last logs) appends nothing after it.
func (s *Service) emit(id string, e Event) {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	data, err := json.Marshal(e)
	if err != nil {
		s.log.Error("encode build event", "build", id, "err", err)
		return
	}
	l := s.hub.log(id)
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.ended.IsZero() || l.final && e.Kind != KindEnd {
		return
	}
	if _, err := store.AppendEvent(context.Background(), s.db.SQL, id, string(e.Kind), data); err != nil {
		s.log.Error("persist build event", "build", id, "kind", e.Kind, "err", err)
		return
	}
	switch {
	case e.Kind == KindEnd:
		l.ended = s.hub.now()
	case e.Kind == KindStatus && store.Terminal(e.Status):
		l.final = true
	}
	s.fanout.Wake(id)
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
// new event, and a function to stop watching. An open Watch is what keeps
// an attached build alive: the server's event stream holds one.
func (s *Service) Watch(id string) (<-chan struct{}, func()) { return s.hub.subscribe(id) }

// Attach marks a just-submitted build as attached to its client: when no
// event stream has been open for it for longer than Config.ClientGoneAfter
// while it is queued or running, it is canceled, as buildx cancels a build
// whose session closed. The window starts now, so the client has that
// long to open its first stream. Attachment lives in memory only: a build
// requeued after a server restart runs regardless of watchers. Does
// nothing when ClientGoneAfter is 0.
func (s *Service) Attach(id string) {
	if s.cfg.ClientGoneAfter <= 0 {
		return
	}
	s.hub.attach(id)
}

// clientGoneError is the error of a build canceled because its client
// went away.
func clientGoneError(window time.Duration) string {
	return fmt.Sprintf("the client that submitted this build went away (no event stream for %s); use --detach to let builds outlive their client", window)
}

// watchClients cancels attached builds whose client went away, until
// stop is closed.
func (s *Service) watchClients(stop <-chan struct{}) {
	window := s.cfg.ClientGoneAfter
	every := min(max(window/10, 20*time.Millisecond), 5*time.Second)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		for _, id := range s.hub.unwatched(window) {
			go s.clientGone(id, window)
		}
	}
}

// clientGone cancels build id, which lost its client, unless it already
// finished.
func (s *Service) clientGone(id string, window time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.CancelGrace+10*time.Second)
	defer cancel()
	b, err := s.load(ctx, id)
	if err != nil || store.Terminal(b.Status) {
		return
	}
	s.log.Info("canceling build: its client went away", "build", id, "window", window)
	if _, err := s.stop(ctx, b, store.Outcome{Status: store.StatusCanceled, Phase: "canceled", Error: clientGoneError(window)}); err != nil && !errors.Is(err, ErrFinished) {
		s.log.Warn("cancel build whose client went away", "build", id, "err", err)
	}
}

func eventOfKind(k progress.Kind) progress.Event { return progress.Event{Kind: k} }
