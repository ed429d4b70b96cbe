package cli

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bkclient "github.com/moby/buildkit/client"

	"github.com/kiln-build/kiln/api"
)

// These tests hold kiln build to docker buildx build's output contract:
// progress on stderr, stdout only what was asked for.

func buildxServer(t *testing.T) (*fakeServer, string) {
	s := succeededServer(t)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	return s, dir
}

func TestQuietPrintsTheDigestAlone(t *testing.T) {
	s, dir := buildxServer(t)
	for _, args := range [][]string{{"-q"}, {"--quiet"}, {"-q", "--progress", "quiet"}} {
		res := s.kiln(context.Background(), append(append([]string{"build"}, args...), dir)...)
		if res.code != 0 {
			t.Fatalf("%v: %s", args, res)
		}
		want := "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n"
		if res.stdout != want || res.stderr != "" {
			t.Errorf("%v: want the digest alone on stdout and nothing on stderr:\n%s", args, res)
		}
	}
}

func TestQuietFailureSaysWhyOnStderr(t *testing.T) {
	s := newFakeServer(t)
	final := finishedBuild(api.BuildStatusFailed, "exit code: 2")
	s.events = eventScript(2, &final)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	res := s.kiln(context.Background(), "build", "-q", dir)
	if res.code != 1 || res.stdout != "" || res.stderr != "kiln: build b1 failed: exit code: 2\n" {
		t.Errorf("want exit 1, no stdout, the error alone on stderr:\n%s", res)
	}
}

func TestProgressQuietPrintsNothing(t *testing.T) {
	s, dir := buildxServer(t)
	res := s.kiln(context.Background(), "build", "--progress", "quiet", dir)
	if res.code != 0 || res.stdout != "" || res.stderr != "" {
		t.Errorf("want silence:\n%s", res)
	}
}

func TestPlainProgressGoesToStderr(t *testing.T) {
	s, dir := buildxServer(t)
	for _, mode := range []string{"plain", "tty", "auto"} {
		res := s.kiln(context.Background(), "build", "--progress", mode, dir)
		if res.code != 0 || res.stdout != "" {
			t.Errorf("%s: stdout must stay empty:\n%s", mode, res)
		}
		if !strings.Contains(res.stderr, "RUN make") || !strings.Contains(res.stderr, "digest: sha256:") {
			t.Errorf("%s: stderr lacks the progress and outcome:\n%s", mode, res)
		}
	}
}

func TestQuietUsageErrors(t *testing.T) {
	s, dir := buildxServer(t)
	for name, args := range map[string][]string{
		"-q with plain":           {"-q", "--progress", "plain"},
		"-q with -o -":            {"-q", "-o", "-"},
		"detach with output":      {"--detach", "-o", "out"},
		"detach with iidfile":     {"--detach", "--iidfile", "x"},
		"detach with metadata":    {"--detach", "--metadata-file", "x"},
		"unknown progress":        {"--progress", "fancy"},
		"progress is not a state": {"--progress", "succeeded"},
	} {
		res := s.kiln(context.Background(), append(append([]string{"build"}, args...), dir)...)
		if res.code != 2 || res.stdout != "" {
			t.Errorf("%s: want exit 2:\n%s", name, res)
		}
	}
	if reqs := s.seenRequests(); len(reqs) != 0 {
		t.Errorf("usage errors reached the server: %v", reqs)
	}
}

