package builds

// Behavioural suites of the shared-state seams (shared.go), run against
// the single-process implementation and the PostgreSQL one, where two
// "nodes" are two store.DBs (connection pools) on one database.

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/riverqueue/river/rivermigrate"

	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/testkit"
)

// openTwice opens the database at location as two nodes would.
func openTwice(t testing.TB, location string) (*store.DB, *store.DB) {
	t.Helper()
	var dbs [2]*store.DB
	for i := range dbs {
		db, err := store.Open(context.Background(), location)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		dbs[i] = db
	}
	return dbs[0], dbs[1]
}

// fanNode is one node's event readers and its fanout.
type fanNode struct {
	hub *hub
	f   Fanout
}

// pgFanNodes returns two nodes on one PostgreSQL database, both
// listening.
func pgFanNodes(t testing.TB, dba, dbb *store.DB) (a, b fanNode) {
	t.Helper()
	node := func(db *store.DB) fanNode {
		h := newHub()
		f := newFanout(db, h, slog.New(slog.DiscardHandler)).(pgFanout)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); f.Serve(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
		select {
		case <-f.n.Listening():
		case <-time.After(10 * time.Second):
			t.Fatal("fanout did not start listening in 10s")
		}
		return fanNode{hub: h, f: f}
	}
	return node(dba), node(dbb)
}

func localFanNodes() (a, b fanNode) {
	h := newHub()
	n := fanNode{hub: h, f: localFanout{hub: h}}
	return n, n
}

func woken(ch <-chan struct{}, within time.Duration) bool {
	select {
	case <-ch:
		return true
	case <-time.After(within):
		return false
	}
}

// testFanout: a wake on one node reaches the readers of that build on
// both, every time, and only readers of the woken build need wake.
func testFanout(t *testing.T, a, b fanNode) {
	onA, stopA := a.hub.subscribe("b1")
	defer stopA()
	onB, stopB := b.hub.subscribe("b1")
	defer stopB()
	other, stopOther := b.hub.subscribe("b2")
	defer stopOther()
	for i := range 20 {
		a.f.Wake("b1")
		if !woken(onA, 5*time.Second) {
			t.Fatalf("wake %d: the publishing node's reader was not woken", i)
		}
		if !woken(onB, 5*time.Second) {
			t.Fatalf("wake %d: the other node's reader was not woken in 5s", i)
		}
	}
	select {
	case <-other:
		t.Error("a reader of another build was woken") // allowed in principle; not expected here
	default:
	}
}

func TestFanoutLocal(t *testing.T) {
	a, b := localFanNodes()
	testFanout(t, a, b)
}

func TestFanoutPostgres(t *testing.T) {
	pg := testkit.StartPostgres(t)
	dba, dbb := openTwice(t, pg.NewDatabase(t))
	a, b := pgFanNodes(t, dba, dbb)
	testFanout(t, a, b)

	// A listener that loses its connection reconnects, wakes every
	// reader once (wakes may have been missed meanwhile), and hears
	// wakes again.
	onB, stopB := b.hub.subscribe("b3")
	defer stopB()
	// Both nodes' listeners: the wake must come from the reconnect.
	kill(t, dba, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'`)
	if !woken(onB, 15*time.Second) {
		t.Fatal("after its listener's connection was killed, a reader was not woken once it was back")
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		a.f.Wake("b3")
		if woken(onB, 200*time.Millisecond) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("wakes do not arrive after the listener reconnected")
		}
	}
}

// kill terminates the backends query selects (it must select
// pg_terminate_backend(pid) of them), and fails unless there was one.
func kill(t *testing.T, db *store.DB, query string) {
	t.Helper()
	rows, err := db.SQL.QueryContext(context.Background(), query)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for rows.Next() {
		n++
	}
	rows.Close()
	if n == 0 {
		t.Fatalf("no backend matched %s", query)
	}
}

