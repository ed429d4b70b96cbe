package builds

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/store"
)

func TestBuildRunsToEachOutcomeWithOneEnd(t *testing.T) {
	f := newFixture(t, 2)
	s, _ := f.service()
	p := principal("a")
	ok, err := submit(t, s, p, script("ok", 1))
	if err != nil {
		t.Fatal(err)
	}
	failed, err := submit(t, s, principal("b"), script("fail", 2))
	if err != nil {
		t.Fatal(err)
	}
	if b := waitStatus(t, s, ok.ID, store.StatusSucceeded); b.ImageDigest == "" {
		t.Errorf("succeeded build has no image digest")
	}
	if b := waitStatus(t, s, failed.ID, store.StatusFailed); !strings.Contains(b.Error, "scripted failure") {
		t.Errorf("failed build's error = %q, want the runtime's", b.Error)
	}
	endings(t, s, ok.ID)
	endings(t, s, failed.ID)
}

func TestCancelWhileQueuedRunningAndAfter(t *testing.T) {
	f := newFixture(t, 1)
	s, _ := f.service()
	p := principal("a")

	running, err := submit(t, s, principal("r"), script("hold", 1))
	if err != nil {
		t.Fatal(err)
	}
	f.started(running.ID)
	// The only slot is taken: this one waits in the queue.
	queued, err := submit(t, s, principal("q"), script("ok", 2))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, s, queued.ID, "a place in the slot line", func(b Build) bool { return b.Phase == "waiting for a build slot" })

	b, err := s.Cancel(context.Background(), p, queued.ID)
	if err != nil || b.Status != store.StatusCanceled {
		t.Fatalf("cancel while queued: %v, %s", err, b.Status)
	}
	b, err = s.Cancel(context.Background(), p, running.ID)
	if err != nil || b.Status != store.StatusCanceled {
		t.Fatalf("cancel while running: %v, %s", err, b.Status)
	}
	// After the end: the final state, as a conflict.
	b, err = s.Cancel(context.Background(), p, running.ID)
	if !errors.Is(err, ErrFinished) || !errors.Is(err, errdefs.ErrConflict) || b.Status != store.StatusCanceled {
		t.Fatalf("cancel after the end: %v, %s; want ErrFinished (a conflict) with the final state", err, b.Status)
	}
	// The canceled queued build never runs, even once the slot is free.
	done, err := submit(t, s, principal("z"), script("ok", 3))
	if err != nil {
		t.Fatal(err)
	}
	waitStatus(t, s, done.ID, store.StatusSucceeded)
	if slices.Contains(f.rt.startOrder(), queued.ID) {
		t.Errorf("a build canceled while queued was run")
	}
	for _, id := range []string{running.ID, queued.ID, done.ID} {
		endings(t, s, id)
	}
	// Another tenant cannot cancel, nor learn the build exists.
	other := principal("x")
	other.Tenant, other.CacheScope = "team-b", "team-b"
	if _, err := s.Cancel(context.Background(), other, done.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("another tenant's cancel: %v, want not found", err)
	}
}

// A cancel racing the run's own ending, or its start, ends the build
// exactly once, whichever wins.
func TestCancelRacingRunEndsOnce(t *testing.T) {
	f := newFixture(t, 4)
	s, _ := f.service()
	var wg sync.WaitGroup
	var ids []string
	for i := range 24 {
		b, err := submit(t, s, principal("race"+string(rune('a'+i%6))), script("ok", i))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, b.ID)
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Some of these land while queued, some while running, some
			// after the end.
			if _, err := s.Cancel(context.Background(), principal("any"), b.ID); err != nil && !errors.Is(err, ErrFinished) {
				t.Errorf("cancel %s: %v", b.ID, err)
			}
		}()
	}
	wg.Wait()
	for _, id := range ids {
		b := waitFor(t, s, id, "its end", func(b Build) bool { return store.Terminal(b.Status) })
		if b.Status != store.StatusCanceled && b.Status != store.StatusSucceeded {
			t.Errorf("build %s ended %s (%s)", id, b.Status, b.Error)
		}
		endings(t, s, id)
	}
}

