package test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// The same user-visible behaviour on both storage backends: SQLite and
// the registry on the local filesystem (the embedded defaults), and
// PostgreSQL for records and queue with the registry in an S3 bucket.
// One server per backend runs, in order: a cold build, a warm rebuild,
// a dedup answer, an event stream resumed after disconnects, a cancel, a
// base image through kiln's mirror, output export, registry GC, and the
// root filesystem `kiln run` boots (booting it too, unless -short).
func TestBackends(t *testing.T) {
	for _, bk := range []struct {
		name  string
		store func(t *testing.T) serverOpt
		check func(t *testing.T, s *server)
	}{
		{
			name:  "sqlite+filesystem",
			store: func(*testing.T) serverOpt { return withArgs() },
			check: func(t *testing.T, s *server) {
				for _, p := range []string{"kiln.db", "registry"} {
					if _, err := os.Stat(filepath.Join(s.data, p)); err != nil {
						t.Errorf("the embedded defaults made no %s: %v", p, err)
					}
				}
			},
		},
		{
			name:  "postgres+s3",
			store: func(t *testing.T) serverOpt { return withPostgresAndS3(t) },
			check: func(t *testing.T, s *server) {
				if !strings.Contains(s.logs(), "database=postgres://127.0.0.1:") {
					t.Errorf("the log does not name the PostgreSQL database:\n%s", s.logs())
				}
				for _, p := range []string{"kiln.db", "registry"} {
					if _, err := os.Stat(filepath.Join(s.data, p)); !os.IsNotExist(err) {
						t.Errorf("%s exists next to PostgreSQL and S3: %v", p, err)
					}
				}
			},
		},
	} {
		t.Run(bk.name, func(t *testing.T) {
			start := time.Now()
			upstream := testkit.Registry(t)
			opts := []serverOpt{bk.store(t), withArgs("--sse-heartbeat", "250ms",
				"--mirror-endpoints", fmt.Sprintf(`{"docker.io":"http://%s"}`, upstream))}
			if !testing.Short() {
				opts = append(opts, withArgs("--builder-image", testkit.BuilderImage(t).Dir))
			}
			s := startServer(t, opts...)
			t.Cleanup(func() { t.Logf("%s: %s", bk.name, time.Since(start).Round(100*time.Millisecond)) })
			bk.check(t, s)
			representativeSet(t, s, bk.name, upstream)
		})
	}
}

// on points s's helpers (which fail s.t) at subtest t while it runs.
func (s *server) on(t *testing.T) *server {
	prev := s.t
	s.t = t
	t.Cleanup(func() { s.t = prev })
	return s
}

