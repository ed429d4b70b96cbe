package registry

import (
	"context"
	"sync"
)

// Gate keeps registry garbage collection apart from writes: every
// mutating API request holds it shared, GC exclusively. Distribution's
// mark and sweep is safe only while nothing is pushed.
type Gate interface {
	// TryShared takes the gate shared for one write, without waiting:
	// ok is false while a collection holds the gate or waits for it (the
	// request is refused, and the client retries). release must be
	// called once, when the write is done.
	TryShared(ctx context.Context) (release func(), ok bool, err error)
	// Exclusive takes the gate for a collection, waiting until the
	// writes holding it are done or ctx ends.
	Exclusive(ctx context.Context) (release func(), err error)
}

// LocalGate is the gate of one process: a sync.RWMutex. Registries that
// share storage across processes need a shared gate (store.RegistryGate
// holds a PostgreSQL advisory lock).
type LocalGate struct{ mu sync.RWMutex }

var _ Gate = (*LocalGate)(nil)

func (g *LocalGate) TryShared(context.Context) (func(), bool, error) {
	if !g.mu.TryRLock() {
		return nil, false, nil
	}
	return g.mu.RUnlock, true, nil
}

// Exclusive waits for the writers; it does not end early with ctx, as
// sync.RWMutex.Lock cannot (writers are short and refused meanwhile).
func (g *LocalGate) Exclusive(context.Context) (func(), error) {
	g.mu.Lock()
	return g.mu.Unlock, nil
}
