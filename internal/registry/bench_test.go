package registry_test

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/testkit"
)

// benchLayerSize is the image's one layer: 100 MiB of random bytes, which
// no store or transport can compress.
const benchLayerSize = 100 << 20

// benchChunkSize is what each PATCH of a blob upload carries, with its
// Content-Range, as chunked OCI clients send a large layer. It is not a
// multiple of the s3 driver's part size (10 MiB), so S3 uploads resume
// with a partial part between requests, as they do for real clients.
const benchChunkSize = 16 << 20

// BenchmarkPushPull100MiBS3OverFilesystem measures, in one run, pushing
// an image with a 100 MiB incompressible layer to kiln's registry (HEAD,
// POST, PATCH in chunks, PUT ?digest= for each blob, then the manifest)
// and pulling it back (manifest by tag, every blob, digests checked), on
// the filesystem storage and on S3 (versitygw), and reports the ratios
// s3/filesystem for push and for pull. Every op pushes a new layer, so no
// push finds its blob already stored; both storages get the same one.
func BenchmarkPushPull100MiBS3OverFilesystem(b *testing.B) {
	a, _, err := auth.LoadOrCreate(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	s3srv := testkit.StartS3(b)
	names := []string{"filesystem", "s3"}
	regs := map[string]*testkit.KilnRegistry{
		"filesystem": testkit.ServeKilnRegistry(b, filepath.Join(b.TempDir(), "registry"), a),
		"s3":         testkit.ServeKilnRegistryOn(b, filepath.Join(b.TempDir(), "registry"), s3srv.RegistryStorage("bench"), a),
	}
	layer := make([]byte, benchLayerSize)
	push, pull := map[string]time.Duration{}, map[string]time.Duration{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := rand.Read(layer); err != nil {
			b.Fatal(err)
		}
		repo, tag := "bench/big", fmt.Sprintf("op%d-%d", i, time.Now().UnixNano())
		for _, name := range names {
			c := newBenchClient(b, regs[name], repo)
			start := time.Now()
			img := c.pushImage(tag, layer)
			push[name] += time.Since(start)

			start = time.Now()
			c.pullImage(tag, img)
			pull[name] += time.Since(start)
		}
	}
	n := float64(b.N)
	for _, name := range names {
		b.ReportMetric(push[name].Seconds()/n, name+"-push-s/op")
		b.ReportMetric(pull[name].Seconds()/n, name+"-pull-s/op")
	}
	b.ReportMetric(push["s3"].Seconds()/push["filesystem"].Seconds(), "push-s3/filesystem")
	b.ReportMetric(pull["s3"].Seconds()/pull["filesystem"].Seconds(), "pull-s3/filesystem")
	b.ReportMetric(0, "ns/op")
}

// benchClient talks to one registry for one repository the way an OCI
// client does, with a pull-and-push registry token.
type benchClient struct {
	b     *testing.B
	r     *testkit.KilnRegistry
	repo  string
	token string
}

func newBenchClient(b *testing.B, r *testkit.KilnRegistry, repo string) *benchClient {
	b.Helper()
	tok, err := r.Authority.IssueRegistryToken(auth.Principal{Subject: "bench", Scopes: []auth.Scope{auth.ScopeImageWrite}}, "kiln",
		[]auth.RegistryAccess{{Type: "repository", Name: repo, Actions: []string{"pull", "push"}}})
	if err != nil {
		b.Fatal(err)
	}
	return &benchClient{b: b, r: r, repo: repo, token: tok.Token}
}

// send sends one request and fails the benchmark unless the answer has
// status want. The caller closes the body.
func (c *benchClient) send(method, u string, header http.Header, body []byte, want int) *http.Response {
	c.b.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, u, rd)
	if err != nil {
		c.b.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.b.Fatalf("%s %s: %v", method, u, err)
	}
	if resp.StatusCode != want {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		c.b.Fatalf("%s %s: status %d, want %d: %s", method, u, resp.StatusCode, want, msg)
	}
	return resp
}

// next is the upload URL an upload response's Location names.
func (c *benchClient) next(resp *http.Response) *url.URL {
	c.b.Helper()
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil || loc.String() == "" {
		c.b.Fatalf("upload response without a usable Location (%q): %v", resp.Header.Get("Location"), err)
	}
	base, _ := url.Parse(c.r.URL)
	return base.ResolveReference(loc)
}

