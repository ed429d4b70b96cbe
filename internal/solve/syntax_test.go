package solve_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

// syntaxDockerfile names the public frontend image, as users write it; no
// public registry is reachable from the tests.
const syntaxDockerfile = "# syntax=docker/dockerfile:1\n" +
	"FROM scratch\n" +
	"COPY --link hello.txt /hello.txt\n"

var (
	frontendOnce   sync.Once
	frontendPinned string
)

// pinnedFrontend pushes BuildKit's Dockerfile frontend, built from go.mod's
// BuildKit, to the test registry once and returns host/repo@sha256:….
func pinnedFrontend(t *testing.T) string {
	t.Helper()
	frontendOnce.Do(func() {
		start := time.Now()
		f := testkit.FrontendImage(t)
		t.Logf("frontend image %s (BuildKit %s, layer %d bytes) ready in %s", f.Digest, f.BuildKitVersion, f.LayerDesc.Size, time.Since(start).Round(time.Millisecond))
		frontendPinned = testkit.PushFrontendImage(t, env.registry, "mirror/docker.io/docker/dockerfile", "1")
	})
	if frontendPinned == "" {
		t.Fatal("frontend image was not pushed (see the first test that tried)")
	}
	return frontendPinned
}

// BuildKit's gateway also looks the frontend reference up among the named
// contexts, so the pin kiln already passes for FROM images works for the
// syntax image too.
func TestSyntaxFrontendPinnedByNamedContext(t *testing.T) {
	pinned := pinnedFrontend(t)
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": syntaxDockerfile, "hello.txt": "hello via a named context\n"})
	rec := &testkit.Recorder{}
	ref := env.registry + "/test/syntax-named:latest"
	_, err := solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir:    dir,
		Push:          []string{ref},
		NamedContexts: map[string]string{"docker/dockerfile:1": "docker-image://" + pinned},
	}, rec)
	logVertices(t, rec)
	if err != nil {
		t.Fatalf("solve with named context docker/dockerfile:1=%s: %v", pinned, err)
	}
	if got := string(testkit.FetchImage(t, ref).Files["/hello.txt"]); got != "hello via a named context\n" {
		t.Errorf("/hello.txt = %q", got)
	}
	checkFrontendUsed(t, rec, pinned)
}

func TestSyntaxWithoutPinTriesDockerHub(t *testing.T) {
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": syntaxDockerfile, "hello.txt": "x\n"})
	rec := &testkit.Recorder{}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	start := time.Now()
	_, err := solve.Run(ctx, env.client, solve.Request{ContextDir: dir, Push: []string{env.registry + "/test/syntax-unpinned:latest"}}, rec)
	logVertices(t, rec)
	t.Logf("after %s: err = %v", time.Since(start).Round(time.Millisecond), err)
	if err == nil {
		t.Fatal("solve succeeded although docker.io is unreachable")
	}
	if !strings.Contains(err.Error(), "docker.io/docker/dockerfile:1") {
		t.Errorf("err = %v, want it to name docker.io/docker/dockerfile:1", err)
	}
}

// BUILDKIT_SYNTAX must name an image; a digest the registry lacks fails
// instead of falling back to the built-in frontend.
func TestSyntaxPinToMissingDigestFails(t *testing.T) {
	pinned := pinnedFrontend(t)
	repo, _, _ := strings.Cut(pinned, "@")
	missing := repo + "@sha256:" + strings.Repeat("0", 64)
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": syntaxDockerfile, "hello.txt": "x\n"})
	_, err := solve.Run(testCtx(t), env.client, solve.Request{
		ContextDir: dir,
		Push:       []string{env.registry + "/test/syntax-missing:latest"},
		BuildArgs:  map[string]string{"BUILDKIT_SYNTAX": missing},
	}, nil)
	t.Logf("missing digest: err = %v", err)
	if err == nil || !strings.Contains(err.Error(), "BUILDKIT_SYNTAX") {
		t.Errorf("err = %v, want a failure naming BUILDKIT_SYNTAX", err)
	}
}

func checkFrontendUsed(t *testing.T, rec *testkit.Recorder, pinned string) {
	t.Helper()
	_, dgst, _ := strings.Cut(pinned, "@")
	var names []string
	for _, e := range rec.Events() {
		if e.Kind == progress.VertexCompleted || e.Kind == progress.VertexCached {
			if strings.Contains(e.Name, dgst) {
				names = append(names, e.Name)
			}
		}
	}
	if len(names) == 0 {
		t.Errorf("no finished vertex names the frontend digest %s", dgst)
	}
	if len(rec.Find(progress.VertexCompleted, "COPY --link hello.txt")) == 0 && len(rec.Find(progress.VertexCached, "COPY --link hello.txt")) == 0 {
		t.Errorf("no COPY vertex finished")
	}
}

func logVertices(t *testing.T, rec *testkit.Recorder) {
	t.Helper()
	seen := map[string]bool{}
	for _, e := range rec.Events() {
		switch e.Kind {
		case progress.VertexCompleted, progress.VertexCached, progress.VertexErrored:
			key := string(e.Kind) + " " + e.Name
			if !seen[key] {
				seen[key] = true
				line := "vertex " + key
				if e.Error != "" {
					line += " error: " + e.Error
				}
				t.Log(line)
			}
		}
	}
}

// The frontend image is pulled with the build's session credentials, like
// FROM images: kiln's registry demands them for its mirror repositories.
func TestSyntaxFrontendFromRegistryWithAuth(t *testing.T) {
	reg := testkit.RegistryWithAuth(t, "kiln", "fr0ntend-pw")
	// A variant: its manifest and config are in no earlier test's cache,
	// so buildkitd must fetch them through the registry's auth.
	f := testkit.FrontendImage(t).Variant(t, t.Name())
	dgst := f.Push(t, testkit.PlainRegistry{Host: reg, Username: "kiln", Password: "fr0ntend-pw"}, "mirror/docker.io/docker/dockerfile", "1")
	pinned := reg + "/mirror/docker.io/docker/dockerfile@" + dgst
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": syntaxDockerfile, "hello.txt": "hello through auth\n"})
	req := solve.Request{
		ContextDir: dir,
		Push:       []string{env.registry + "/test/syntax-auth:latest"},
		BuildArgs:  map[string]string{"BUILDKIT_SYNTAX": pinned},
	}

	_, err := solve.Run(testCtx(t), env.client, req, nil)
	t.Logf("without credentials: err = %v", err)
	if err == nil {
		t.Fatal("frontend pulled from an auth-only registry without credentials")
	}

	req.RegistryAuth = map[string]solve.Credentials{reg: {Username: "kiln", Password: "fr0ntend-pw"}}
	rec := &testkit.Recorder{}
	_, err = solve.Run(testCtx(t), env.client, req, rec)
	logVertices(t, rec)
	if err != nil {
		t.Fatalf("with credentials: %v", err)
	}
	checkFrontendUsed(t, rec, pinned)
}
