package test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

// cacheDockerfile writes a per-build stamp into a cache mount and prints
// everything the mount held before, so a test can see whether a build saw
// the previous build's cache-mount contents.
func cacheDockerfile(base string) string {
	return fmt.Sprintf(`FROM %s
RUN echo layer-one > /one
ARG STAMP
RUN --mount=type=cache,target=/c echo "before: $(cat /c/stamps 2>/dev/null | tr '\n' ' ')" && echo $STAMP >> /c/stamps
`, base)
}

func TestColdThenWarmBuildOfOneScopeAndScopesAreIsolated(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tenantA := s.token("alice", "tenant-a", "build:read", "build:write")
	tenantB := s.token("bob", "tenant-b", "build:read", "build:write")
	df := cacheDockerfile(base)

	cold := mustSucceed(t, s, tenantA, s.build(tenantA, submission{
		files:  map[string]string{"Dockerfile": df},
		fields: [][2]string{{"build_args", `{"STAMP":"stamp-a1"}`}},
	}))
	if cold.CacheScope != "tenant-a" {
		t.Fatalf("cache scope = %q, want tenant-a from the token", cold.CacheScope)
	}
	if cold.StepsCached != 0 {
		t.Errorf("cold build: steps_cached = %d, want 0", cold.StepsCached)
	}

	warm := mustSucceed(t, s, tenantA, s.build(tenantA, submission{
		files:  map[string]string{"Dockerfile": df},
		fields: [][2]string{{"build_args", `{"STAMP":"stamp-a2"}`}},
	}))
	if warm.StepsCached == 0 {
		t.Errorf("warm build of the same scope: steps_cached = 0, want > 0\n%s", s.logText(tenantA, warm.Id))
	}
	log := s.logText(tenantA, warm.Id)
	if !strings.Contains(log, "CACHED") || !strings.Contains(log, "echo layer-one") {
		t.Errorf("warm build log shows no CACHED layer-one step:\n%s", log)
	}
	if !strings.Contains(log, "before: stamp-a1") {
		t.Errorf("warm build did not see the cache mount file the cold build wrote:\n%s", log)
	}

	// Another scope starts cold and cannot see tenant-a's cache mount.
	other := mustSucceed(t, s, tenantB, s.build(tenantB, submission{
		files:  map[string]string{"Dockerfile": df},
		fields: [][2]string{{"build_args", `{"STAMP":"stamp-b1"}`}},
	}))
	if other.CacheScope != "tenant-b" {
		t.Fatalf("cache scope = %q, want tenant-b", other.CacheScope)
	}
	blog := s.logText(tenantB, other.Id)
	if strings.Contains(blog, "stamp-a") {
		t.Errorf("tenant-b's build saw tenant-a's cache mount:\n%s", blog)
	}
	if strings.Contains(blog, "CACHED [stage-0 2/3]") || other.StepsCached > 1 {
		t.Errorf("tenant-b's build was warm from tenant-a's cache (steps_cached=%d):\n%s", other.StepsCached, blog)
	}

	// GET /v1/cache shows both volumes to an admin, only its own to a tenant.
	var all api.CacheVolumeList
	s.doJSON(s.admin, "GET", "/v1/cache", nil, http.StatusOK, &all)
	scopes := map[string]api.CacheVolume{}
	for _, v := range all.Volumes {
		scopes[v.Scope] = v
	}
	if _, ok := scopes["tenant-a"]; !ok {
		t.Errorf("GET /v1/cache lacks tenant-a: %+v", all)
	}
	if v := scopes["tenant-a"]; v.UsedBytes <= 0 || v.SizeBytes <= v.UsedBytes {
		t.Errorf("tenant-a volume sizes look wrong: %+v", v)
	}
	var mine api.CacheVolumeList
	s.doJSON(tenantB, "GET", "/v1/cache", nil, http.StatusOK, &mine)
	if len(mine.Volumes) != 1 || mine.Volumes[0].Scope != "tenant-b" {
		t.Errorf("tenant-b sees cache volumes %+v, want only its own", mine.Volumes)
	}

	// Deleting a scope's cache needs cache:admin; the next build is cold.
	resp := s.do(tenantB, "DELETE", "/v1/cache/tenant-b", nil, "")
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("tenant deleting its cache: %d, want 403 (needs cache:admin)", resp.StatusCode)
	}
	resp = s.do(s.admin, "DELETE", "/v1/cache/tenant-b", nil, "")
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Errorf("admin deleting tenant-b's cache: %d, want 204", resp.StatusCode)
	}
	resp = s.do(s.admin, "DELETE", "/v1/cache/tenant-b", nil, "")
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("second delete: %d, want 404", resp.StatusCode)
	}
	again := mustSucceed(t, s, tenantB, s.build(tenantB, submission{
		files:  map[string]string{"Dockerfile": df},
		fields: [][2]string{{"build_args", `{"STAMP":"stamp-b2"}`}},
	}))
	if l := s.logText(tenantB, again.Id); strings.Contains(l, "stamp-b1") || !strings.Contains(l, "created cache volume") {
		t.Errorf("build after deleting the cache was not cold:\n%s", l)
	}
}

