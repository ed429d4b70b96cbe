package server_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/config"
	"github.com/kiln-build/kiln/internal/daemon"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/testkit"
)

// fakeRuntime stands in for BuildKit at the runtime seam (the real
// runtimes are tested in internal/runtime/...): it pushes a small image to
// every name the job asks for, over the registry's HTTP API with the job's
// own credentials, so a build token meets the same rules as in a real
// build. A build whose build args hold HOLD=1 runs until canceled.
type fakeRuntime struct{}

// jobs holds every job the fake runtime was given, by build id.
var jobs sync.Map

// gates hold builds whose build args name GATE=<name> until the test
// closes the gate.
var (
	gatesMu sync.Mutex
	gates   = map[string]chan struct{}{}
)

func gate(name string) chan struct{} {
	gatesMu.Lock()
	defer gatesMu.Unlock()
	if gates[name] == nil {
		gates[name] = make(chan struct{})
	}
	return gates[name]
}

func (fakeRuntime) Name() string { return "fake" }

// StartBuilder makes the fake a runtime that keeps builders, so servers
// under test pool them as a real one would.
func (fakeRuntime) StartBuilder(context.Context, runtime.Job, progress.Sink) (runtime.Builder, error) {
	return &fakeBuilder{}, nil
}

// fakeBuilder runs jobs as fakeRuntime.Run does; a job that ended by its
// context leaves it unfit for reuse, as the real ones.
type fakeBuilder struct {
	mu    sync.Mutex
	doubt bool
}

func (b *fakeBuilder) Run(ctx context.Context, job runtime.Job, sink progress.Sink) (solve.Result, error) {
	res, err := fakeRuntime{}.Run(ctx, job, sink)
	b.mu.Lock()
	b.doubt = b.doubt || ctx.Err() != nil
	b.mu.Unlock()
	return res, err
}

func (b *fakeBuilder) Reusable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.doubt
}

func (b *fakeBuilder) Stop(context.Context) error { return nil }
func (b *fakeBuilder) MemoryMB() int              { return 64 }

func (fakeRuntime) Run(ctx context.Context, job runtime.Job, _ progress.Sink) (solve.Result, error) {
	jobs.Store(job.BuildID, job)
	if job.Solve.BuildArgs["HOLD"] == "1" {
		<-ctx.Done()
		return solve.Result{}, ctx.Err()
	}
	if g := job.Solve.BuildArgs["GATE"]; g != "" {
		select {
		case <-gate(g):
		case <-ctx.Done():
			return solve.Result{}, ctx.Err()
		}
	}
	img := newImage(job.BuildID)
	var dgst string
	for _, ref := range job.Solve.Push {
		host, name, _ := strings.Cut(ref, "/")
		repo, tag, _ := strings.Cut(name, ":")
		c := &regClient{base: "http://" + host, user: "kiln", pass: job.Solve.RegistryAuth[host].Password}
		d, err := c.push(repo, tag, img)
		if err != nil {
			return solve.Result{}, fmt.Errorf("push %s: %w", ref, err)
		}
		dgst = d
	}
	return solve.Result{Digest: dgst, StepsTotal: 1}, nil
}

// image is a one-layer OCI image whose bytes depend on seed.
type image = testkit.SeedImage

func newImage(seed string) image { return testkit.NewSeedImage(seed) }

// regClient speaks the registry API the way OCI clients do: it trades
// its kiln token for a registry token at the token endpoint, per scope.
type regClient struct {
	base       string
	user, pass string // empty: anonymous
}

func (c *regClient) token(scope string) (string, error) {
	q := url.Values{"service": {"kiln"}}
	if scope != "" {
		q.Set("scope", scope)
	}
	req, _ := http.NewRequest(http.MethodGet, c.base+"/v2/token?"+q.Encode(), nil)
	req.SetBasicAuth(c.user, c.pass)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var body struct{ Token string }
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return "", fmt.Errorf("token endpoint: %d %s", resp.StatusCode, b)
	}
	return body.Token, json.NewDecoder(resp.Body).Decode(&body)
}