func representativeSet(t *testing.T, srv *server, backend, upstream string) {
	base := srv.base()
	tenant := srv.token("alice", "tenant-a", "build:read", "build:write", "image:read")
	df := cacheDockerfile(base)
	stamp := func(n int) [2]string { return [2]string{"build_args", fmt.Sprintf(`{"STAMP":"%s-%d"}`, backend, n)} }
	appSub := submission{files: map[string]string{"Dockerfile": df}, fields: [][2]string{stamp(2), {"tags", "app:1"}}}
	var warm api.Build
	needWarm := func(t *testing.T) {
		if warm.Id == "" {
			t.Skip("needs the warm build")
		}
	}

	t.Run("cold build", func(t *testing.T) {
		s := srv.on(t)
		cold := mustSucceed(t, s, tenant, s.build(tenant, submission{files: map[string]string{"Dockerfile": df}, fields: [][2]string{stamp(1)}}))
		if cold.StepsCached != 0 || cold.ImageDigest == nil {
			t.Errorf("cold build: steps_cached %d, digest %v", cold.StepsCached, cold.ImageDigest)
		}
	})

	t.Run("warm rebuild", func(t *testing.T) {
		s := srv.on(t)
		b := mustSucceed(t, s, tenant, s.build(tenant, appSub))
		log := s.logText(tenant, b.Id)
		if b.StepsCached == 0 || !strings.Contains(log, "CACHED") || !strings.Contains(log, "before: "+backend+"-1") {
			t.Fatalf("the rebuild was not warm (steps_cached %d):\n%s", b.StepsCached, log)
		}
		warm = b
		if out, err := exec.Command("skopeo", "copy", "--src-tls-verify=false", "--src-creds", "kiln:"+tenant,
			"docker://"+s.addr+"/tenant-a/app:1", "dir:"+t.TempDir()).CombinedOutput(); err != nil {
			t.Errorf("pull tenant-a/app:1 with its layers: %v\n%s", err, out)
		}
	})

	t.Run("dedup answer", func(t *testing.T) {
		needWarm(t)
		s := srv.on(t)
		runs := s.runtimeRuns()
		again := s.build(tenant, appSub)
		if again.Status != api.BuildStatusSucceeded || again.DedupOf == nil || *again.DedupOf != warm.Id ||
			again.ImageDigest == nil || *again.ImageDigest != *warm.ImageDigest {
			t.Errorf("identical resubmission: status %s dedup_of %v, want succeeded at once from %s", again.Status, again.DedupOf, warm.Id)
		}
		if s.runtimeRuns() != runs {
			t.Errorf("the deduplicated build reached the runtime")
		}
	})

	t.Run("event stream resumes", func(t *testing.T) {
		s := srv.on(t)
		b := s.build(tenant, submission{files: map[string]string{"Dockerfile": fmt.Sprintf(
			"FROM %s\nRUN for i in 1 2 3 4 5 6; do echo tick-$i; sleep 0.3; done\n", base)}})
		var got []sseEvent
		reconnects := 0
		for !(len(got) > 0 && got[len(got)-1].kind == "end") {
			if reconnects++; reconnects > 500 {
				t.Fatalf("the stream did not end after %d reconnects (%d events)", reconnects, len(got))
			}
			var last int64
			if len(got) > 0 {
				last = got[len(got)-1].id
			}
			part, _ := readSSE(t, s, tenant, b.Id, last, 4)
			got = append(got, part...)
			if reconnects == 1 {
				// Later pieces arrive live, not only from the records.
				if now := s.get(tenant, b.Id); now.Status != api.BuildStatusQueued && now.Status != api.BuildStatusRunning {
					t.Fatalf("the build was %s before the stream's first piece was read; nothing is left to read live", now.Status)
				}
			}
		}
		replay, _ := readSSE(t, s, tenant, b.Id, 0, 1<<20)
		if len(replay) != len(got) {
			t.Fatalf("read in %d pieces: %d events; the replay has %d", reconnects, len(got), len(replay))
		}
		ticks := ""
		for i, e := range got {
			if e != replay[i] || e.id != int64(i+1) || (e.kind == "end") != (i == len(got)-1) {
				t.Fatalf("event %d: resumed %+v, replay %+v", i+1, e, replay[i])
			}
			if e.kind == "log" {
				ticks += e.data
			}
		}
		if !regexp.MustCompile(`(?s)tick-1.*tick-2.*tick-3.*tick-4.*tick-5.*tick-6`).MatchString(ticks) {
			t.Errorf("the resumed stream lost log lines: %s", ticks)
		}
		if reconnects < 3 {
			t.Errorf("the stream was read in %d pieces; the test wants several", reconnects)
		}
	})

	t.Run("cancel running build", func(t *testing.T) {
		s := srv.on(t)
		slow := s.build(tenant, submission{files: map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN sleep 300\n", base)}})
		s.waitStatus(tenant, slow.Id, api.BuildStatusRunning, time.Minute)
		for deadline := time.Now().Add(time.Minute); !strings.Contains(s.logText(tenant, slow.Id), "sleep 300"); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the build never reached its RUN step:\n%s", s.logText(tenant, slow.Id))
			}
		}
		var canceled api.Build
		s.doJSON(tenant, "POST", "/v1/builds/"+slow.Id+"/cancel", nil, http.StatusOK, &canceled)
		if canceled.Status != api.BuildStatusCanceled {
			t.Fatalf("canceled build has status %s", canceled.Status)
		}
		evs, ended := readSSE(t, s, tenant, slow.Id, 0, 1<<20)
		if !ended {
			t.Fatalf("the canceled build's stream has no end (%d events)", len(evs))
		}
		var end api.Event
		json.Unmarshal([]byte(evs[len(evs)-1].data), &end)
		if end.Build == nil || end.Build.Status != api.BuildStatusCanceled {
			t.Errorf("the end event does not carry the canceled build: %s", evs[len(evs)-1].data)
		}
		if more := eventsAfter(t, s, tenant, slow.Id, evs[len(evs)-1].id, 3); len(more) > 0 {
			t.Errorf("events after the end event: %v", more)
		}
		assertNoLeftovers(t, s.data)
	})

	t.Run("base image through the mirror", func(t *testing.T) {
		s := srv.on(t)
		copyImage(t, "kiln:"+s.admin, base, "", upstream+"/library/busybox:1")
		b := mustSucceed(t, s, tenant, s.build(tenant, submission{files: map[string]string{"Dockerfile": "FROM busybox:1\nRUN echo via-mirror > /m\n"}}))
		if log := s.logText(tenant, b.Id); !strings.Contains(log, "busybox:1@sha256:") || !strings.Contains(log, "kiln's mirror") {
			t.Errorf("the build log does not show the pinned, mirrored base:\n%s", log)
		}
		if !skopeoOK("kiln:"+s.admin, "docker://"+s.addr+"/mirror/docker.io/library/busybox:1") {
			t.Errorf("the base is not in kiln's mirror")
		}
	})

	t.Run("output export", func(t *testing.T) {
		s := srv.on(t)
		dir, out := t.TempDir(), t.TempDir()
		testkit.WriteFiles(t, dir, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo artifact-%s > /artifact\n", base, backend)})
		local, oci := filepath.Join(out, "fs"), filepath.Join(out, "img.tar")
		if log, code := s.kiln(tenant, "build", "--progress", "plain", "-o", "type=local,dest="+local, "-o", "type=oci,dest="+oci, dir); code != 0 {
			t.Fatalf("kiln build -o: exit %d\n%s", code, log)
		}
		if data, err := os.ReadFile(filepath.Join(local, "artifact")); err != nil || string(data) != "artifact-"+backend+"\n" {
			t.Errorf("type=local: artifact = %q, %v", data, err)
		}
		if msg, err := exec.Command("skopeo", "inspect", "oci-archive:"+oci).CombinedOutput(); err != nil {
			t.Errorf("type=oci: skopeo cannot read it: %v\n%s", err, msg)
		}
	})

	t.Run("registry gc", func(t *testing.T) {
		s := srv.on(t)
		random := func(name string) submission {
			return submission{files: map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN head -c 1000000 /dev/urandom > /%s\n", base, name)},
				fields: [][2]string{{"tags", "gc/" + name + ":1"}}}
		}
		gone := mustSucceed(t, s, s.admin, s.build(s.admin, random("gone")))
		mustSucceed(t, s, s.admin, s.build(s.admin, random("kept")))
		var m struct{ Layers []struct{ Digest string } }
		_, body := s.manifest(s.admin, "gc/gone", *gone.ImageDigest)
		json.Unmarshal(body, &m)
		if len(m.Layers) == 0 {
			t.Fatalf("manifest of gc/gone:1 has no layers: %s", body)
		}
		// The layer only gc/gone:1 has, as the registry serves it.
		layer := func() int {
			resp := s.registryGet(s.admin, "gc/gone", "blobs/"+m.Layers[len(m.Layers)-1].Digest, "")
			resp.Body.Close()
			return resp.StatusCode
		}
		for _, name := range []string{"gc/gone:1", "builds/" + gone.Id + ":latest"} {
			resp := s.do(s.admin, "DELETE", "/v1/images/"+name, nil, "")
			resp.Body.Close()
			if resp.StatusCode != http.StatusNoContent {
				t.Fatalf("delete %s: %d", name, resp.StatusCode)
			}
		}
		if code := layer(); code != http.StatusOK {
			t.Fatalf("the deleted image's layer before gc: %d, want 200", code)
		}
		log, code := s.kiln(s.admin, "registry", "gc")
		n := regexp.MustCompile(`deleted (\d+) of \d+ blobs`).FindStringSubmatch(log)
		if code != 0 || n == nil || n[1] != "3" {
			t.Fatalf("kiln registry gc: exit %d, want the deleted image's layer, config and manifest (3 blobs) freed:\n%s", code, log)
		}
		if code := layer(); code != http.StatusNotFound {
			t.Errorf("the deleted image's layer after gc: %d, want 404", code)
		}
		for _, ref := range []string{"gc/kept:1", "base/busybox:latest", "tenant-a/app:1"} {
			if out, err := exec.Command("skopeo", "copy", "--src-tls-verify=false", "--src-creds", "kiln:"+s.admin,
				"docker://"+s.addr+"/"+ref, "dir:"+t.TempDir()).CombinedOutput(); err != nil {
				t.Errorf("pull %s after gc: %v\n%s", ref, err, out)
			}
		}
	})

	t.Run("kiln run", func(t *testing.T) {
		needWarm(t)
		s := srv.on(t)
		if im := s.waitRootFS("tenant-a%2Fapp:1"); im.Rootfs.Status != api.RootFSStatusReady {
			t.Fatalf("root filesystem of tenant-a/app:1: %+v", im.Rootfs)
		}
		if testing.Short() {
			t.Skip("the root filesystem is ready; booting it needs a VM")
		}
		if out, code := s.kiln(s.admin, "run", "tenant-a/app:1", "--", "cat", "/one"); code != 0 || !strings.Contains(out, "layer-one") {
			t.Errorf("kiln run tenant-a/app:1 -- cat /one: exit %d\n%s", code, out)
		}
	})
}

// eventsAfter resumes a build's stream after lastID and reads it until
// the server has sent beats heartbeats, returning the kinds of any events
// it carried.
func eventsAfter(t *testing.T, s *server, token, id string, lastID int64, beats int) []string {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctxTimeout(t, time.Minute), "GET", s.url("/v1/builds/"+id+"/events"), nil)
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Last-Event-ID", strconv.FormatInt(lastID, 10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var kinds []string
	sc := bufio.NewScanner(resp.Body)
	for beats > 0 && sc.Scan() {
		if line := sc.Text(); line == ": heartbeat" {
			beats--
		} else if k, ok := strings.CutPrefix(line, "event: "); ok {
			kinds = append(kinds, k)
		}
	}
	if beats > 0 {
		t.Fatalf("the stream resumed after event %d stopped before its heartbeats (%v); events %v", lastID, sc.Err(), kinds)
	}
	return kinds
}
