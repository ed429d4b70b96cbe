package server_test

import (
	"bufio"
	"context"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/config"
)

// openStream opens the build's event stream and holds it until the
// returned function is called.
func (k *kiln) openStream(id string) (closeStream func()) {
	k.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, k.url+"/v1/builds/"+id+"/events", nil)
	req.Header.Set("Authorization", "Bearer "+k.admin)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		k.t.Fatalf("open events of %s: %v", id, err)
	}
	if resp.StatusCode != http.StatusOK {
		cancel()
		k.t.Fatalf("open events of %s: %d", id, resp.StatusCode)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
		}
	}()
	return func() {
		cancel()
		resp.Body.Close()
		wg.Wait()
	}
}

// still asserts build id stays running (or queued) for d.
func (k *kiln) still(id string, d time.Duration) {
	k.t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		var b api.Build
		k.json(k.admin, "GET", "/v1/builds/"+id, nil, http.StatusOK, &b)
		if b.Status != api.BuildStatusRunning && b.Status != api.BuildStatusQueued {
			k.t.Fatalf("build %s is %s (%v); it should still run", id, b.Status, b.Error)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// An attached build (attach=true, what kiln build sends unless --detach)
// is canceled once no event stream has been open for it for longer than
// builds.client_gone_after, as buildx cancels a build whose session
// closed; an open stream, or one reopened within the window, keeps it; a
// build submitted without attach runs regardless of watchers.
func TestAttachedBuildCanceledWhenClientGoes(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) {
		c.BuildsClientGoneAfter = time.Second
		c.MaxConcurrent = 8
	})
	hold := func(attach bool) api.Build {
		f := [][2]string{{"build_args", `{"HOLD":"1","N":"` + unique("n") + `"}`}}
		if attach {
			f = append(f, [2]string{"attach", "true"})
		}
		return k.submitAs(k.admin, f...)
	}

	gone := hold(true)
	watched := hold(true)
	closeWatched := k.openStream(watched.Id)
	detached := hold(false)
	reconnecting := hold(true)
	explicitFalse := k.submitAs(k.admin, [2]string{"build_args", `{"HOLD":"1","N":"x"}`}, [2]string{"attach", "false"})

	// The stream of the reconnecting client drops every 600ms and comes
	// back after 300ms: never a whole window without one.
	stopReconnecting := make(chan struct{})
	reconnected := make(chan struct{})
	go func() {
		defer close(reconnected)
		for {
			c := k.openStream(reconnecting.Id)
			select {
			case <-stopReconnecting:
				c()
				return
			case <-time.After(600 * time.Millisecond):
			}
			c()
			time.Sleep(300 * time.Millisecond)
		}
	}()

	start := time.Now()
	b := k.awaitStatus(gone.Id, api.BuildStatusCanceled)
	if waited := time.Since(start); waited > 5*time.Second {
		t.Errorf("the build was canceled after %s; the window is 1s", waited)
	}
	want := "the client that submitted this build went away (no event stream for 1s); use --detach to let builds outlive their client"
	if b.Error == nil || *b.Error != want {
		t.Errorf("error = %v, want %q", b.Error, want)
	}
	code, logs := k.call(k.admin, "GET", "/v1/builds/"+gone.Id+"/logs", nil, "")
	if code != http.StatusOK || !strings.Contains(string(logs), "canceled: "+want) {
		t.Errorf("logs (%d) lack the reason:\n%s", code, logs)
	}

	for _, id := range []string{watched.Id, detached.Id, reconnecting.Id, explicitFalse.Id} {
		k.still(id, 0)
	}
	k.still(watched.Id, 1500*time.Millisecond)
	for _, id := range []string{detached.Id, reconnecting.Id, explicitFalse.Id} {
		k.still(id, 0)
	}
	close(stopReconnecting)
	<-reconnected

	// The watcher of watched goes away too: canceled a window later.
	closeWatched()
	k.awaitStatus(watched.Id, api.BuildStatusCanceled)
	k.awaitStatus(reconnecting.Id, api.BuildStatusCanceled)
	k.still(detached.Id, 0)
	k.still(explicitFalse.Id, 0)
	for _, id := range []string{detached.Id, explicitFalse.Id} {
		k.json(k.admin, "POST", "/v1/builds/"+id+"/cancel", nil, http.StatusOK, nil)
	}
}

// attach must be a boolean, and the window can be turned off.
func TestAttachFieldChecked(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) { c.BuildsClientGoneAfter = 0 })
	body, ct := submission([2]string{"attach", "maybe"})
	code, resp := k.call(k.admin, "POST", "/v1/builds", body, ct)
	if code != http.StatusBadRequest || !strings.Contains(string(resp), "field attach") {
		t.Fatalf("attach=maybe: %d %s", code, resp)
	}
	b := k.submitAs(k.admin, [2]string{"build_args", `{"HOLD":"1"}`}, [2]string{"attach", "true"})
	k.awaitStatus(b.Id, api.BuildStatusRunning)
	k.still(b.Id, 1200*time.Millisecond)
	k.json(k.admin, "POST", "/v1/builds/"+b.Id+"/cancel", nil, http.StatusOK, nil)
}