// do sends one registry request with a token for scope; it returns the
// status (401 when no token could be had).
func (c *regClient) do(method, path, scope, ctype string, body []byte) (int, http.Header, []byte) {
	req, _ := http.NewRequest(method, c.base+path, bytes.NewReader(body))
	req.Header.Set("Accept", v1.MediaTypeImageManifest)
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if c.pass != "" {
		tok, err := c.token(scope)
		if err != nil {
			return http.StatusUnauthorized, nil, []byte(err.Error())
		}
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, []byte(err.Error())
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

func pushScope(repo string) string { return "repository:" + repo + ":pull,push" }

// blob uploads one blob in a single PUT (monolithic upload).
func (c *regClient) blob(repo string, data []byte) (int, []byte) {
	code, h, b := c.do(http.MethodPost, "/v2/"+repo+"/blobs/uploads/", pushScope(repo), "", nil)
	if code != http.StatusAccepted {
		return code, b
	}
	loc, _ := url.Parse(h.Get("Location"))
	q := loc.Query()
	q.Set("digest", digest.FromBytes(data).String())
	loc.RawQuery = q.Encode()
	code, _, b = c.do(http.MethodPut, loc.RequestURI(), pushScope(repo), "application/octet-stream", data)
	return code, b
}

// push uploads img as repo:tag and returns its digest.
func (c *regClient) push(repo, tag string, img image) (string, error) {
	for _, b := range [][]byte{img.Layer, img.Config} {
		if code, body := c.blob(repo, b); code != http.StatusCreated {
			return "", fmt.Errorf("blob: %d %s", code, body)
		}
	}
	code, _, body := c.do(http.MethodPut, "/v2/"+repo+"/manifests/"+tag, pushScope(repo), v1.MediaTypeImageManifest, img.Manifest)
	if code != http.StatusCreated {
		return "", fmt.Errorf("manifest: %d %s", code, body)
	}
	return img.Digest, nil
}

// kiln is one in-process kiln server on a fresh data dir with the fake
// runtime.
type kiln struct {
	t     *testing.T
	url   string
	host  string
	admin string
	data  string
	stop  func()
}

// seed stores images straight into registry storage before the server
// starts: what kiln's own mirror and admin builds would have put there.
func seed(t *testing.T, data string, names ...string) {
	t.Helper()
	a, _, err := auth.LoadOrCreate(filepath.Join(data, "keys"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	reg, err := registry.New(ctx, registry.Config{RootDir: filepath.Join(data, "registry"), Authority: a,
		Grant: testkit.Policy(t).GrantRegistry, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	for _, n := range names {
		repo, tag, _ := strings.Cut(n, ":")
		img := newImage(n)
		for _, b := range [][]byte{img.Layer, img.Config} {
			if err := reg.PutBlob(ctx, repo, digest.FromBytes(b).String(), int64(len(b)), bytes.NewReader(b)); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := reg.PutManifest(ctx, repo, v1.MediaTypeImageManifest, img.Manifest, tag); err != nil {
			t.Fatal(err)
		}
	}
}

func startKiln(t *testing.T, seeded ...string) *kiln {
	t.Helper()
	data := t.TempDir()
	seed(t, data, seeded...)
	return startKilnAt(t, data, nil)
}

// startKilnAt serves kiln on data, with settings changed by set, until
// the test ends or stop is called.
func startKilnAt(t *testing.T, data string, set func(*config.Config)) *kiln {
	t.Helper()
	var cfg config.Config
	if err := cfg.Load(nil); err != nil {
		t.Fatal(err)
	}
	cfg.DataDir, cfg.Listen, cfg.LogLevel = data, "127.0.0.1:0", "warn"
	cfg.CacheVolumeSize = 64 << 20
	if set != nil {
		set(&cfg)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- daemon.Run(ctx, cfg, ln, daemon.WithRuntime(fakeRuntime{})) }()
	k := &kiln{t: t, url: "http://" + ln.Addr().String(), host: ln.Addr().String(), data: data}
	var once sync.Once
	k.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("kiln serve: %v", err)
			}
		})
	}
	t.Cleanup(k.stop)
	deadline := time.Now().Add(30 * time.Second)
	for {
		tok, err := os.ReadFile(filepath.Join(data, "admin.token"))
		if err == nil {
			if resp, err := http.Get(k.url + "/healthz"); err == nil {
				resp.Body.Close()
				k.admin = strings.TrimSpace(string(tok))
				return k
			}
		}
		select {
		case err := <-done:
			t.Fatalf("kiln serve stopped: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("kiln did not start in 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// call sends one API request, with headers (name, value) if given, and
// returns the status and body. A switch of protocols is closed at once.
func (k *kiln) call(token, method, path string, body io.Reader, ctype string, headers ...[2]string) (int, []byte) {
	req, _ := http.NewRequest(method, k.url+path, body)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	for _, h := range headers {
		req.Header.Set(h[0], h[1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		k.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return resp.StatusCode, nil
	}
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func (k *kiln) json(token, method, path string, in any, want int, out any) {
	k.t.Helper()
	var body io.Reader
	if in != nil {
		b, _ := json.Marshal(in)
		body = bytes.NewReader(b)
	}
	code, b := k.call(token, method, path, body, "application/json")
	if code != want {
		k.t.Fatalf("%s %s: %d, want %d: %s", method, path, code, want, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			k.t.Fatalf("%s %s: %v: %s", method, path, err, b)
		}
	}
}

func (k *kiln) token(namespace string, scopes ...string) string {
	k.t.Helper()
	var tok api.Token
	k.json(k.admin, "POST", "/v1/tokens", map[string]any{"subject": namespace + "-" + strings.Join(scopes, "+"), "namespace": namespace, "scopes": scopes, "ttl": "1h"}, http.StatusCreated, &tok)
	return tok.Token
}

// submission is a multipart build request: a tiny context, a FROM scratch
// Dockerfile and the given fields.
func submission(fields ...[2]string) (io.Reader, string) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, f := range fields {
		mw.WriteField(f[0], f[1])
	}
	w, _ := mw.CreateFormFile("context", "context.tar")
	w.Write(scratchContext())
	mw.Close()
	return &buf, mw.FormDataContentType()
}

// build submits a build and, unless it holds, waits for it to succeed.
func (k *kiln) build(token string, fields ...[2]string) api.Build {
	k.t.Helper()
	out := k.submitAs(token, fields...)
	hold := false
	for _, f := range fields {
		hold = hold || f[0] == "build_args" && strings.Contains(f[1], "HOLD")
	}
	want := api.BuildStatusSucceeded
	if hold {
		want = api.BuildStatusRunning
	}
	deadline := time.Now().Add(30 * time.Second)
	for out.Status != want {
		if time.Now().After(deadline) || out.Status == api.BuildStatusFailed {
			k.t.Fatalf("build %s is %s, want %s: %v", out.Id, out.Status, want, out.Error)
		}
		time.Sleep(20 * time.Millisecond)
		k.json(k.admin, "GET", "/v1/builds/"+out.Id, nil, http.StatusOK, &out)
	}
	return out
}

// unique gives every call its own name, so a mutation never depends on
// another's leftovers.
var uniqueN int

func unique(prefix string) string {
	uniqueN++
	return fmt.Sprintf("%s%d", prefix, uniqueN)
}

// scratchContext is a context tar with a FROM scratch Dockerfile.
func scratchContext() []byte {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	df := "FROM scratch\nCOPY f /f\n"
	tw.WriteHeader(&tar.Header{Name: "Dockerfile", Mode: 0o644, Size: int64(len(df)), Typeflag: tar.TypeReg})
	io.WriteString(tw, df)
	tw.WriteHeader(&tar.Header{Name: "f", Mode: 0o644, Size: 1, Typeflag: tar.TypeReg})
	io.WriteString(tw, "x")
	tw.Close()
	return tb.Bytes()
}
