package builds

// The seams of state that nodes sharing one database must share: event
// wakes and build slots. Each has the single-process implementation kiln
// always had and a PostgreSQL one (internal/store's notify.go and
// locks.go); New picks by the database's dialect.

import (
	"context"
	"log/slog"

	"github.com/kiln-build/kiln/internal/store"
)

// Fanout wakes the readers of a build's events ("look again": they read
// the events table, the source of truth). Wakes may be spurious or
// coalesced; none may be lost.
type Fanout interface {
	// Wake wakes every reader of build id's events: this process's at
	// once, other nodes' soon after. It never blocks on the network.
	Wake(id string)
	// Serve delivers other nodes' wakes to this process's readers until
	// ctx ends; after losing its connection it wakes every reader once.
	Serve(ctx context.Context)
}

// localFanout wakes this process's readers only.
type localFanout struct{ hub *hub }

func (f localFanout) Wake(id string)        { f.hub.notify(id) }
func (f localFanout) Serve(context.Context) {}

// pgFanout also tells other nodes, through LISTEN/NOTIFY.
type pgFanout struct {
	hub *hub
	n   *store.Notifier
}

func (f pgFanout) Wake(id string) {
	f.hub.notify(id)
	f.n.Notify(id)
}

func (f pgFanout) Serve(ctx context.Context) { f.n.Run(ctx, f.hub.notify, f.hub.notifyAll) }

// eventsChannel is the NOTIFY channel of build event wakes.
const eventsChannel = "kiln_build_events"

func newFanout(db *store.DB, h *hub, log *slog.Logger) Fanout {
	if db.Dialect() == store.Postgres {
		return pgFanout{hub: h, n: db.NewNotifier(eventsChannel, log)}
	}
	return localFanout{hub: h}
}

// Slots bounds how many builds run at once: max_concurrent_builds per
// process, or across every node sharing a PostgreSQL database.
type Slots interface {
	// Acquire waits for a free slot until ctx ends, calling waiting once
	// first when none is free at once. release must be called once.
	Acquire(ctx context.Context, waiting func()) (release func(), err error)
	// AcquireAll takes every slot, waiting for running builds to finish
	// (registry GC runs so: see Service.Pause).
	AcquireAll(ctx context.Context) (release func(), err error)
}

var (
	_ Slots = chanSlots(nil)
	_ Slots = (*store.SlotLocks)(nil)
)

func newSlots(db *store.DB, n int, log *slog.Logger) Slots {
	if db.Dialect() == store.Postgres {
		return db.SlotLocks(n, log)
	}
	return make(chanSlots, n)
}

// chanSlots are one process's slots: a token in the channel per running
// build.
type chanSlots chan struct{}

func (c chanSlots) Acquire(ctx context.Context, waiting func()) (func(), error) {
	select {
	case c <- struct{}{}:
		return c.release, nil
	default:
	}
	if waiting != nil {
		waiting()
	}
	select {
	case c <- struct{}{}:
		return c.release, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

func (c chanSlots) release() { <-c }

func (c chanSlots) AcquireAll(ctx context.Context) (func(), error) {
	held := 0
	release := func() {
		for range held {
			<-c
		}
	}
	for held < cap(c) {
		select {
		case c <- struct{}{}:
			held++
		case <-ctx.Done():
			release()
			return nil, context.Cause(ctx)
		}
	}
	return release, nil
}