func TestProgressRawJSONIsBuildKitSolveStatus(t *testing.T) {
	s, dir := buildxServer(t)
	res := s.kiln(context.Background(), "build", "--progress", "rawjson", dir)
	if res.code != 0 || res.stdout != "" {
		t.Fatalf("want success and empty stdout:\n%s", res)
	}
	vertexes := map[string]*bkclient.Vertex{}
	var logs []string
	for i, line := range strings.Split(strings.TrimSuffix(res.stderr, "\n"), "\n") {
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		var ss bkclient.SolveStatus
		if err := dec.Decode(&ss); err != nil {
			t.Fatalf("stderr line %d is not a BuildKit SolveStatus: %q: %v", i+1, line, err)
		}
		for _, v := range ss.Vertexes {
			if v.Digest == "" || v.Name == "" {
				t.Errorf("line %d: vertex without digest or name: %q", i+1, line)
			}
			vertexes[string(v.Digest)] = v
		}
		for _, l := range ss.Logs {
			if l.Vertex != "sha256:v2" || l.Stream != 1 || l.Timestamp.IsZero() {
				t.Errorf("line %d: log %+v", i+1, l)
			}
			logs = append(logs, string(l.Data))
		}
	}
	if want := []string{"compiling unit 1\n", "compiling unit 2\n", "compiling unit 3\n"}; !reflect.DeepEqual(logs, want) {
		t.Errorf("logs %q, want %q", logs, want)
	}
	v1, v2 := vertexes["sha256:v1"], vertexes["sha256:v2"]
	if v1 == nil || !v1.Cached || v1.Started == nil || v1.Completed == nil || v1.Name != "[1/3] FROM docker.io/library/alpine:3" {
		t.Errorf("the cached base's last state: %+v", v1)
	}
	if v2 == nil || v2.Cached || v2.Started == nil || v2.Completed == nil || !v2.Completed.After(*v2.Started) || v2.Error != "" {
		t.Errorf("the RUN step's last state: %+v", v2)
	}
}

func TestProgressRawJSONCarriesTheError(t *testing.T) {
	s := newFakeServer(t)
	final := finishedBuild(api.BuildStatusFailed, "exit code: 2")
	s.events = eventScript(1, &final)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	res := s.kiln(context.Background(), "build", "--progress", "rawjson", dir)
	if res.code != 1 {
		t.Fatalf("want exit 1:\n%s", res)
	}
	lines := strings.Split(strings.TrimSuffix(res.stderr, "\n"), "\n")
	if last := lines[len(lines)-1]; last != "kiln: build b1 failed: exit code: 2" {
		t.Errorf("the error should close stderr, got %q", last)
	}
	var ss bkclient.SolveStatus
	if err := json.Unmarshal([]byte(lines[len(lines)-2]), &ss); err != nil || len(ss.Vertexes) != 1 || ss.Vertexes[0].Error != "exit code: 2" {
		t.Errorf("the failed vertex should carry its error: %q (%v)", lines[len(lines)-2], err)
	}
}

func TestDetachPrintsTheBuildIDAndReturns(t *testing.T) {
	s, dir := buildxServer(t)
	res := s.kiln(context.Background(), "build", "--detach", "--progress", "plain", dir)
	if res.code != 0 || res.stdout != "b1\n" {
		t.Fatalf("want the build id alone on stdout:\n%s", res)
	}
	if events, gets, cancels := s.counts(); events+gets+cancels != 0 {
		t.Errorf("a detached build is not followed: %d events, %d gets, %d cancels", events, gets, cancels)
	}
	res = s.kiln(context.Background(), "build", "--detach", "-q", dir)
	if res.code != 0 || res.stdout != "b1\n" || res.stderr != "" {
		t.Errorf("-q --detach: want the id alone:\n%s", res)
	}
}

