package server_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

// submitAs posts a build and returns the answer.
func (k *kiln) submitAs(token string, fields ...[2]string) api.Build {
	k.t.Helper()
	body, ct := submission(fields...)
	code, resp := k.call(token, "POST", "/v1/builds", body, ct)
	if code != http.StatusAccepted {
		k.t.Fatalf("submit: %d %s", code, resp)
	}
	var b api.Build
	json.Unmarshal(resp, &b)
	return b
}

func (k *kiln) awaitStatus(id string, want ...api.BuildStatus) api.Build {
	k.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var b api.Build
		k.json(k.admin, "GET", "/v1/builds/"+id, nil, http.StatusOK, &b)
		for _, w := range want {
			if b.Status == w {
				return b
			}
		}
		if time.Now().After(deadline) {
			k.t.Fatalf("build %s is %s (%s), want %v", id, b.Status, b.Phase, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Identical builds submitted while one is in flight run once: they wait
// for it, holding nothing, and take its result; within a tenant (and its
// trust group), as dedup. If the one in flight fails or is canceled, a
// waiting build runs itself.
func TestIdenticalBuildsInFlightRunOnce(t *testing.T) {
	k := startKiln(t)
	a := k.token("tenant-a", "build:write")
	b := k.token("tenant-b", "build:write")
	g1, g2, g3 := unique("gate"), unique("gate"), unique("gate")
	args := [2]string{"build_args", `{"GATE":"` + g1 + `"}`}
	leader := k.submitAs(a, args)
	k.awaitStatus(leader.Id, api.BuildStatusRunning)
	f1 := k.submitAs(a, args)
	f2 := k.submitAs(a, args)
	other := k.submitAs(b, args) // another tenant never follows
	k.awaitStatus(other.Id, api.BuildStatusRunning)
	for _, f := range []api.Build{f1, f2} {
		deadline := time.Now().Add(10 * time.Second)
		for got := k.awaitStatus(f.Id, api.BuildStatusQueued); !strings.Contains(got.Phase, "waiting for identical build "+leader.Id); got = k.awaitStatus(f.Id, api.BuildStatusQueued) {
			if time.Now().After(deadline) {
				t.Fatalf("build %s is in phase %q, want it waiting for %s", f.Id, got.Phase, leader.Id)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	close(gate(g1))
	done := k.awaitStatus(leader.Id, api.BuildStatusSucceeded)
	for _, f := range []api.Build{f1, f2} {
		got := k.awaitStatus(f.Id, api.BuildStatusSucceeded, api.BuildStatusFailed)
		if got.Status != api.BuildStatusSucceeded || got.DedupOf == nil || *got.DedupOf != leader.Id || *got.ImageDigest != *done.ImageDigest {
			t.Errorf("follower %s: %s dedup_of %v digest %v, want %s's result", f.Id, got.Status, got.DedupOf, got.ImageDigest, leader.Id)
		}
		if _, ran := jobs.Load(f.Id); ran {
			t.Errorf("follower %s ran on the runtime", f.Id)
		}
	}
	if got := k.awaitStatus(other.Id, api.BuildStatusSucceeded); got.DedupOf != nil {
		t.Errorf("tenant-b's identical build was answered by %s", *got.DedupOf)
	}

	// The leader is canceled: its follower builds itself.
	args2 := [2]string{"build_args", `{"GATE":"` + g2 + `"}`}
	leader2 := k.submitAs(a, args2)
	k.awaitStatus(leader2.Id, api.BuildStatusRunning)
	f3 := k.submitAs(a, args2)
	k.json(a, "POST", "/v1/builds/"+leader2.Id+"/cancel", nil, http.StatusOK, nil)
	k.awaitStatus(f3.Id, api.BuildStatusRunning)
	close(gate(g2))
	if got := k.awaitStatus(f3.Id, api.BuildStatusSucceeded); got.DedupOf != nil {
		t.Errorf("the follower of a canceled build: dedup_of %v, want it built itself", *got.DedupOf)
	}

	// A waiting follower can be canceled like any queued build.
	args3 := [2]string{"build_args", `{"GATE":"` + g3 + `"}`}
	leader3 := k.submitAs(a, args3)
	k.awaitStatus(leader3.Id, api.BuildStatusRunning)
	f4 := k.submitAs(a, args3)
	k.json(a, "POST", "/v1/builds/"+f4.Id+"/cancel", nil, http.StatusOK, nil)
	close(gate(g3))
	k.awaitStatus(leader3.Id, api.BuildStatusSucceeded)
	if got := k.awaitStatus(f4.Id, api.BuildStatusCanceled, api.BuildStatusSucceeded); got.Status != api.BuildStatusCanceled {
		t.Errorf("a canceled follower ended %s", got.Status)
	}
}

// Identical submissions arriving together elect exactly one leader.
func TestIdenticalSubmissionsAtOnceRunOnce(t *testing.T) {
	k := startKiln(t)
	a := k.token("tenant-a", "build:write")
	g := unique("gate")
	args := [2]string{"build_args", `{"GATE":"` + g + `"}`}
	ids := make(chan string, 3)
	for range 3 {
		go func() {
			body, ct := submission(args)
			code, resp := k.call(a, "POST", "/v1/builds", body, ct)
			var b api.Build
			json.Unmarshal(resp, &b)
			if code != http.StatusAccepted {
				t.Errorf("submit: %d %s", code, resp)
			}
			ids <- b.Id
		}()
	}
	var all []string
	for range 3 {
		all = append(all, <-ids)
	}
	time.Sleep(300 * time.Millisecond) // let the queue start whatever would run
	close(gate(g))
	ran := 0
	for _, id := range all {
		k.awaitStatus(id, api.BuildStatusSucceeded)
		if _, ok := jobs.Load(id); ok {
			ran++
		}
	}
	if ran != 1 {
		t.Errorf("%d of 3 identical builds submitted together ran, want 1", ran)
	}
}