// pushBlob uploads data unless the registry has it: HEAD, POST, PATCHes
// of benchChunkSize with Content-Range, then PUT ?digest=.
func (c *benchClient) pushBlob(mediaType string, data []byte) v1.Descriptor {
	c.b.Helper()
	d := v1.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))}
	blobs := c.r.URL + "/v2/" + c.repo + "/blobs/"
	resp := c.send(http.MethodHead, blobs+d.Digest.String(), nil, nil, http.StatusNotFound)
	resp.Body.Close()
	resp = c.send(http.MethodPost, blobs+"uploads/", nil, nil, http.StatusAccepted)
	resp.Body.Close()
	u := c.next(resp)
	for off := 0; off < len(data); off += benchChunkSize {
		chunk := data[off:min(off+benchChunkSize, len(data))]
		h := http.Header{}
		h.Set("Content-Type", "application/octet-stream")
		h.Set("Content-Range", fmt.Sprintf("%d-%d", off, off+len(chunk)-1))
		h.Set("Content-Length", strconv.Itoa(len(chunk)))
		resp = c.send(http.MethodPatch, u.String(), h, chunk, http.StatusAccepted)
		resp.Body.Close()
		u = c.next(resp)
	}
	q := u.Query()
	q.Set("digest", d.Digest.String())
	u.RawQuery = q.Encode()
	resp = c.send(http.MethodPut, u.String(), nil, nil, http.StatusCreated)
	resp.Body.Close()
	if got := resp.Header.Get("Docker-Content-Digest"); got != d.Digest.String() {
		c.b.Fatalf("PUT blob: Docker-Content-Digest %q, want %s", got, d.Digest)
	}
	return d
}

// benchImage is what pushImage stored and pullImage checks.
type benchImage struct {
	manifest digest.Digest
	blobs    []v1.Descriptor
}

// pushImage pushes an image of one layer (layer's bytes) as repo:tag.
func (c *benchClient) pushImage(tag string, layer []byte) benchImage {
	c.b.Helper()
	l := c.pushBlob(v1.MediaTypeImageLayer, layer)
	config, err := json.Marshal(v1.Image{Platform: v1.Platform{Architecture: "amd64", OS: "linux"},
		RootFS: v1.RootFS{Type: "layers", DiffIDs: []digest.Digest{l.Digest}}})
	if err != nil {
		c.b.Fatal(err)
	}
	cfg := c.pushBlob(v1.MediaTypeImageConfig, config)
	body, err := json.Marshal(v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
		Config: cfg, Layers: []v1.Descriptor{l}})
	if err != nil {
		c.b.Fatal(err)
	}
	h := http.Header{}
	h.Set("Content-Type", v1.MediaTypeImageManifest)
	resp := c.send(http.MethodPut, c.r.URL+"/v2/"+c.repo+"/manifests/"+tag, h, body, http.StatusCreated)
	resp.Body.Close()
	return benchImage{manifest: digest.FromBytes(body), blobs: []v1.Descriptor{cfg, l}}
}

// pullImage fetches repo:tag and every blob it names, streaming each
// through its digest, and fails unless they are img's.
func (c *benchClient) pullImage(tag string, img benchImage) {
	c.b.Helper()
	h := http.Header{}
	h.Set("Accept", v1.MediaTypeImageManifest)
	resp := c.send(http.MethodGet, c.r.URL+"/v2/"+c.repo+"/manifests/"+tag, h, nil, http.StatusOK)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		c.b.Fatal(err)
	}
	if got := digest.FromBytes(body); got != img.manifest {
		c.b.Fatalf("pulled manifest %s:%s is %s, want %s", c.repo, tag, got, img.manifest)
	}
	var m v1.Manifest
	if err := json.Unmarshal(body, &m); err != nil {
		c.b.Fatal(err)
	}
	want := append([]v1.Descriptor{m.Config}, m.Layers...)
	if len(want) != len(img.blobs) {
		c.b.Fatalf("pulled manifest names %d blobs, want %d", len(want), len(img.blobs))
	}
	for i, d := range want {
		if d.Digest != img.blobs[i].Digest {
			c.b.Fatalf("pulled manifest names blob %s, want %s", d.Digest, img.blobs[i].Digest)
		}
		resp := c.send(http.MethodGet, c.r.URL+"/v2/"+c.repo+"/blobs/"+d.Digest.String(), nil, nil, http.StatusOK)
		v := d.Digest.Verifier()
		n, err := io.Copy(v, resp.Body)
		resp.Body.Close()
		if err != nil {
			c.b.Fatalf("pull blob %s: %v", d.Digest, err)
		}
		if n != d.Size || !v.Verified() {
			c.b.Fatalf("pulled blob %s: %d bytes (want %d), digest verified %v", d.Digest, n, d.Size, v.Verified())
		}
	}
}
