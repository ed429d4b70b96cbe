package test

import (
	"fmt"
	"io"
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

// metric reads one unlabeled counter or gauge from /metrics.
func (s *server) metric(name string) int {
	s.t.Helper()
	resp, err := http.Get(s.url("/metrics"))
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\d+)`).FindSubmatch(body)
	if m == nil {
		s.t.Fatalf("no %s in metrics", name)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// runtimeRuns counts builds that reached a BuildKit solve.
func (s *server) runtimeRuns() int { return s.metric("kiln_runtime_runs_total") }

func TestIdenticalBuildIsDeduplicated(t *testing.T) {
	s := startServer(t, withArgs("--dedup-ttl", "6s"))
	base := s.base()
	tenantA := s.token("alice", "tenant-a", "build:read", "build:write")
	files := map[string]string{
		"Dockerfile": "ARG BASE\nFROM ${BASE}\nARG N=1\nCOPY app.txt /app.txt\nRUN sleep 2 && echo $N > /n\n",
		"app.txt":    "v1",
	}
	args := [][2]string{{"build_args", fmt.Sprintf(`{"BASE":%q}`, base)}}

	first := mustSucceed(t, s, tenantA, s.build(tenantA, submission{files: files, fields: args}))
	if first.InputHash == nil || first.DedupOf != nil {
		t.Fatalf("first build: input_hash %v dedup_of %v", first.InputHash, first.DedupOf)
	}
	firstTook := first.FinishedAt.Sub(first.CreatedAt)

	runs := s.runtimeRuns()
	start := time.Now()
	second := s.build(tenantA, submission{files: files, fields: append(args, [2]string{"tags", "app:1"})})
	took := time.Since(start)
	if second.Status != api.BuildStatusSucceeded || second.DedupOf == nil || *second.DedupOf != first.Id {
		t.Fatalf("identical resubmission: status %s dedup_of %v, want succeeded from %s", second.Status, second.DedupOf, first.Id)
	}
	if len(second.Tags) != 1 || second.Tags[0] != "tenant-a/app:1" {
		t.Errorf("tags = %v, want [tenant-a/app:1]", second.Tags)
	}
	if *second.ImageDigest != *first.ImageDigest || *second.InputHash != *first.InputHash {
		t.Errorf("dedup answer differs: digest %s vs %s", *second.ImageDigest, *first.ImageDigest)
	}
	if s.runtimeRuns() != runs {
		t.Errorf("a deduplicated build reached the runtime")
	}
	if took > firstTook/4 {
		t.Errorf("dedup answer took %s, the build it copied %s", took, firstTook)
	}
	t.Logf("first build %s, deduplicated resubmission %s (%.1f%%)", firstTook, took, 100*took.Seconds()/firstTook.Seconds())
	if !skopeoOK("kiln:"+s.admin, "docker://"+s.addr+"/tenant-a/app:1") || !skopeoOK("kiln:"+s.admin, "docker://"+s.addr+"/builds/"+second.Id+":latest") {
		t.Errorf("the deduplicated build's names are not pullable")
	}
	if log := s.logText(tenantA, second.Id); !regexp.MustCompile(`deduplicated: identical inputs`).MatchString(log) {
		t.Errorf("dedup build's events do not say so:\n%s", log)
	}

	// Another cache scope of the same tenant hits too (identical inputs,
	// same executor); other tenants are TestDedupStaysWithinATenantOrItsTrustGroup's.
	otherScope := s.token("alice", "tenant-a.ci", "build:read", "build:write")
	cross := s.build(otherScope, submission{files: files, fields: args})
	if cross.DedupOf == nil {
		t.Errorf("identical build of another cache scope of the same tenant was not deduplicated")
	}

	// GET /v1/builds?input_hash= shows how popular it is.
	var list api.BuildList
	s.doJSON(s.admin, "GET", "/v1/builds?input_hash="+*first.InputHash, nil, http.StatusOK, &list)
	if len(list.Builds) != 3 {
		t.Errorf("input_hash filter found %d builds, want 3", len(list.Builds))
	}

	miss := func(name string, sub submission, tok string) {
		t.Helper()
		b := s.build(tok, sub)
		if b.DedupOf != nil {
			t.Errorf("%s: deduplicated, but it must build", name)
		}
		mustSucceed(t, s, tok, b)
	}
	changed := map[string]string{"Dockerfile": files["Dockerfile"], "app.txt": "v2"}
	miss("changed file", submission{files: changed, fields: args}, tenantA)
	miss("changed build arg", submission{files: files, fields: [][2]string{{"build_args", fmt.Sprintf(`{"BASE":%q,"N":"2"}`, base)}}}, tenantA)
	miss("secret", submission{files: files, fields: args, secrets: map[string]string{"x": "y"}}, tenantA)
	miss("no_cache", submission{files: files, fields: append(args, [2]string{"no_cache", "true"})}, tenantA)
	miss("pull", submission{files: files, fields: append(args, [2]string{"pull", "true"})}, tenantA)

	// A new digest behind the same base tag misses.
	b := s.build(s.admin, submission{
		files:  map[string]string{"Dockerfile": testkit.BusyboxDockerfile + "RUN echo changed > /changed\n"},
		binary: map[string]string{"busybox": testkit.BusyboxSource},
		fields: [][2]string{{"tags", "base/busybox:latest"}},
	})
	mustSucceed(t, s, s.admin, b)
	miss("changed base digest", submission{files: files, fields: args}, tenantA)

	// After the TTL the original no longer answers.
	time.Sleep(7 * time.Second)
	miss("expired", submission{files: changed, fields: args}, tenantA)
}

// Dedup answers a build only with a result of its own tenant (any of its
// cache scopes), or of a tenant in its dedup.trust_groups group; never
// across tenants for a Dockerfile using cache mounts, whose contents the
// input hash cannot see. The removed dedup.across_scopes is an error.
func TestDedupStaysWithinATenantOrItsTrustGroup(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "kiln.yaml")
	os.WriteFile(cfg, []byte("dedup:\n  across_scopes: true\n"), 0o600)
	out, err := exec.CommandContext(ctxTimeout(t, time.Minute), kilnBinary(t), "serve", "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--config", cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "dedup.trust_groups") {
		t.Errorf("kiln serve with dedup.across_scopes: err %v, want a startup error naming dedup.trust_groups\n%s", err, out)
	}

	s := startServer(t, withArgs("--dedup-trust-groups", `{"partners":["tenant-b","tenant-c"]}`))
	tok := func(subject, scope string) string { return s.token(subject, scope, "build:read", "build:write") }
	a, a2 := tok("alice", "tenant-a"), tok("alice", "tenant-a.other")
	b, c, d := tok("bob", "tenant-b"), tok("carl", "tenant-c"), tok("dora", "tenant-d")
	files := map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"}

	orig := mustSucceed(t, s, a, s.build(a, submission{files: files}))
	if again := s.build(a, submission{files: files}); again.DedupOf == nil || *again.DedupOf != orig.Id {
		t.Errorf("same scope did not dedup to %s: %v", orig.Id, again.DedupOf)
	}
	sibling := s.build(a2, submission{files: files})
	if sibling.DedupOf == nil || *sibling.DedupOf != orig.Id {
		t.Errorf("cache scope tenant-a.other did not dedup to tenant-a's build %s: %v", orig.Id, sibling.DedupOf)
	}
	if sibling.CacheScope != "tenant-a.other" || sibling.Tenant == nil || *sibling.Tenant != "tenant-a" {
		t.Errorf("sibling build: cache scope %q tenant %v, want tenant-a.other of tenant-a", sibling.CacheScope, sibling.Tenant)
	}

	// tenant-b is in a trust group, but not with tenant-a.
	bBuild := s.build(b, submission{files: files})
	if bBuild.DedupOf != nil {
		t.Errorf("tenant-b's build was answered with build %s of untrusted tenant-a", *bBuild.DedupOf)
	}
	bBuild = mustSucceed(t, s, b, bBuild)
	// tenant-c trusts tenant-b: answered with tenant-b's own build.
	if cBuild := s.build(c, submission{files: files}); cBuild.DedupOf == nil || *cBuild.DedupOf != bBuild.Id {
		t.Errorf("tenant-c's build was not answered with trusted tenant-b's build %s: %v", bBuild.Id, cBuild.DedupOf)
	}
	// tenant-d is in no group.
	if dBuild := s.build(d, submission{files: files}); dBuild.DedupOf != nil {
		t.Errorf("tenant-d's build was answered with build %s of another tenant", *dBuild.DedupOf)
	} else {
		mustSucceed(t, s, d, dBuild)
	}

	// A cache mount's contents are not in the input hash: even a trusted
	// tenant builds its own, while the tenant itself still dedups.
	mounts := map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN --mount=type=cache,target=/c echo mounted > /m\n", s.base())}
	mb := mustSucceed(t, s, b, s.build(b, submission{files: mounts}))
	mc := s.build(c, submission{files: mounts})
	if mc.DedupOf != nil {
		t.Errorf("tenant-c's cache-mount build was answered with build %s of tenant-b", *mc.DedupOf)
	}
	mustSucceed(t, s, c, mc)
	if again := s.build(b, submission{files: mounts}); again.DedupOf == nil || *again.DedupOf != mb.Id {
		t.Errorf("tenant-b's identical cache-mount build did not dedup to its own %s: %v", mb.Id, again.DedupOf)
	}
}

// A Dockerfile's own "<Dockerfile>.dockerignore" decides what the build
// sees, as in docker build: a file it lets in (though .dockerignore would
// not) is part of the build's identity, so changing it never dedups to the
// old result. The edit keeps the file's size and its (zero) archive mtime,
// which BuildKit's incremental context transfer alone would miss.
func TestDockerfileSpecificIgnoreFileDecidesWhatDedupCovers(t *testing.T) {
	s := startServer(t)
	files := func(notes string) map[string]string {
		return map[string]string{
			".dockerignore":                  "notes.txt\n",
			"ci/app.Dockerfile":              "FROM scratch\nCOPY notes.txt /notes.txt\n",
			"ci/app.Dockerfile.dockerignore": "*.log\n",
			"notes.txt":                      notes,
		}
	}
	fields := [][2]string{{"dockerfile_path", "ci/app.Dockerfile"}}
	first := mustSucceed(t, s, s.admin, s.build(s.admin, submission{files: files("v1"), fields: fields}))
	second := s.build(s.admin, submission{files: files("v2"), fields: fields})
	if second.DedupOf != nil {
		t.Fatalf("changing notes.txt, which the build copies, was answered from build %s", *second.DedupOf)
	}
	second = mustSucceed(t, s, s.admin, second)
	if *second.ImageDigest == *first.ImageDigest {
		t.Errorf("the build with new notes.txt produced the old image")
	}
	if again := s.build(s.admin, submission{files: files("v2"), fields: fields}); again.DedupOf == nil || *again.DedupOf != second.Id {
		t.Errorf("an identical resubmission did not dedup to %s: %+v", second.Id, again.DedupOf)
	}
}