// withRegistry puts a registry in front of s that serves one manifest
// behind kiln's token dance, and the images endpoint's references. It
// returns the address to give --addr.
func withRegistry(t *testing.T, s *fakeServer, repo string, manifest []byte, reference map[string]string) (addr string, tokenAsked func() int) {
	sum := sha256.Sum256(manifest)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	var mu sync.Mutex
	asked := 0
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v2/token", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		asked++
		mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer "+testToken || r.URL.Query().Get("service") != "kiln" || r.URL.Query().Get("scope") != "repository:"+repo+":pull" {
			http.Error(w, "bad token request "+r.URL.RawQuery, http.StatusUnauthorized)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"token": "regtok"})
	})
	mux.HandleFunc("GET /v2/", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer regtok" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="http://`+r.Host+`/v2/token",service="kiln",scope="repository:`+repo+`:pull"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		if r.URL.Path != "/v2/"+repo+"/manifests/"+digest {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Set("Docker-Content-Digest", digest)
		w.Write(manifest)
	})
	mux.HandleFunc("GET /v1/images/{name...}", func(w http.ResponseWriter, r *http.Request) {
		ref, ok := reference[r.PathValue("name")]
		if !ok || r.Header.Get("Authorization") != "Bearer "+testToken {
			writeError(w, http.StatusNotFound, "no image", "not_found")
			return
		}
		writeJSON(w, http.StatusOK, api.Image{Name: r.PathValue("name"), Digest: digest, Reference: &ref})
	})
	mux.Handle("/", s.srv.Config.Handler)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL, func() int { mu.Lock(); defer mu.Unlock(); return asked }
}

func TestIIDFileAndMetadataFile(t *testing.T) {
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:c0ffee","size":7},"layers":[]}`)
	sum := sha256.Sum256(manifest)
	digest := "sha256:" + hex.EncodeToString(sum[:])

	s := newFakeServer(t)
	final := finishedBuild(api.BuildStatusSucceeded, "")
	final.ImageDigest = &digest
	final.Tags = []string{"team/app:1", "team/app:latest"}
	s.events = eventScript(1, &final)
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
	addr, tokenAsked := withRegistry(t, s, "team/app", manifest, map[string]string{
		"team/app:1":      "registry.example:7070/team/app:1",
		"team/app:latest": "registry.example:7070/team/app:latest",
	})

	out := t.TempDir()
	iid, meta := filepath.Join(out, "iid"), filepath.Join(out, "meta.json")
	res := runKiln(context.Background(), nil, "build", "--progress", "plain", "--iidfile", iid, "--metadata-file", meta, dir, "--addr", addr, "--token", testToken)
	if res.code != 0 || res.stdout != "" {
		t.Fatalf("%s", res)
	}
	if strings.Contains(res.stderr, "warning") {
		t.Errorf("unexpected warning:\n%s", res)
	}
	if b, _ := os.ReadFile(iid); string(b) != digest {
		t.Errorf("iidfile %q, want %q with no newline", b, digest)
	}
	b, err := os.ReadFile(meta)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("metadata is not JSON: %v\n%s", err, b)
	}
	want := map[string]any{
		"containerimage.digest":        digest,
		"containerimage.config.digest": "sha256:c0ffee",
		"containerimage.descriptor": map[string]any{
			"mediaType": "application/vnd.oci.image.manifest.v1+json",
			"digest":    digest,
			"size":      float64(len(manifest)),
		},
		"image.name":    "registry.example:7070/team/app:1,registry.example:7070/team/app:latest",
		"kiln.build.id": "b1",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("metadata:\n got  %v\n want %v", got, want)
	}
	if tokenAsked() != 1 {
		t.Errorf("the registry token was asked for %d times, want 1", tokenAsked())
	}
}

func TestMetadataFileWithoutRegistryWarns(t *testing.T) {
	s, dir := buildxServer(t) // no /v2/: the descriptor cannot be had
	meta := filepath.Join(t.TempDir(), "meta.json")
	res := s.kiln(context.Background(), "build", "--progress", "quiet", "--metadata-file", meta, dir)
	if res.code != 0 || !strings.Contains(res.stderr, "kiln: warning: containerimage.descriptor left out") {
		t.Fatalf("want success with a warning:\n%s", res)
	}
	var got map[string]any
	b, _ := os.ReadFile(meta)
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got["containerimage.digest"] != "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" || got["kiln.build.id"] != "b1" {
		t.Errorf("metadata %v", got)
	}
	// The images endpoint is not there either: the client's address
	// stands in for the registry host.
	host := strings.TrimPrefix(s.srv.URL, "http://")
	if got["image.name"] != host+"/app:1" {
		t.Errorf("image.name %v, want %s/app:1", got["image.name"], host)
	}
}

