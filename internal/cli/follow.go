package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/kiln-build/kiln/api"
)

// follower follows one build's events to its end, surviving dropped
// connections and an events endpoint that is down for a while.
type follower struct {
	c  *client
	s  settings
	id string
	// polling is set while the stream is down and the build is polled.
	polling bool
	// lastID is the id of the last event handed to onEvent; the stream is
	// resumed after it and anything at or below it is dropped, so no event
	// is ever shown twice.
	lastID int64

	onEvent func(ev api.Event, raw []byte)
	// onNote reports what the client itself is doing (reconnecting,
	// polling); onPoll reports a build state obtained by polling.
	onNote func(msg string)
	onPoll func(b *api.Build)
}

// follow returns the terminal build. It returns ctx's error when ctx ends,
// and an API error the stream cannot recover from (401, 403, 404).
func (f *follower) follow(ctx context.Context) (*api.Build, error) {
	fails := 0
	delay := f.s.reconnectMin
	var lastPolled api.BuildStatus
	for {
		n, end, err := f.stream(ctx)
		if end != nil {
			return end, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if permanent(err) {
			return nil, err
		}
		if n > 0 {
			fails, delay = 0, f.s.reconnectMin
		} else {
			fails++
		}

		wait := delay
		if fails >= f.s.streamFailures {
			if !f.polling {
				f.polling = true
				f.note(fmt.Sprintf("event stream unavailable (%v); checking the build every %s until it comes back", err, f.s.pollInterval))
			}
			b, perr := f.c.getBuild(ctx, f.id)
			switch {
			case ctx.Err() != nil:
				return nil, ctx.Err()
			case permanent(perr):
				return nil, perr
			case perr != nil:
				f.note(fmt.Sprintf("checking the build failed: %v", perr))
			default:
				if b.Status != lastPolled && f.onPoll != nil {
					f.onPoll(b)
				}
				lastPolled = b.Status
				if terminal(b.Status) {
					return b, nil
				}
			}
			wait = f.s.pollInterval
		} else {
			f.note(fmt.Sprintf("event stream interrupted (%v); reconnecting in %s", err, delay))
			delay = min(2*delay, f.s.reconnectMax)
		}
		if err := sleep(ctx, wait); err != nil {
			return nil, err
		}
	}
}

func (f *follower) note(msg string) {
	if f.onNote != nil {
		f.onNote(msg)
	}
}

// errStreamEnded is a stream that closed without the end event.
var errStreamEnded = errors.New("the server closed the stream before the build ended")

// stream reads one connection's worth of events. It returns how many new
// events it delivered, the terminal build if the end event arrived, and
// otherwise why the connection ended.
func (f *follower) stream(ctx context.Context) (n int, end *api.Build, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(sctx, http.MethodGet, f.c.url("/v1/builds/"+url.PathEscape(f.id)+"/events"), nil)
	if err != nil {
		return 0, nil, fmt.Errorf("events of build %s: %w", f.id, err)
	}
	req.Header.Set("Accept", "text/event-stream")
	if f.lastID > 0 {
		req.Header.Set("Last-Event-ID", strconv.FormatInt(f.lastID, 10))
	}
	f.c.authorize(req)
	resp, err := f.c.http.Do(req)
	if err != nil {
		return 0, nil, f.c.transportError(ctx, "events of build "+f.id, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, nil, f.c.readError(resp)
	}
	if f.polling {
		f.polling = false
		f.note("event stream is back")
	}

	// A half-open connection delivers nothing forever; the server's
	// heartbeat comments keep a healthy one busy, so silence means dead.
	var idle atomic.Bool
	watchdog := time.AfterFunc(f.s.idleTimeout, func() { idle.Store(true); cancel() })
	defer watchdog.Stop()
	body := &activityReader{r: resp.Body, active: func() { watchdog.Reset(f.s.idleTimeout) }}

	rd := newSSEReader(body)
	for {
		sev, err := rd.next()
		if err != nil {
			switch {
			case ctx.Err() != nil:
				return n, nil, ctx.Err()
			case idle.Load():
				return n, nil, fmt.Errorf("no data from the server for %s", f.s.idleTimeout)
			case errors.Is(err, io.EOF):
				return n, nil, errStreamEnded
			}
			return n, nil, err
		}
		var ev api.Event
		if err := json.Unmarshal(sev.data, &ev); err != nil {
			// Skip it rather than loop on it forever; its SSE id still
			// moves the resume point past it.
			if id, perr := strconv.ParseInt(sev.id, 10, 64); perr == nil && id > f.lastID {
				f.lastID = id
			}
			f.note(fmt.Sprintf("skipped an event the client cannot read (id %q): %v", sev.id, err))
			continue
		}
		if ev.Id == 0 {
			ev.Id, _ = strconv.ParseInt(sev.id, 10, 64)
		}
		if ev.Kind == "" {
			ev.Kind = sev.event
		}
		if ev.Id != 0 && ev.Id <= f.lastID {
			continue
		}
		if ev.Id != 0 {
			f.lastID = ev.Id
		}
		n++
		f.onEvent(ev, sev.data)
		if ev.Kind == "end" {
			if ev.Build != nil && terminal(ev.Build.Status) {
				return n, ev.Build, nil
			}
			b, err := f.c.getBuild(ctx, f.id)
			if err != nil {
				return n, nil, err
			}
			return n, b, nil
		}
	}
}

// permanent reports errors that retrying cannot fix.
func permanent(err error) bool {
	var ae *apiError
	if !errors.As(err, &ae) {
		return false
	}
	switch ae.Status {
	case http.StatusBadRequest, http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound:
		return true
	}
	return false
}

type activityReader struct {
	r      io.Reader
	active func()
}

func (a *activityReader) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if n > 0 {
		a.active()
	}
	return n, err
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