// slotNodes returns two nodes' slots, n of them in all.
type slotNodes func(t *testing.T, n int) (a, b Slots)

func localSlotNodes(t *testing.T, n int) (Slots, Slots) {
	s := make(chanSlots, n)
	return s, s
}

func pgSlotNodes(dba, dbb *store.DB) slotNodes {
	return func(t *testing.T, n int) (Slots, Slots) {
		a, b := dba.SlotLocks(n, slog.New(slog.DiscardHandler)), dbb.SlotLocks(n, slog.New(slog.DiscardHandler))
		t.Cleanup(func() { a.Close(); b.Close() })
		return a, b
	}
}

func testSlots(t *testing.T, nodes slotNodes) {
	t.Run("NeverMoreThanTheCount", func(t *testing.T) {
		a, b := nodes(t, 3)
		var running, most atomic.Int32
		var wg sync.WaitGroup
		for i := range 12 {
			s := a
			if i%2 == 1 {
				s = b
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				release, err := s.Acquire(context.Background(), nil)
				if err != nil {
					t.Error(err)
					return
				}
				n := running.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				time.Sleep(30 * time.Millisecond)
				running.Add(-1)
				release()
			}()
		}
		wg.Wait()
		if m := most.Load(); m > 3 || m < 2 {
			t.Errorf("at most %d builds held slots at once across both nodes, want 3 (at least 2)", m)
		}
	})
	t.Run("WaitingIsSaidAndCancelable", func(t *testing.T) {
		a, b := nodes(t, 1)
		said := 0
		release, err := a.Acquire(context.Background(), func() { said++ })
		if err != nil || said != 0 {
			t.Fatalf("a free slot: err %v, waiting said %d times, want nil and 0", err, said)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		if _, err := b.Acquire(ctx, func() { said++ }); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Acquire with every slot taken: %v, want the context's deadline", err)
		}
		if said != 1 || time.Since(start) > 3*time.Second {
			t.Errorf("waiting said %d times (want 1); canceled after %s", said, time.Since(start))
		}
		got := make(chan func(), 1)
		go func() {
			r, err := b.Acquire(context.Background(), nil)
			if err != nil {
				t.Error(err)
			}
			got <- r
		}()
		time.Sleep(50 * time.Millisecond)
		release()
		select {
		case r := <-got:
			r()
		case <-time.After(5 * time.Second):
			t.Fatal("a released slot did not reach the other node's waiter in 5s")
		}
	})
	t.Run("AllWaitsForRunningAndHoldsOthersBack", func(t *testing.T) {
		a, b := nodes(t, 2)
		running, err := b.Acquire(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		paused := make(chan func(), 1)
		go func() {
			r, err := a.AcquireAll(context.Background())
			if err != nil {
				t.Error(err)
			}
			paused <- r
		}()
		select {
		case <-paused:
			t.Fatal("AcquireAll returned while a build held a slot")
		case <-time.After(300 * time.Millisecond):
		}
		running()
		var resume func()
		select {
		case resume = <-paused:
		case <-time.After(5 * time.Second):
			t.Fatal("AcquireAll did not get every slot in 5s after the build finished")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		if _, err := b.Acquire(ctx, nil); err == nil {
			t.Fatal("a build got a slot while every slot was taken")
		}
		resume()
		r, err := b.Acquire(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		r()
	})
}

func TestSlotsLocal(t *testing.T) { testSlots(t, localSlotNodes) }

func TestSlotsPostgres(t *testing.T) {
	pg := testkit.StartPostgres(t)
	dba, dbb := openTwice(t, pg.NewDatabase(t))
	testSlots(t, pgSlotNodes(dba, dbb))

	// A node whose connection dies (it crashed) loses its slot, and the
	// other node's waiter takes it.
	a, b := pgSlotNodes(dba, dbb)(t, 1)
	if _, err := a.Acquire(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		_, err := b.Acquire(context.Background(), nil)
		got <- err
	}()
	time.Sleep(100 * time.Millisecond)
	kill(t, dbb, `SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = 1802240001`)
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the slot of a dead connection was not taken by the other node in 10s")
	}
}

// Of identical builds submitted at once to two nodes on one database,
// exactly one leads and the others follow it: the in-flight lookup and
// the build's insert run in one InTx, which on PostgreSQL holds one
// transaction-scoped advisory lock, so they need no seam of their own.
func TestIdenticalSubmissionsAcrossNodesHaveOneLeader(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) {
		testOneLeader(t, filepath.Join(t.TempDir(), "kiln.db"))
	})
	t.Run("postgres", func(t *testing.T) {
		testOneLeader(t, testkit.StartPostgres(t).NewDatabase(t))
	})
}

