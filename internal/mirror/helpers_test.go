package mirror_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/mirror"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/testkit"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// kilnRegistry is a real kiln registry (token auth) served on loopback.
type kilnRegistry struct {
	reg       *registry.Registry
	authority *auth.Authority
	root      string
	srv       *countingServer
}

func startKilnRegistry(t *testing.T) *kilnRegistry {
	t.Helper()
	a, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	root := filepath.Join(t.TempDir(), "registry")
	reg, err := registry.New(ctx, registry.Config{RootDir: root, Authority: a, Grant: testkit.Policy(t).GrantRegistry, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	return &kilnRegistry{reg: reg, authority: a, root: root, srv: serve(t, reg)}
}

// kilnToken issues a kiln token; a registry client logs in with it as the
// password.
func (k *kilnRegistry) kilnToken(t *testing.T, scopes ...auth.Scope) string {
	t.Helper()
	// An admin token reads every namespace, as an upstream account's
	// credentials read what they are meant for; the scopes given narrow
	// nothing then, which these tests do not need.
	tok, err := k.authority.Issue(auth.TokenSpec{Subject: "mirror-test", Scopes: append(scopes, auth.ScopeBuildAdmin), TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return tok.Token
}

// leftoverUploads lists upload sessions still on disk for repo.
func (k *kilnRegistry) leftoverUploads(t *testing.T, repo string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(k.root, "docker/registry/v2/repositories", repo, "_uploads"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func newMirror(t *testing.T, cfg mirror.Config) *mirror.Mirror {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = quietLogger()
	}
	m, err := mirror.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// countingServer serves a real registry on loopback and records every
// request, so tests can tell whether the mirror used the network. It can
// also misbehave the way a broken upstream or network does.
type countingServer struct {
	host string // 127.0.0.1:port
	url  string

	mu       sync.Mutex
	requests []string
	// corrupt, when it returns true, flips the first byte of the answer.
	corrupt func(*http.Request) bool
	// delay holds matching requests back (until the client gives up).
	delay func(*http.Request) time.Duration
	// rewrite may alter a request before the registry sees it.
	rewrite func(*http.Request)
}

func serve(t *testing.T, h http.Handler) *countingServer {
	c := &countingServer{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.requests = append(c.requests, r.Method+" "+r.URL.Path)
		corrupt, delay, rewrite := c.corrupt, c.delay, c.rewrite
		c.mu.Unlock()
		if delay != nil {
			if d := delay(r); d > 0 {
				select {
				case <-time.After(d):
				case <-r.Context().Done():
					return
				}
			}
		}
		if rewrite != nil {
			rewrite(r)
		}
		if corrupt != nil && corrupt(r) {
			w = &corruptingWriter{ResponseWriter: w}
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	c.url = srv.URL
	c.host = strings.TrimPrefix(srv.URL, "http://")
	return c
}

// proxyTo fronts a registry at host (e.g. from testkit.Registry).
func proxyTo(t *testing.T, host string) *countingServer {
	return serve(t, httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: host}))
}

func (c *countingServer) set(fn func(c *countingServer)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	fn(c)
}

func (c *countingServer) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.requests)
}

func (c *countingServer) countMatching(substr string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, r := range c.requests {
		if strings.Contains(r, substr) {
			n++
		}
	}
	return n
}

func (c *countingServer) log() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.Join(c.requests, "\n")
}

type corruptingWriter struct {
	http.ResponseWriter
	done bool
}

func (w *corruptingWriter) Write(p []byte) (int, error) {
	if !w.done && len(p) > 0 {
		w.done = true
		q := append([]byte(nil), p...)
		q[0] ^= 0xff
		return w.ResponseWriter.Write(q)
	}
	return w.ResponseWriter.Write(p)
}

// testImage is a hand-made OCI image: config and layers as bytes.
type testImage struct {
	manifest []byte
	digest   digest.Digest
	config   blob
	layers   []blob
	arch     string
}

type blob struct {
	mediaType string
	data      []byte
	digest    digest.Digest
}

func newBlob(mediaType string, data []byte) blob {
	return blob{mediaType: mediaType, data: data, digest: digest.FromBytes(data)}
}

func (img testImage) blobs() []blob { return append([]blob{img.config}, img.layers...) }

func (img testImage) size() int64 {
	var n int64
	for _, b := range img.blobs() {
		n += int64(len(b.data))
	}
	return n
}

// tarGz packs files (path → content; mode 0755 for paths under /bin) into
// a gzip layer and returns it with its uncompressed digest.
func tarGz(t *testing.T, files map[string][]byte, symlinks map[string]string) (layer []byte, diffID digest.Digest) {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	dirs := map[string]bool{}
	for name := range files {
		if d := filepath.Dir(name); d != "." && !dirs[d] {
			dirs[d] = true
			tw.WriteHeader(&tar.Header{Name: d + "/", Mode: 0o755, Typeflag: tar.TypeDir, ModTime: time.Unix(0, 0)})
		}
	}
	for name, data := range files {
		mode := int64(0o644)
		if strings.HasPrefix(name, "bin/") {
			mode = 0o755
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)}); err != nil {
			t.Fatal(err)
		}
		tw.Write(data)
	}
	for name, target := range symlinks {
		tw.WriteHeader(&tar.Header{Name: name, Linkname: target, Mode: 0o777, Typeflag: tar.TypeSymlink, ModTime: time.Unix(0, 0)})
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(raw.Bytes())
	zw.Close()
	return gz.Bytes(), digest.FromBytes(raw.Bytes())
}

// buildImage makes a linux/arch image with one layer holding files, plus
// optional extra layers (already gzip'd, with their diff IDs).
func buildImage(t *testing.T, arch string, files map[string][]byte, symlinks map[string]string) testImage {
	t.Helper()
	layer, diffID := tarGz(t, files, symlinks)
	cfg := v1.Image{
		Platform: v1.Platform{OS: "linux", Architecture: arch},
		Config:   v1.ImageConfig{Env: []string{"PATH=/bin"}},
		RootFS:   v1.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}},
	}
	cfgJSON, _ := json.Marshal(cfg)
	img := testImage{
		config: newBlob(v1.MediaTypeImageConfig, cfgJSON),
		layers: []blob{newBlob(v1.MediaTypeImageLayerGzip, layer)},
		arch:   arch,
	}
	man := v1.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: v1.MediaTypeImageManifest,
		Config:    v1.Descriptor{MediaType: img.config.mediaType, Digest: img.config.digest, Size: int64(len(img.config.data))},
	}
	for _, l := range img.layers {
		man.Layers = append(man.Layers, v1.Descriptor{MediaType: l.mediaType, Digest: l.digest, Size: int64(len(l.data))})
	}
	img.manifest, _ = json.Marshal(man)
	img.digest = digest.FromBytes(img.manifest)
	return img
}