// A server stopped with builds running or queued requeues them when it
// starts again on the same store; a build with secrets cannot be rerun
// (they were in memory) and fails saying so.
func TestRestartRequeuesOrFailsWithTheReason(t *testing.T) {
	f := newFixture(t, 1)
	s1, stop1 := f.service()
	running, err := submit(t, s1, principal("a"), script("gate:restart", 1))
	if err != nil {
		t.Fatal(err)
	}
	f.started(running.ID)
	queued, err := submit(t, s1, principal("b"), script("ok", 2))
	if err != nil {
		t.Fatal(err)
	}
	secretReq := script("ok", 3)
	secretReq.Secrets = map[string][]byte{"npm": []byte("token")}
	secret, err := submit(t, s1, principal("c"), secretReq)
	if err != nil {
		t.Fatal(err)
	}
	stop1()
	for _, id := range []string{running.ID, queued.ID, secret.ID} {
		if b, _ := store.GetBuild(context.Background(), f.db.SQL, id); store.Terminal(b.Status) {
			t.Fatalf("build %s is %s after a shutdown; a shutdown must leave it for the next start", id, b.Status)
		}
	}

	f.rt.open("restart")
	s2, _ := f.service()
	r := waitStatus(t, s2, running.ID, store.StatusSucceeded)
	if r.Attempt != 2 {
		t.Errorf("the interrupted build ran as attempt %d, want 2", r.Attempt)
	}
	waitStatus(t, s2, queued.ID, store.StatusSucceeded)
	b := waitStatus(t, s2, secret.ID, store.StatusFailed)
	if !strings.Contains(b.Error, "secrets") || !strings.Contains(b.Error, "submit it again") {
		t.Errorf("the build with secrets failed with %q, want the reason", b.Error)
	}
	if slices.Contains(f.rt.startOrder(), secret.ID) {
		t.Errorf("the build with secrets ran without them")
	}
	evs, _ := s2.Events(context.Background(), running.ID, 0, 1000)
	var told bool
	for _, e := range evs {
		told = told || strings.Contains(e.Event.Message, "restarted while this build was running")
	}
	if !told {
		t.Errorf("the requeued build's events do not say it was requeued")
	}
	for _, id := range []string{running.ID, queued.ID, secret.ID} {
		endings(t, s2, id)
	}
}

// Builds waiting for a slot start in the order they got in line, never
// more than max_concurrent_builds at once.
func TestQueueOrderUpToMaxConcurrent(t *testing.T) {
	const maxC = 2
	f := newFixture(t, maxC)
	s, _ := f.service()
	var ids []string
	for i := range 6 {
		b, err := submit(t, s, principal("q"+string(rune('a'+i))), script("gate:q"+string(rune('a'+i)), i))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, b.ID)
		if i < maxC {
			f.started(b.ID)
		} else {
			waitFor(t, s, b.ID, "a place in the slot line", func(b Build) bool { return b.Phase == "waiting for a build slot" })
		}
	}
	for i := range 6 {
		pos, err := s.QueuePosition(context.Background(), mustGet(t, s, ids[i]))
		if err != nil {
			t.Fatal(err)
		}
		if want := max(0, i-maxC+1); pos != want {
			t.Errorf("build %d: queue position %d, want %d", i, pos, want)
		}
	}
	for i := range 6 {
		f.rt.open("q" + string(rune('a'+i)))
		waitStatus(t, s, ids[i], store.StatusSucceeded)
	}
	if got := f.rt.startOrder(); !slices.Equal(got, ids) {
		t.Errorf("start order %v, want submission order %v", got, ids)
	}
	if f.rt.maxRunning > maxC {
		t.Errorf("%d builds ran at once, max_concurrent_builds is %d", f.rt.maxRunning, maxC)
	}
}

func readOnly() auth.Principal {
	p := principal("a")
	p.Scopes = []auth.Scope{auth.ScopeBuildRead}
	return p
}

func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

func mustGet(t *testing.T, s *Service, id string) Build {
	t.Helper()
	b, err := store.GetBuild(context.Background(), s.db.SQL, id)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Refused submissions record nothing and leave no context behind.
func TestRefusedSubmissionsRecordNothing(t *testing.T) {
	f := newFixture(t, 1)
	s, _ := f.service()
	for _, c := range []struct {
		name  string
		req   Request
		p     func() auth.Principal
		field string
		class error
	}{
		{"bad build arg", Request{BuildArgs: map[string]string{"1x": "y"}}, nil, `build arg name "1x"`, errdefs.ErrInvalid},
		{"over the cpu cap", Request{CPUs: 64}, nil, "cpus", errdefs.ErrInvalid},
		{"unknown network", Request{Network: "host"}, nil, "network", errdefs.ErrInvalid},
		{"unknown call", Request{Call: "lint"}, nil, "call", errdefs.ErrInvalid},
		{"bad secret id", Request{Secrets: map[string][]byte{"a b": nil}}, nil, "secret id", errdefs.ErrInvalid},
		{"missing target", Request{Target: "nope"}, nil, "target", errdefs.ErrInvalid},
		{"foreign cache scope", Request{CacheScope: "team-b"}, nil, "cache_scope", errdefs.ErrForbidden},
		{"global cache without admin", Request{GlobalCache: true, GlobalCacheKey: "k"}, nil, "global_cache", errdefs.ErrForbidden},
		{"no build:write", Request{}, readOnly, "build:write", errdefs.ErrForbidden},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := principal("a")
			if c.p != nil {
				p = c.p()
			}
			_, err := submit(t, s, p, c.req)
			if !errors.Is(err, c.class) || !strings.Contains(err.Error(), c.field) {
				t.Fatalf("err = %v, want %v naming %q", err, c.class, c.field)
			}
		})
	}
	if all, err := store.ListBuilds(context.Background(), s.db.SQL, store.ListFilter{}); err != nil || len(all) != 0 {
		t.Errorf("refused submissions recorded %d builds (%v)", len(all), err)
	}
	if left := dirEntries(t, contextsDir(f.data)); len(left) != 0 {
		t.Errorf("refused submissions left contexts behind: %v", left)
	}
}
