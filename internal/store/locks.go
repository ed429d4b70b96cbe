package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Advisory lock classes (the first key of pg_advisory_lock(int4, int4)):
// build slot i is (slotClass, i); the registry gate (gateClass, 0). The
// two-key space is apart from the one-bigint keys of InTx and migrate.
const (
	slotClass int32 = 0x6b6c0001
	gateClass int32 = 0x6b6c0002
)

// SlotLocks are n build slots shared by every process on the database:
// slot i is the session advisory lock (slotClass, i), held on a
// connection of its own for as long as the slot is. A process that dies
// loses its connections, and with them its slots, without anyone's help.
//
// Waiting costs no connection per waiter: a process's waiters line up in
// memory and only the first polls, with backoff up to a second (one short
// query per poll); a slot this process releases wakes its own next waiter
// at once, one released elsewhere is noticed at the next poll.
type SlotLocks struct {
	n     int
	conns *conns
	log   *slog.Logger
	line  chan struct{} // held by the one waiter that polls
	freed chan struct{} // a slot of this process was released
}

// SlotLocks returns n slots shared through the database.
func (s *DB) SlotLocks(n int, log *slog.Logger) *SlotLocks {
	if log == nil {
		log = slog.Default()
	}
	return &SlotLocks{n: n, conns: newConns(s, 2, 0), log: log, line: make(chan struct{}, 1), freed: make(chan struct{}, 1)}
}

// Acquire waits for a free slot until ctx ends, calling waiting once
// first if none is free at once, and returns the function that frees it.
func (l *SlotLocks) Acquire(ctx context.Context, waiting func()) (release func(), err error) {
	select {
	case l.line <- struct{}{}:
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	defer func() { <-l.line }()
	waited := false
	b := backoff{next: 20 * time.Millisecond, max: time.Second}
	for {
		release, err := l.try(ctx)
		if release != nil {
			return release, nil
		}
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		if err != nil {
			l.log.Warn("build slots: database error; retrying", "err", err)
		}
		if !waited && waiting != nil {
			waiting()
			waited = true
		}
		if !b.waitOr(ctx, l.freed) {
			return nil, context.Cause(ctx)
		}
	}
}

// try takes the first free slot, if any: one statement, which stops at
// the first lock it gets.
func (l *SlotLocks) try(ctx context.Context) (func(), error) {
	conn, err := l.conns.get(ctx)
	if err != nil {
		return nil, err
	}
	var slot int32
	err = conn.QueryRow(ctx, `SELECT i FROM generate_series(0, $2::int - 1) AS i
		WHERE pg_try_advisory_lock($1::int, i) LIMIT 1`, slotClass, l.n).Scan(&slot)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		l.conns.put(conn)
		return nil, nil
	case err != nil:
		l.conns.discard(conn) // whatever it may hold goes with it
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := conn.Exec(ctx, `SELECT pg_advisory_unlock($1::int, $2::int)`, slotClass, slot); err != nil {
				l.conns.discard(conn)
			} else {
				l.conns.put(conn)
			}
			select {
			case l.freed <- struct{}{}:
			default:
			}
		})
	}, nil
}

// AcquireAll takes every slot, in order, on one connection, waiting for
// each in PostgreSQL's lock queue (where it comes before later tries) until
// ctx ends. Taking them in order means two callers cannot each hold part.
func (l *SlotLocks) AcquireAll(ctx context.Context) (release func(), err error) {
	conn, err := l.conns.get(ctx)
	if err != nil {
		return nil, err
	}
	for i := range l.n {
		if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1::int, $2::int)`, slotClass, i); err != nil {
			l.conns.discard(conn)
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
			return nil, fmt.Errorf("take build slot %d: %w", i, err)
		}
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			l.conns.discard(conn) // frees every slot at once
			select {
			case l.freed <- struct{}{}:
			default:
			}
		})
	}, nil
}

// Close closes the idle connections; held slots stay held.
func (l *SlotLocks) Close() { l.conns.Close() }

// waitOr waits like wait, or until wake.
func (b *backoff) waitOr(ctx context.Context, wake <-chan struct{}) bool {
	d := b.next
	b.next = min(2*b.next, b.max)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-wake:
		b.next = 20 * time.Millisecond
	case <-ctx.Done():
		return false
	}
	return true
}

// RegistryGate is the registry's write gate across every process on the
// database: the advisory lock (gateClass, 0), held shared by each
// mutating registry request and exclusively by garbage collection, each
// on a connection of its own for its duration.
//
// Cost per mutating request: two round trips on an open connection
// (try-lock shared, unlock) — 0.11 ms against a local server in
// BenchmarkGate (internal/registry), against 33 ns for the process-local
// gate; add a LAN's round trips — and one connection held while the
// request runs. A push makes about three
// mutating requests per layer (start upload, data, commit) plus one per
// manifest, each moving the layer's bytes, so the lock is noise next to
// them; the connections are kept (up to 8 idle, at most 64 open, more
// writers wait for one) so no request pays a connect. Holding one
// process-wide shared lock for all of a node's writers would save the
// round trips but lets a busy node's writers starve a collection waiting
// elsewhere, which per-request locks cannot: PostgreSQL refuses new shared
// tries once an exclusive request waits, as sync.RWMutex.TryRLock does.
type RegistryGate struct {
	conns *conns
}

// RegistryGate returns the database's registry gate.
func (s *DB) RegistryGate() *RegistryGate {
	return &RegistryGate{conns: newConns(s, 8, 64)}
}

// TryShared takes the gate shared unless a collection holds or waits for
// it (ok false).
func (g *RegistryGate) TryShared(ctx context.Context) (release func(), ok bool, err error) {
	conn, err := g.conns.get(ctx)
	if err != nil {
		return nil, false, err
	}
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock_shared($1::int, 0)`, gateClass).Scan(&ok); err != nil {
		g.conns.discard(conn)
		return nil, false, fmt.Errorf("registry write gate: %w", err)
	}
	if !ok {
		g.conns.put(conn)
		return nil, false, nil
	}
	return g.unlocker(conn, `SELECT pg_advisory_unlock_shared($1::int, 0)`), true, nil
}

// Exclusive takes the gate exclusively, waiting for the writers that hold
// it, until ctx ends.
func (g *RegistryGate) Exclusive(ctx context.Context) (release func(), err error) {
	conn, err := g.conns.get(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1::int, 0)`, gateClass); err != nil {
		g.conns.discard(conn)
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, fmt.Errorf("registry write gate: %w", err)
	}
	return g.unlocker(conn, `SELECT pg_advisory_unlock($1::int, 0)`), nil
}

func (g *RegistryGate) unlocker(conn *pgx.Conn, unlock string) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := conn.Exec(ctx, unlock, gateClass); err != nil {
				g.conns.discard(conn)
				return
			}
			g.conns.put(conn)
		})
	}
}

// Close closes the idle connections.
func (g *RegistryGate) Close() { g.conns.Close() }