// A build whose layers exceed 1 GiB succeeds: BuildKit's root is a disk
// volume, not memory.
func TestBuildWithMoreThanOneGiBOfLayers(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 1.1 GiB")
	}
	s := startServer(t)
	base := s.base()
	b := mustSucceed(t, s, s.admin, s.build(s.admin, submission{
		files: map[string]string{"Dockerfile": fmt.Sprintf(`FROM %s
RUN dd if=/dev/urandom of=/big1 bs=1M count=600 2>/dev/null
RUN dd if=/dev/urandom of=/big2 bs=1M count=500 2>/dev/null
`, base)},
		fields: [][2]string{{"tags", "big:latest"}},
	}))
	out, err := exec.Command("skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", "kiln:"+s.admin,
		"docker://"+s.addr+"/big:latest").CombinedOutput()
	if err != nil {
		t.Fatalf("skopeo inspect: %v\n%s", err, out)
	}
	var manifest struct {
		Layers []struct{ Size int64 }
	}
	if err := json.Unmarshal(out, &manifest); err != nil {
		t.Fatalf("manifest %s: %v", out, err)
	}
	var total int64
	for _, l := range manifest.Layers {
		total += l.Size
	}
	if total <= 1<<30 {
		t.Errorf("image layers total %d bytes, want more than 1 GiB: %s", total, out)
	}
	digest := sha256.Sum256(out)
	if got := "sha256:" + hex.EncodeToString(digest[:]); got != *b.ImageDigest {
		t.Errorf("registry manifest digest %s != build digest %s", got, *b.ImageDigest)
	}
}

func TestCancelQueuedAndRunning(t *testing.T) {
	s := startServer(t, withArgs("--max-concurrent-builds", "1"))
	base := s.base()
	slow := fmt.Sprintf("FROM %s\nRUN sleep 300\n", base)
	running := s.build(s.admin, submission{files: map[string]string{"Dockerfile": slow}})
	s.waitStatus(s.admin, running.Id, api.BuildStatusRunning, time.Minute)
	// Wait until the solve is actually running the sleep.
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(s.logText(s.admin, running.Id), "sleep 300") {
		if time.Now().After(deadline) {
			t.Fatalf("slow build never reached its RUN step:\n%s", s.logText(s.admin, running.Id))
		}
		time.Sleep(200 * time.Millisecond)
	}

	other := s.token("carol", "tenant-c", "build:read", "build:write")
	queued := s.build(other, submission{files: map[string]string{"Dockerfile": slow}})
	time.Sleep(time.Second)
	q := s.get(other, queued.Id)
	if q.Status != api.BuildStatusQueued || q.QueuePosition == nil || *q.QueuePosition != 1 {
		t.Fatalf("second build should wait for the single slot: status %s position %v", q.Status, q.QueuePosition)
	}

	var canceled api.Build
	s.doJSON(other, "POST", "/v1/builds/"+queued.Id+"/cancel", nil, http.StatusOK, &canceled)
	if canceled.Status != api.BuildStatusCanceled {
		t.Fatalf("canceled queued build has status %s", canceled.Status)
	}

	start := time.Now()
	s.doJSON(s.admin, "DELETE", "/v1/builds/"+running.Id, nil, http.StatusOK, &canceled)
	if canceled.Status != api.BuildStatusCanceled {
		t.Fatalf("canceled running build has status %s", canceled.Status)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("cancel of a running build took %s", d)
	}
	// The work is gone: no buildkitd, no mount of its volume.
	assertNoLeftovers(t, s.data)

	// A terminal build answers 409 with its final state, never 404.
	var final api.Build
	s.doJSON(s.admin, "POST", "/v1/builds/"+running.Id+"/cancel", nil, http.StatusConflict, &final)
	if final.Status != api.BuildStatusCanceled || final.Id != running.Id {
		t.Errorf("409 body = %+v, want the canceled build", final)
	}
	if got := s.get(other, queued.Id); got.Status != api.BuildStatusCanceled || got.StartedAt != nil {
		t.Errorf("queued build after cancel: status %s started %v; it must never have run", got.Status, got.StartedAt)
	}
	if left := s.contextEntries(); len(left) != 0 {
		t.Errorf("contexts left after cancel: %v", left)
	}
}
