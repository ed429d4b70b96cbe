package registry_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/testkit"
)

// testGate runs the gate's contract over a and b, two processes' views
// of one gate (the same value for a process-local gate).
func testGate(t *testing.T, a, b registry.Gate) {
	ctx := context.Background()
	ra, ok, err := a.TryShared(ctx)
	if err != nil || !ok {
		t.Fatalf("TryShared on a free gate: ok %v, err %v", ok, err)
	}
	rb, ok, err := b.TryShared(ctx)
	if err != nil || !ok {
		t.Fatalf("a second writer: ok %v, err %v; writers share the gate", ok, err)
	}
	rb()

	collected := make(chan func(), 1)
	go func() {
		r, err := b.Exclusive(ctx)
		if err != nil {
			t.Error(err)
		}
		collected <- r
	}()
	select {
	case <-collected:
		t.Fatal("Exclusive returned while a writer held the gate")
	case <-time.After(300 * time.Millisecond):
	}
	for name, g := range map[string]registry.Gate{"a": a, "b": b} {
		if r, ok, _ := g.TryShared(ctx); ok {
			r()
			t.Errorf("a new writer on %s was let in while a collection waited", name)
		}
	}
	ra()
	var rx func()
	select {
	case rx = <-collected:
	case <-time.After(5 * time.Second):
		t.Fatal("Exclusive did not return in 5s after the last writer finished")
	}
	for name, g := range map[string]registry.Gate{"a": a, "b": b} {
		if r, ok, _ := g.TryShared(ctx); ok {
			r()
			t.Errorf("a writer on %s was let in during a collection", name)
		}
	}
	rx()
	r, ok, err := a.TryShared(ctx)
	if err != nil || !ok {
		t.Fatalf("TryShared after the collection: ok %v, err %v", ok, err)
	}
	r()
}

func TestGateLocal(t *testing.T) {
	g := &registry.LocalGate{}
	testGate(t, g, g)
}

func TestGatePostgres(t *testing.T) {
	dba, dbb := openTwice(t, testkit.StartPostgres(t).NewDatabase(t))
	a, b := dba.RegistryGate(), dbb.RegistryGate()
	t.Cleanup(func() { a.Close(); b.Close() })
	testGate(t, a, b)

	// A collection waiting for a writer gives up when its context ends.
	r, _, err := a.TryShared(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer r()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := b.Exclusive(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Exclusive past its deadline: %v, want the deadline", err)
	}
}

func openTwice(t *testing.T, url string) (*store.DB, *store.DB) {
	t.Helper()
	var dbs [2]*store.DB
	for i := range dbs {
		db, err := store.Open(context.Background(), url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		dbs[i] = db
	}
	return dbs[0], dbs[1]
}

// signalGate tells when a writer got in.
type signalGate struct {
	registry.Gate
	in chan struct{}
}

func (g signalGate) TryShared(ctx context.Context) (func(), bool, error) {
	r, ok, err := g.Gate.TryShared(ctx)
	if ok {
		select {
		case g.in <- struct{}{}:
		default:
		}
	}
	return r, ok, err
}

// Two registries over one storage and one database (two nodes): GC on
// one waits for a push in progress on the other, and pushes to either
// are refused meanwhile, then admitted again.
func TestGCWaitsForWritesOfAnotherNode(t *testing.T) {
	dba, dbb := openTwice(t, testkit.StartPostgres(t).NewDatabase(t))
	root := filepath.Join(t.TempDir(), "registry")
	authority, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	in := make(chan struct{}, 1)
	serve := func(g registry.Gate) *testkit.KilnRegistry {
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		reg, err := registry.New(ctx, registry.Config{RootDir: root, Authority: authority, Grant: testkit.Policy(t).GrantRegistry,
			Logger: slog.New(slog.DiscardHandler), Gate: g})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { reg.Close() })
		srv := httptest.NewServer(reg)
		t.Cleanup(srv.Close)
		return &testkit.KilnRegistry{Registry: reg, Root: root, URL: srv.URL, Authority: authority}
	}
	ga, gb := dba.RegistryGate(), dbb.RegistryGate()
	t.Cleanup(func() { ga.Close(); gb.Close() })
	nodeA, nodeB := serve(ga), serve(signalGate{Gate: gb, in: in})

	const repo = "gate/push"
	nodeA.PushBlob(t, repo, "application/octet-stream", []byte("before"))
	resp := nodeB.Do(t, repo, http.MethodPost, nodeB.URL+"/v2/"+repo+"/blobs/uploads/", "", nil, http.StatusAccepted)
	<-in
	upload := location(t, nodeB, resp)

	// A layer upload on B that is still sending its bytes.
	body, send := io.Pipe()
	patched := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPatch, upload.String(), body)
		req.Header.Set("Authorization", "Bearer "+pushToken(t, authority, repo))
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Error(err)
			patched <- 0
			return
		}
		resp.Body.Close()
		patched <- resp.StatusCode
	}()
	send.Write([]byte("some bytes "))
	select {
	case <-in:
	case <-time.After(5 * time.Second):
		t.Fatal("the upload did not reach the gate in 5s")
	}

	collected := make(chan error, 1)
	go func() {
		_, err := nodeA.Registry.GC(context.Background())
		collected <- err
	}()
	select {
	case err := <-collected:
		t.Fatalf("GC on A finished (%v) while B was receiving an upload", err)
	case <-time.After(500 * time.Millisecond):
	}
	for _, n := range []*testkit.KilnRegistry{nodeA, nodeB} {
		resp := n.Do(t, repo, http.MethodPost, n.URL+"/v2/"+repo+"/blobs/uploads/", "", nil, http.StatusServiceUnavailable)
		if resp.Header.Get("Retry-After") == "" {
			t.Error("a refused push is not told when to retry")
		}
	}

	send.Write([]byte("and the rest"))
	send.Close()
	if code := <-patched; code != http.StatusAccepted {
		t.Fatalf("the upload in progress during GC's wait: status %d, want 202", code)
	}
	select {
	case err := <-collected:
		if err != nil {
			t.Fatalf("GC: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("GC did not run in 10s after the upload finished")
	}
	nodeB.PushBlob(t, repo, "application/octet-stream", []byte("after"))
}

func pushToken(t *testing.T, a *auth.Authority, repo string) string {
	t.Helper()
	tok, err := a.IssueRegistryToken(auth.Principal{Subject: "testkit", Scopes: []auth.Scope{auth.ScopeImageWrite}}, "kiln",
		[]auth.RegistryAccess{{Type: "repository", Name: repo, Actions: []string{"pull", "push"}}})
	if err != nil {
		t.Fatal(err)
	}
	return tok.Token
}

// BenchmarkGate is the cost of admitting one registry write: the
// process-local gate and the PostgreSQL advisory lock (a kept
// connection, two round trips).
//
//	KILN_REQUIRE_POSTGRES=1 go test ./internal/registry/ -run '^$' -bench Gate
func BenchmarkGate(b *testing.B) {
	db, err := store.Open(context.Background(), testkit.StartPostgres(b).NewDatabase(b))
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	pg := db.RegistryGate()
	defer pg.Close()
	for name, g := range map[string]registry.Gate{"local": &registry.LocalGate{}, "postgres": pg} {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				r, ok, err := g.TryShared(context.Background())
				if err != nil || !ok {
					b.Fatal(ok, err)
				}
				r()
			}
		})
	}
}
