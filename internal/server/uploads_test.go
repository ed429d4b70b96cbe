package server

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func mustAcquire(t *testing.T, u *uploadSlots, tenant string) func() {
	t.Helper()
	release, err := u.acquire(tenant)
	if err != nil {
		t.Fatalf("acquire(%q): %v", tenant, err)
	}
	return release
}

func wantRefused(t *testing.T, u *uploadSlots, tenant, scope string, limit int) {
	t.Helper()
	release, err := u.acquire(tenant)
	var tm *tooManyUploadsError
	if !errors.As(err, &tm) {
		if release != nil {
			release()
		}
		t.Fatalf("acquire(%q) = %v, want a %s limit error", tenant, err, scope)
	}
	if tm.Scope != scope || tm.Limit != limit || tm.RetryAfter <= 0 {
		t.Fatalf("acquire(%q) refused with %+v, want scope %s limit %d", tenant, tm, scope, limit)
	}
}

func TestUploadSlotsPerTenantLimitIsPerTenant(t *testing.T) {
	u := newUploadSlots(0, 2)
	a1 := mustAcquire(t, u, "alice")
	mustAcquire(t, u, "alice")
	wantRefused(t, u, "alice", "tenant", 2)
	// Alice being full does not affect Bob.
	mustAcquire(t, u, "bob")
	mustAcquire(t, u, "bob")
	wantRefused(t, u, "bob", "tenant", 2)
	a1()
	mustAcquire(t, u, "alice")
}

func TestUploadSlotsGlobalLimitAcrossTenants(t *testing.T) {
	u := newUploadSlots(3, 2)
	a := mustAcquire(t, u, "alice")
	mustAcquire(t, u, "bob")
	mustAcquire(t, u, "carol")
	wantRefused(t, u, "dave", "global", 3)
	a()
	mustAcquire(t, u, "dave")
	wantRefused(t, u, "alice", "global", 3)
}

func TestUploadSlotsUnlimited(t *testing.T) {
	u := newUploadSlots(0, -1)
	for range 1000 {
		mustAcquire(t, u, "alice")
	}
}

func TestUploadSlotsReleaseIdempotent(t *testing.T) {
	u := newUploadSlots(1, 1)
	release := mustAcquire(t, u, "alice")
	release()
	release()
	// A second release must not have freed a phantom slot.
	mustAcquire(t, u, "alice")
	wantRefused(t, u, "alice", "tenant", 1)
	wantRefused(t, u, "bob", "global", 1)
}

// Many goroutines acquiring and releasing never exceed either limit, and
// every slot comes back.
func TestUploadSlotsConcurrent(t *testing.T) {
	const global, perTenant = 5, 2
	tenants := []string{"a", "b", "c", "d"}
	u := newUploadSlots(global, perTenant)
	var total atomic.Int32
	per := make([]atomic.Int32, len(tenants))
	var granted, refused atomic.Int64
	var wg sync.WaitGroup
	for g := range 40 {
		wg.Go(func() {
			i := g % len(tenants)
			for range 200 {
				release, err := u.acquire(tenants[i])
				if err != nil {
					var tm *tooManyUploadsError
					if !errors.As(err, &tm) {
						t.Errorf("unexpected error %v", err)
						return
					}
					refused.Add(1)
					continue
				}
				granted.Add(1)
				if n := total.Add(1); n > global {
					t.Errorf("%d uploads in flight, global limit %d", n, global)
				}
				if n := per[i].Add(1); n > perTenant {
					t.Errorf("tenant %s has %d uploads in flight, limit %d", tenants[i], n, perTenant)
				}
				time.Sleep(10 * time.Microsecond)
				per[i].Add(-1)
				total.Add(-1)
				release()
				release() // concurrent double release must stay harmless
			}
		})
	}
	wg.Wait()
	if granted.Load() == 0 || refused.Load() == 0 {
		t.Errorf("granted %d, refused %d: the test did not exercise both paths", granted.Load(), refused.Load())
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.total != 0 || len(u.byTenant) != 0 {
		t.Errorf("after all releases: total %d, per tenant %v; want all zero", u.total, u.byTenant)
	}
}

func TestTooManyUploadsErrorMessage(t *testing.T) {
	for _, e := range []*tooManyUploadsError{
		{Scope: "tenant", Limit: 2, RetryAfter: 5 * time.Second},
		{Scope: "global", Limit: 64, RetryAfter: 5 * time.Second},
	} {
		msg := e.Error()
		for _, want := range []string{e.Scope, "wait for your other uploads to finish or retry in 5 s"} {
			if e.Scope == "global" && want == "global" {
				want = "the server already has 64"
			}
			if !strings.Contains(msg, want) {
				t.Errorf("%q does not say %q", msg, want)
			}
		}
	}
}

func TestWriteTooManyUploads(t *testing.T) {
	for _, c := range []struct {
		after time.Duration
		want  string
	}{
		{5 * time.Second, "5"},
		{1500 * time.Millisecond, "2"}, // rounds up: retrying early just fails again
		{0, "1"},                       // never 0, which would invite a hot loop
	} {
		e := &tooManyUploadsError{Scope: "tenant", Limit: 2, RetryAfter: c.after}
		rec := httptest.NewRecorder()
		writeTooMany(rec, e)
		if rec.Code != http.StatusTooManyRequests {
			t.Errorf("status %d, want 429", rec.Code)
		}
		if got := rec.Header().Get("Retry-After"); got != c.want {
			t.Errorf("RetryAfter %s: Retry-After %q, want %q", c.after, got, c.want)
		}
		if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q", ct)
		}
		var body struct{ Error, Code string }
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
			t.Fatalf("%v in %s", err, rec.Body)
		}
		if body.Code != "too_many_uploads" || body.Error != e.Error() {
			t.Errorf("body %+v, want code too_many_uploads and error %q", body, e.Error())
		}
	}
}
