package server

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// uploadRetryAfter is the Retry-After a refused upload gets: about how long
// a typical build context takes to arrive, so a slot has likely freed.
const uploadRetryAfter = 5 * time.Second

// uploadSlots bounds build-context uploads in flight, globally and per
// tenant. Each upload holds a spool file, a connection and some memory until
// it is done; without a bound one tenant could exhaust them for everyone.
// acquire never waits: a queued upload would still hold its connection, so
// refusing with 429 and Retry-After is the cheaper answer for both sides.
type uploadSlots struct {
	global, perTenant int // <= 0: unlimited
	retryAfter        time.Duration

	mu       sync.Mutex
	total    int
	byTenant map[string]int
}

func newUploadSlots(global, perTenant int) *uploadSlots {
	return &uploadSlots{global: global, perTenant: perTenant, retryAfter: uploadRetryAfter, byTenant: map[string]int{}}
}

// acquire takes a slot for tenant or says which limit is full. release
// is safe to call more than once, so callers can both defer it and call it
// early once the body is spooled.
func (u *uploadSlots) acquire(tenant string) (release func(), err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	// The tenant check comes first: it is the one the caller can fix.
	if u.perTenant > 0 && u.byTenant[tenant] >= u.perTenant {
		return nil, &tooManyUploadsError{Scope: "tenant", Limit: u.perTenant, RetryAfter: u.retryAfter}
	}
	if u.global > 0 && u.total >= u.global {
		return nil, &tooManyUploadsError{Scope: "global", Limit: u.global, RetryAfter: u.retryAfter}
	}
	u.total++
	u.byTenant[tenant]++
	var once sync.Once
	return func() {
		once.Do(func() {
			u.mu.Lock()
			defer u.mu.Unlock()
			u.total--
			// Delete at zero so the map does not grow with every tenant ever seen.
			if u.byTenant[tenant]--; u.byTenant[tenant] == 0 {
				delete(u.byTenant, tenant)
			}
		})
	}, nil
}

// tooManyUploadsError says an upload was refused because a limit was full.
type tooManyUploadsError struct {
	Scope      string // "global" or "tenant"
	Limit      int
	RetryAfter time.Duration
}

func (e *tooManyUploadsError) Error() string {
	secs := retryAfterSeconds(e.RetryAfter)
	if e.Scope == "tenant" {
		return fmt.Sprintf("your tenant already has %d build context uploads in progress, the most allowed; wait for your other uploads to finish or retry in %d s", e.Limit, secs)
	}
	return fmt.Sprintf("the server already has %d build context uploads in progress, the most it accepts; wait for your other uploads to finish or retry in %d s", e.Limit, secs)
}

// writeTooMany answers 429 with Retry-After so clients and proxies back off
// on their own.
func writeTooMany(w http.ResponseWriter, e *tooManyUploadsError) {
	w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(e.RetryAfter)))
	writeError(w, http.StatusTooManyRequests, "too_many_uploads", e.Error())
}

// retryAfterSeconds rounds up: Retry-After is whole seconds, and 0 would
// invite an immediate retry.
func retryAfterSeconds(d time.Duration) int {
	return max(int(math.Ceil(d.Seconds())), 1)
}