// buildIndex makes an OCI index over children, plus an attestation-style
// child with platform unknown/unknown as Docker Hub images carry.
func buildIndex(children []testImage, attestation *testImage) []byte {
	idx := v1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageIndex}
	for _, c := range children {
		idx.Manifests = append(idx.Manifests, v1.Descriptor{
			MediaType: v1.MediaTypeImageManifest, Digest: c.digest, Size: int64(len(c.manifest)),
			Platform: &v1.Platform{OS: "linux", Architecture: c.arch},
		})
	}
	if attestation != nil {
		idx.Manifests = append(idx.Manifests, v1.Descriptor{
			MediaType: v1.MediaTypeImageManifest, Digest: attestation.digest, Size: int64(len(attestation.manifest)),
			Platform:    &v1.Platform{OS: "unknown", Architecture: "unknown"},
			Annotations: map[string]string{"vnd.docker.reference.type": "attestation-manifest"},
		})
	}
	b, _ := json.Marshal(idx)
	return b
}

// pusher pushes over the registry HTTP API, with basic auth if set.
type pusher struct {
	t          *testing.T
	base       string // http://host:port
	user, pass string
}

func (p pusher) do(method, u string, body []byte, contentType string) *http.Response {
	p.t.Helper()
	req, err := http.NewRequest(method, u, bytes.NewReader(body))
	if err != nil {
		p.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if p.user != "" {
		req.SetBasicAuth(p.user, p.pass)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		p.t.Fatalf("%s %s: %v", method, u, err)
	}
	return resp
}

func (p pusher) blob(repo string, b blob) {
	p.t.Helper()
	resp := p.do(http.MethodPost, p.base+"/v2/"+repo+"/blobs/uploads/", nil, "")
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		p.t.Fatalf("start upload to %s: %s", repo, resp.Status)
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		p.t.Fatal(err)
	}
	loc = resp.Request.URL.ResolveReference(loc)
	q := loc.Query()
	q.Set("digest", b.digest.String())
	loc.RawQuery = q.Encode()
	resp = p.do(http.MethodPut, loc.String(), b.data, "application/octet-stream")
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		p.t.Fatalf("upload blob %s to %s: %s %s", b.digest, repo, resp.Status, msg)
	}
}

