package test

import (
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
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
	tenantB := s.token("bob", "tenant-b", "build:read", "build:write")
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
	second := s.build(tenantA, submission{files: files, fields: append(args, [2]string{"tags", "dedup/app:1"})})
	took := time.Since(start)
	if second.Status != api.BuildStatusSucceeded || second.DedupOf == nil || *second.DedupOf != first.Id {
		t.Fatalf("identical resubmission: status %s dedup_of %v, want succeeded from %s", second.Status, second.DedupOf, first.Id)
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
	if !skopeoOK("kiln:"+s.admin, "docker://"+s.addr+"/dedup/app:1") || !skopeoOK("kiln:"+s.admin, "docker://"+s.addr+"/builds/"+second.Id+":latest") {
		t.Errorf("the deduplicated build's names are not pullable")
	}
	if log := s.logText(tenantA, second.Id); !regexp.MustCompile(`deduplicated: identical inputs`).MatchString(log) {
		t.Errorf("dedup build's events do not say so:\n%s", log)
	}

	// Another scope hits too (identical inputs, same executor).
	cross := s.build(tenantB, submission{files: files, fields: args})
	if cross.DedupOf == nil {
		t.Errorf("cross-scope identical build was not deduplicated")
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

func TestDedupAcrossScopesCanBeTurnedOff(t *testing.T) {
	s := startServer(t, withArgs("--dedup-across-scopes", "false"))
	a := s.token("alice", "tenant-a", "build:read", "build:write")
	b := s.token("bob", "tenant-b", "build:read", "build:write")
	files := map[string]string{"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"}
	mustSucceed(t, s, a, s.build(a, submission{files: files}))
	if again := s.build(a, submission{files: files}); again.DedupOf == nil {
		t.Errorf("same scope did not dedup")
	}
	other := s.build(b, submission{files: files})
	if other.DedupOf != nil {
		t.Errorf("other scope deduplicated although dedup.across_scopes=false")
	}
	mustSucceed(t, s, b, other)
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
