package test

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// kiln serve with its records and queue in PostgreSQL (database:
// postgres://...) does what it does on SQLite: a cold build, a warm
// rebuild of the same scope, a dedup answer, an event stream read and
// resumed, a cancel, and a kill -9 mid-build whose build the restarted
// server reruns from the records in Postgres.
func TestServerOnPostgres(t *testing.T) {
	// The test server trusts loopback, so any password is accepted; kiln
	// must never show it.
	dsn := strings.Replace(testkit.Postgres(t), "kiln@", "kiln:pg-s3cret@", 1)
	s := startServer(t, withArgs("--database", dsn, "--max-concurrent-builds", "1"))
	t.Cleanup(func() {
		if strings.Contains(s.logs(), "pg-s3cret") {
			t.Errorf("the server log shows the database password")
		}
	})
	if !strings.Contains(s.logs(), "database=postgres://127.0.0.1:") {
		t.Errorf("the log does not name the PostgreSQL database:\n%s", s.logs())
	}
	if _, err := os.Stat(filepath.Join(s.data, "kiln.db")); err == nil {
		t.Errorf("a SQLite database was created next to PostgreSQL")
	}

	base := s.base()
	tenant := s.token("alice", "tenant-a", "build:read", "build:write", "image:read")
	df := cacheDockerfile(base)
	cold := mustSucceed(t, s, tenant, s.build(tenant, submission{
		files: map[string]string{"Dockerfile": df}, fields: [][2]string{{"build_args", `{"STAMP":"pg-1"}`}},
	}))
	if cold.StepsCached != 0 {
		t.Errorf("cold build: steps_cached = %d, want 0", cold.StepsCached)
	}
	warmSub := submission{files: map[string]string{"Dockerfile": df}, fields: [][2]string{{"build_args", `{"STAMP":"pg-2"}`}, {"tags", "app:1"}}}
	warm := mustSucceed(t, s, tenant, s.build(tenant, warmSub))
	if warm.StepsCached == 0 || !strings.Contains(s.logText(tenant, warm.Id), "before: pg-1") {
		t.Errorf("warm rebuild was not warm (steps_cached %d):\n%s", warm.StepsCached, s.logText(tenant, warm.Id))
	}

	// An identical submission is answered at once from the warm build.
	again := s.build(tenant, warmSub)
	if again.Status != api.BuildStatusSucceeded || again.DedupOf == nil || *again.DedupOf != warm.Id {
		t.Fatalf("identical resubmission: status %s dedup_of %v, want succeeded from %s", again.Status, again.DedupOf, warm.Id)
	}

	// The event stream: read in parts, resumed by Last-Event-ID, equals
	// the whole replay.
	first, ended := readSSE(t, s, tenant, warm.Id, 0, 4)
	if ended || len(first) != 4 {
		t.Fatalf("first part of the stream: %d events, ended %v", len(first), ended)
	}
	rest, ended := readSSE(t, s, tenant, warm.Id, first[3].id, 100000)
	all, _ := readSSE(t, s, tenant, warm.Id, 0, 100000)
	got := append(first, rest...)
	if !ended || len(got) != len(all) || got[len(got)-1].kind != "end" {
		t.Fatalf("resumed stream has %d events (ended %v), the replay %d", len(got), ended, len(all))
	}
	for i := range all {
		if got[i] != all[i] || all[i].id != int64(i+1) {
			t.Fatalf("event %d: resumed %+v, replay %+v", i, got[i], all[i])
		}
	}

	// Cancel a running build.
	slow := s.build(tenant, submission{files: map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN sleep 300\n", base)}})
	s.waitStatus(tenant, slow.Id, api.BuildStatusRunning, time.Minute)
	var canceled api.Build
	s.doJSON(tenant, "POST", "/v1/builds/"+slow.Id+"/cancel", nil, http.StatusOK, &canceled)
	if canceled.Status != api.BuildStatusCanceled {
		t.Fatalf("canceled build has status %s", canceled.Status)
	}

	// kill -9 mid-build: the restarted server finds the build running in
	// Postgres, requeues it and runs it again.
	crash := s.build(tenant, submission{files: map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN sleep 4 && echo finished > /f\n", base)}})
	s.waitStatus(tenant, crash.Id, api.BuildStatusRunning, time.Minute)
	time.Sleep(time.Second)
	s.kill9()
	s.start(s.addr)
	mustSucceed(t, s, tenant, api.Build{Id: crash.Id})
	if log := s.logText(tenant, crash.Id); !strings.Contains(log, "restarted while this build was running") {
		t.Errorf("log does not say the build was rerun after a restart:\n%s", log)
	}
	// What the first process recorded is all there.
	if b := s.get(tenant, again.Id); b.DedupOf == nil || *b.DedupOf != warm.Id {
		t.Errorf("after the restart the dedup build reads %+v", b)
	}
	if b := s.get(tenant, slow.Id); b.Status != api.BuildStatusCanceled {
		t.Errorf("after the restart the canceled build is %s", b.Status)
	}
	var images api.ImageList
	s.doJSON(tenant, "GET", "/v1/images", nil, http.StatusOK, &images)
	found := false
	for _, im := range images.Images {
		found = found || im.Name == "tenant-a/app:1"
	}
	if !found {
		t.Errorf("images after the restart lack tenant-a/app:1: %+v", images.Images)
	}
}