func (p pusher) manifest(repo, ref, mediaType string, body []byte) {
	p.t.Helper()
	resp := p.do(http.MethodPut, p.base+"/v2/"+repo+"/manifests/"+ref, body, mediaType)
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		p.t.Fatalf("put manifest %s:%s: %s %s", repo, ref, resp.Status, msg)
	}
}

// image pushes img's blobs and manifest and tags it (ref may be a digest).
func (p pusher) image(repo, ref string, img testImage) {
	p.t.Helper()
	for _, b := range img.blobs() {
		p.blob(repo, b)
	}
	p.manifest(repo, ref, v1.MediaTypeImageManifest, img.manifest)
}

// storeImage puts img into a kiln registry through its store API, for
// upstreams that are kiln registries themselves.
func storeImage(t *testing.T, reg *registry.Registry, repo, tag string, img testImage) {
	t.Helper()
	ctx := testCtx(t)
	for _, b := range img.blobs() {
		if err := reg.PutBlob(ctx, repo, b.digest.String(), int64(len(b.data)), bytes.NewReader(b.data)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := reg.PutManifest(ctx, repo, v1.MediaTypeImageManifest, img.manifest, tag); err != nil {
		t.Fatal(err)
	}
}

const skopeoPath = "/usr/bin/skopeo"

// skopeoPull copies ref (docker://…) from kiln's registry into an OCI
// layout, fetching every blob as a client pulling the image would, and
// returns the layout directory.
func skopeoPull(t *testing.T, ref, kilnToken string) (string, error) {
	t.Helper()
	if _, err := os.Stat(skopeoPath); err != nil {
		t.Fatalf("skopeo is required at %s (apt-get install -y skopeo): %v", skopeoPath, err)
	}
	scratch := t.TempDir()
	policy := filepath.Join(scratch, "policy.json")
	os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	dir := filepath.Join(scratch, "layout")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, skopeoPath, "--policy", policy, "copy", "--src-tls-verify=false",
		"--src-creds", "kiln:"+kilnToken, ref, "oci:"+dir+":out")
	cmd.Env = []string{"HOME=" + scratch, "XDG_RUNTIME_DIR=" + scratch, "PATH=/usr/bin:/bin"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("skopeo copy %s: %v\n%s", ref, err, out)
	}
	return dir, nil
}

// layoutHasBlob reports whether an OCI layout holds blob d.
func layoutHasBlob(dir string, d digest.Digest) bool {
	_, err := os.Stat(filepath.Join(dir, "blobs", d.Algorithm().String(), d.Encoded()))
	return err == nil
}