func TestSignalsCancelTheBuild(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGHUP} {
		t.Run(sig.String(), func(t *testing.T) {
			s := newFakeServer(t)
			s.events = eventScript(2, nil) // still running
			dir := t.TempDir()
			writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
			go func() {
				select {
				case <-s.streaming:
					syscall.Kill(os.Getpid(), sig)
				case <-time.After(10 * time.Second):
				}
			}()
			res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
			if res.code != 130 {
				t.Fatalf("want exit 130:\n%s", res)
			}
			if _, _, cancels := s.counts(); cancels != 1 {
				t.Errorf("cancel endpoint called %d times, want 1", cancels)
			}
		})
	}
}

// failingWriter fails every write after the first ok ones with EPIPE, as
// a pipe whose reader went away does.
type failingWriter struct {
	mu     sync.Mutex
	ok     int
	writes int
}

func (w *failingWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes++
	if w.writes > w.ok {
		return 0, syscall.EPIPE
	}
	return len(p), nil
}

func TestBrokenPipeCancelsTheBuild(t *testing.T) {
	for _, mode := range []string{"plain", "tty", "json", "rawjson"} {
		t.Run(mode, func(t *testing.T) {
			s := newFakeServer(t)
			s.events = eventScript(20, nil) // still running
			dir := t.TempDir()
			writeTree(t, dir, map[string]string{"Dockerfile": "FROM scratch\n"})
			// stderr breaks a few writes in, once the build exists.
			w := &failingWriter{ok: 6}
			var stdout syncBuffer
			done := make(chan int, 1)
			go func() {
				done <- run(context.Background(), []string{"build", "--progress", mode, dir, "--addr", s.srv.URL, "--token", testToken}, strings.NewReader(""), &stdout, w, testSettings)
			}()
			var code int
			select {
			case code = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("the client did not notice its broken stderr")
			}
			if code != 1 {
				t.Errorf("exit %d, want 1", code)
			}
			if _, _, cancels := s.counts(); cancels != 1 {
				t.Errorf("cancel endpoint called %d times, want 1", cancels)
			}
		})
	}
}

func TestGuardedWriterReportsTheFirstFailure(t *testing.T) {
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	g := newGuardedWriter(&failingWriter{ok: 1}, "standard error", cancel)
	if _, err := g.Write([]byte("a")); err != nil || ctx.Err() != nil {
		t.Fatalf("first write: %v, ctx %v", err, ctx.Err())
	}
	if _, err := g.Write([]byte("b")); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("second write: %v, want EPIPE", err)
	}
	oe, ok := outputFailed(ctx)
	if !ok || oe.stream != "standard error" || !errors.Is(oe, syscall.EPIPE) {
		t.Errorf("cause %v", context.Cause(ctx))
	}
	if _, err := g.Write([]byte("c")); err == nil {
		t.Errorf("a broken writer stays broken")
	}
}

func TestParseChallenge(t *testing.T) {
	scheme, params := parseChallenge(`Bearer realm="http://h:1/v2/token",service="kiln",scope="repository:a/b:pull,push",error="invalid_token"`)
	want := map[string]string{"realm": "http://h:1/v2/token", "service": "kiln", "scope": "repository:a/b:pull,push", "error": "invalid_token"}
	if scheme != "Bearer" || !reflect.DeepEqual(params, want) {
		t.Errorf("%q %v", scheme, params)
	}
	_, params = parseChallenge(`Bearer realm=http://x/t, service="a\"b"`)
	if params["realm"] != "http://x/t" || params["service"] != `a"b` {
		t.Errorf("%v", params)
	}
}