func testOneLeader(t *testing.T, location string) {
	dba, dbb := openTwice(t, location)
	migrator, err := rivermigrate.New(dba.RiverDriver(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := migrator.Migrate(context.Background(), rivermigrate.DirectionUp, nil); err != nil {
		t.Fatal(err)
	}
	var nodes []*Service
	for _, db := range []*store.DB{dba, dbb} {
		f := newFixture(t, 1)
		f.db = db
		f.cfg.DedupTTL = time.Hour
		// Not started: nothing runs the builds, so all stay in flight.
		s, err := New(f.cfg, Deps{DB: f.db, Registry: f.reg, Images: f.imgs, Volumes: f.vols, Runtime: f.rt,
			Auth: f.auth, Policy: f.policy, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, s)
	}
	const each = 4
	ids := make(chan string, 2*each)
	var wg sync.WaitGroup
	for _, s := range nodes {
		for range each {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b, err := submit(t, s, principal("app"), script("hold", 1))
				if err != nil {
					t.Error(err)
					return
				}
				ids <- b.ID
			}()
		}
	}
	wg.Wait()
	close(ids)
	var leaders []string
	follows := map[string]int{}
	for id := range ids {
		b, err := store.GetBuild(context.Background(), dba.SQL, id)
		if err != nil {
			t.Fatal(err)
		}
		if b.Options.Follows == "" {
			leaders = append(leaders, id)
		} else {
			follows[b.Options.Follows]++
		}
	}
	if len(leaders) != 1 || follows[leaders[0]] != 2*each-1 {
		t.Fatalf("leaders %v, followers by leader %v; want one leader followed by the other %d", leaders, follows, 2*each-1)
	}
}

// BenchmarkEventWake measures how long a wake takes to reach a reader:
// in-process (one node) and through LISTEN/NOTIFY (another node on the
// same PostgreSQL database), in one run, and their ratio.
//
//	KILN_REQUIRE_POSTGRES=1 go test ./internal/builds/ -run '^$' -bench EventWake -benchtime 2000x
func BenchmarkEventWake(b *testing.B) {
	pg := testkit.StartPostgres(b)
	dba, dbb := openTwice(b, pg.NewDatabase(b))
	pa, pb := pgFanNodes(b, dba, dbb)
	la, lb := localFanNodes()
	once := func(from, to fanNode) time.Duration {
		ch, stop := to.hub.subscribe("bench")
		defer stop()
		start := time.Now()
		from.f.Wake("bench")
		if !woken(ch, 10*time.Second) {
			b.Fatal("a wake did not arrive in 10s")
		}
		return time.Since(start)
	}
	var local, remote time.Duration
	n := 0
	for b.Loop() {
		local += once(la, lb)
		remote += once(pa, pb)
		n++
	}
	b.ReportMetric(float64(local.Nanoseconds())/float64(n), "inproc-ns/wake")
	b.ReportMetric(float64(remote.Nanoseconds())/float64(n), "notify-ns/wake")
	b.ReportMetric(float64(remote)/float64(max(local, 1)), "notify/inproc")
}
