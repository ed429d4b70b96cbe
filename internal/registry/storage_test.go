package registry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/testkit"
)

// The tests in this file are one behavioural suite run over every storage
// driver: the filesystem and a real S3 server (versitygw). Each checks
// what it stored through the store's own files too (the filesystem under
// the registry root, the bucket's directory under versitygw), never only
// through the registry, so a registry that silently kept S3 content
// elsewhere fails.

// backend is one storage the suite runs over.
type backend struct {
	name string
	// start serves a fresh registry; restart a new one over r's storage.
	start   func(t *testing.T) *testkit.KilnRegistry
	restart func(t *testing.T, r *testkit.KilnRegistry) *testkit.KilnRegistry
	// stored reports whether storage path p (/docker/registry/v2/...) is
	// in the backend, looked up without the storage driver.
	stored func(t *testing.T, p string) bool
}

func backends() []backend {
	fs := backend{name: "filesystem"}
	var fsRoot string
	fs.start = func(t *testing.T) *testkit.KilnRegistry {
		r := testkit.StartKilnRegistry(t)
		fsRoot = r.Root
		return r
	}
	fs.restart = func(t *testing.T, r *testkit.KilnRegistry) *testkit.KilnRegistry {
		return testkit.ServeKilnRegistry(t, r.Root, r.Authority)
	}
	fs.stored = func(t *testing.T, p string) bool { return fileExists(t, filepath.Join(fsRoot, filepath.FromSlash(p))) }

	s3 := backend{name: "s3"}
	var srv *testkit.S3Server
	// A key prefix, as registry.s3.rootdirectory sets, so the suite also
	// shows that everything stays under it.
	const prefix = "kiln/registry"
	s3.start = func(t *testing.T) *testkit.KilnRegistry {
		srv = testkit.StartS3(t)
		a, _, err := auth.LoadOrCreate(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		local := filepath.Join(t.TempDir(), "registry")
		r := testkit.ServeKilnRegistryOn(t, local, srv.RegistryStorage(prefix), a)
		t.Cleanup(func() {
			if _, err := os.Stat(local); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the s3 registry made the local root %s (stat: %v)", local, err)
			}
		})
		return r
	}
	s3.restart = func(t *testing.T, r *testkit.KilnRegistry) *testkit.KilnRegistry {
		return testkit.ServeKilnRegistryOn(t, r.Root, r.Storage, r.Authority)
	}
	s3.stored = func(t *testing.T, p string) bool { return fileExists(t, srv.ObjectFile(prefix+p)) }
	return []backend{fs, s3}
}

// forEachStorage runs fn as a subtest over every backend.
func forEachStorage(t *testing.T, fn func(t *testing.T, b backend)) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) { fn(t, b) })
	}
}

func fileExists(t *testing.T, p string) bool {
	t.Helper()
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().IsRegular()
}

func blobData(d digest.Digest) string {
	return fmt.Sprintf("/docker/registry/v2/blobs/%s/%s/%s/data", d.Algorithm(), d.Encoded()[:2], d.Encoded())
}

// image is a small OCI image pushed over the HTTP API.
type image struct {
	config, layer v1.Descriptor
	manifest      digest.Digest
	body          []byte
	layerData     []byte
}

func pushImage(t *testing.T, r *testkit.KilnRegistry, repo, tag, content string) image {
	t.Helper()
	var img image
	img.layerData = []byte("layer of " + content)
	img.layer = r.PushBlob(t, repo, v1.MediaTypeImageLayer, img.layerData)
	img.config = r.PushBlob(t, repo, v1.MediaTypeImageConfig,
		[]byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["`+digest.FromBytes(img.layerData).String()+`"]},"comment":"`+content+`"}`))
	body, err := json.Marshal(v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
		Config: img.config, Layers: []v1.Descriptor{img.layer}})
	if err != nil {
		t.Fatal(err)
	}
	img.body = body
	img.manifest = digest.Digest(r.PushManifest(t, repo, tag, v1.MediaTypeImageManifest, body))
	return img
}

// get sends an authenticated GET (or HEAD) as subject with pull access to
// repo, without following redirects.
func get(t *testing.T, r *testkit.KilnRegistry, method, subject, repo, path string) (*http.Response, []byte) {
	t.Helper()
	tok, err := r.Authority.IssueRegistryToken(auth.Principal{Subject: subject, Scopes: []auth.Scope{auth.ScopeImageRead}}, "kiln",
		[]auth.RegistryAccess{{Type: "repository", Name: repo, Actions: []string{"pull"}}})
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(method, r.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+tok.Token)
	req.Header.Set("Accept", v1.MediaTypeImageManifest)
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

// pull fetches repo:tag and every blob over the HTTP API and checks them.
func pull(t *testing.T, r *testkit.KilnRegistry, repo, tag string, img image) {
	t.Helper()
	resp, body := get(t, r, http.MethodGet, "puller", repo, "/v2/"+repo+"/manifests/"+tag)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, img.body) || resp.Header.Get("Docker-Content-Digest") != img.manifest.String() {
		t.Fatalf("GET %s:%s: %d, digest %q, body equal %v; want the pushed manifest %s", repo, tag, resp.StatusCode,
			resp.Header.Get("Docker-Content-Digest"), bytes.Equal(body, img.body), img.manifest)
	}
	for _, d := range []v1.Descriptor{img.config, img.layer} {
		resp, body := get(t, r, http.MethodGet, "puller", repo, "/v2/"+repo+"/blobs/"+d.Digest.String())
		if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != d.Digest {
			t.Fatalf("GET blob %s from %s: %d, content %s", d.Digest, repo, resp.StatusCode, digest.FromBytes(body))
		}
	}
	resp, _ = get(t, r, http.MethodHead, "puller", repo, "/v2/"+repo+"/blobs/"+img.layer.Digest.String())
	if resp.StatusCode != http.StatusOK || resp.ContentLength != img.layer.Size {
		t.Fatalf("HEAD layer of %s: %d, length %d; want 200, %d", repo, resp.StatusCode, resp.ContentLength, img.layer.Size)
	}
}

// uploads lists repo's upload sessions through the storage driver.
func uploads(t *testing.T, r *testkit.KilnRegistry, repo string) []string {
	t.Helper()
	names, err := r.Registry.Driver().List(context.Background(), "/docker/registry/v2/repositories/"+repo+"/_uploads")
	var missing storagedriver.PathNotFoundError
	if err != nil && !errors.As(err, &missing) {
		t.Fatal(err)
	}
	return names
}

func TestStoragePushPullAndHelpers(t *testing.T) {
	forEachStorage(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.start(t)
		if repos, err := r.Registry.Catalog(ctx); err != nil || len(repos) != 0 {
			t.Fatalf("empty registry: Catalog = %v, %v", repos, err)
		}
		img := pushImage(t, r, "app/hello", "v1", "hello")
		for _, d := range []digest.Digest{img.layer.Digest, img.config.Digest} {
			if !b.stored(t, blobData(d)) {
				t.Fatalf("blob %s is not in the %s store after a push", d, b.name)
			}
		}
		pull(t, r, "app/hello", "v1", img)

		// The helpers the rest of kiln uses.
		if d, err := r.Registry.Resolve(ctx, "app/hello", "v1"); err != nil || d != img.manifest.String() {
			t.Fatalf("Resolve = %s, %v", d, err)
		}
		if mt, body, d, err := r.Registry.Manifest(ctx, "app/hello", "v1"); err != nil || mt != v1.MediaTypeImageManifest || d != img.manifest.String() || !bytes.Equal(body, img.body) {
			t.Fatalf("Manifest = %s %s %v", mt, d, err)
		}
		rc, err := r.Registry.Blob(ctx, img.layer.Digest.String())
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, img.layerData) {
			t.Fatalf("Blob read %q, %v; want %q", got, err, img.layerData)
		}
		if _, err := r.Registry.Blob(ctx, digest.FromString("never pushed").String()); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("Blob of unknown content: %v, want ErrNotFound", err)
		}
		if err := r.Registry.Tag(ctx, "app/hello", "v1", "app/promoted", "stable"); err != nil {
			t.Fatal(err)
		}
		pull(t, r, "app/promoted", "stable", img)
		if tags, err := r.Registry.Tags(ctx, "app/hello"); err != nil || !reflect.DeepEqual(tags, []string{"v1"}) {
			t.Fatalf("Tags = %v, %v", tags, err)
		}
		if repos, err := r.Registry.Catalog(ctx); err != nil || !reflect.DeepEqual(repos, []string{"app/hello", "app/promoted"}) {
			t.Fatalf("Catalog = %v, %v", repos, err)
		}
		if err := r.Registry.DeleteTag(ctx, "app/promoted", "stable"); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Registry.Resolve(ctx, "app/promoted", "stable"); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("deleted tag resolves: %v", err)
		}
		pull(t, r, "app/hello", "v1", img)

		// Ingest, as the base-image mirror stores images.
		layer := []byte("mirrored layer")
		ld := digest.FromBytes(layer)
		if err := r.Registry.PutBlob(ctx, "mirror/x/app", ld.String(), int64(len(layer)), strings.NewReader("MIRRORED layer")); !errors.Is(err, registry.ErrDigestMismatch) {
			t.Fatalf("PutBlob of wrong content: %v, want ErrDigestMismatch", err)
		}
		if s := uploads(t, r, "mirror/x/app"); len(s) != 0 {
			t.Fatalf("a refused PutBlob left upload sessions %v", s)
		}
		if err := r.Registry.PutBlob(ctx, "mirror/x/app", ld.String(), int64(len(layer)), bytes.NewReader(layer)); err != nil {
			t.Fatal(err)
		}
		if !b.stored(t, blobData(ld)) {
			t.Fatalf("ingested blob is not in the %s store", b.name)
		}
		if ok, err := r.Registry.LinkBlob(ctx, "mirror/x/app", img.config.Digest.String()); !ok || err != nil {
			t.Fatalf("LinkBlob = %v, %v", ok, err)
		}
		body, _ := json.Marshal(v1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: v1.MediaTypeImageManifest,
			Config: img.config, Layers: []v1.Descriptor{{MediaType: v1.MediaTypeImageLayer, Digest: ld, Size: int64(len(layer))}}})
		md, err := r.Registry.PutManifest(ctx, "mirror/x/app", v1.MediaTypeImageManifest, body, "1")
		if err != nil {
			t.Fatal(err)
		}
		pull(t, r, "mirror/x/app", "1", image{config: img.config, layer: v1.Descriptor{Digest: ld, Size: int64(len(layer))}, manifest: digest.Digest(md), body: body})
	})
}

func TestStorageGC(t *testing.T) {
	forEachStorage(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		r := b.start(t)
		// A registry that never stored anything collects nothing.
		if st, err := r.Registry.GC(ctx); err != nil || st.BlobsBefore != 0 || st.BlobsAfter != 0 {
			t.Fatalf("GC of an empty registry: %+v, %v", st, err)
		}
		gone := pushImage(t, r, "gc/gone", "1", "deleted")
		kept := pushImage(t, r, "gc/kept", "1", "kept")
		if err := r.Registry.DeleteTag(ctx, "gc/gone", "1"); err != nil {
			t.Fatal(err)
		}
		st, err := r.Registry.GC(ctx)
		if err != nil {
			t.Fatal(err)
		}
		wantBefore := int64(len(gone.layerData)+len(kept.layerData)) + gone.config.Size + kept.config.Size + int64(len(gone.body)+len(kept.body))
		if st.BlobsBefore != 6 || st.BytesBefore != wantBefore || st.BlobsAfter != 3 || st.BytesAfter != wantBefore-int64(len(gone.layerData))-gone.config.Size-int64(len(gone.body)) {
			t.Errorf("GC stats %+v; want 6 blobs (%d bytes) before, the kept image's 3 after", st, wantBefore)
		}
		for _, d := range []digest.Digest{gone.layer.Digest, gone.config.Digest, gone.manifest} {
			if b.stored(t, blobData(d)) {
				t.Errorf("GC left unreferenced blob %s in the %s store", d, b.name)
			}
			if _, err := r.Registry.Blob(ctx, d.String()); !errors.Is(err, registry.ErrNotFound) {
				t.Errorf("Blob(%s) after GC: %v, want ErrNotFound", d, err)
			}
		}
		for _, d := range []digest.Digest{kept.layer.Digest, kept.config.Digest, kept.manifest} {
			if !b.stored(t, blobData(d)) {
				t.Errorf("GC removed referenced blob %s from the %s store", d, b.name)
			}
		}
		pull(t, r, "gc/kept", "1", kept)
		// The collected image pushes again.
		again := pushImage(t, r, "gc/gone", "2", "deleted")
		pull(t, r, "gc/gone", "2", again)
	})
}

// TestStorageRedirect checks presigned redirects on S3: other clients are
// sent to the store and get the blob there; builds, which may reach only
// kiln, are answered by kiln.
func TestStorageRedirect(t *testing.T) {
	srv := testkit.StartS3(t)
	a, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	st := srv.RegistryStorage("")
	st.S3.Redirect = "presigned"
	r := testkit.ServeKilnRegistryOn(t, t.TempDir(), st, a)
	img := pushImage(t, r, "app/r", "1", "redirected")
	blobPath := "/v2/app/r/blobs/" + img.layer.Digest.String()

	resp, _ := get(t, r, http.MethodGet, "puller", "app/r", blobPath)
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusTemporaryRedirect || !strings.HasPrefix(loc, srv.Endpoint+"/") {
		t.Fatalf("GET blob: %d to %q; want a redirect into %s", resp.StatusCode, loc, srv.Endpoint)
	}
	if strings.Contains(loc, srv.SecretKey) {
		t.Fatal("the presigned URL carries the secret key")
	}
	fetched, err := http.Get(loc)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(fetched.Body)
	fetched.Body.Close()
	if fetched.StatusCode != http.StatusOK || !bytes.Equal(body, img.layerData) {
		t.Fatalf("presigned GET: %d %q", fetched.StatusCode, body)
	}

	resp, body = get(t, r, http.MethodGet, "build:b1", "app/r", blobPath)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, img.layerData) {
		t.Fatalf("GET blob as a build: %d (Location %q); want the blob from kiln", resp.StatusCode, resp.Header.Get("Location"))
	}
	// Manifests are always kiln's to serve.
	resp, body = get(t, r, http.MethodGet, "puller", "app/r", "/v2/app/r/manifests/1")
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, img.body) {
		t.Fatalf("GET manifest with redirects on: %d", resp.StatusCode)
	}
}

// TestStorageS3Errors checks that a bad S3 setting stops New with an error
// that says what to check and never carries the secret.
func TestStorageS3Errors(t *testing.T) {
	srv := testkit.StartS3(t)
	a, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + ln.Addr().String()
	ln.Close()

	for name, c := range map[string]struct {
		edit func(*registry.S3Config)
		want string
	}{
		"no bucket":       {func(c *registry.S3Config) { c.Bucket = "" }, "set registry.s3.bucket"},
		"missing bucket":  {func(c *registry.S3Config) { c.Bucket = "nosuchbucket" }, `check that bucket "nosuchbucket" exists`},
		"wrong secret":    {func(c *registry.S3Config) { c.SecretKey = "wrong-secret-value" }, "check the credentials"},
		"half the keys":   {func(c *registry.S3Config) { c.SecretKey = "" }, "set both registry.s3.accesskey and registry.s3.secretkey"},
		"unreachable":     {func(c *registry.S3Config) { c.RegionEndpoint = closed }, "check registry.s3.regionendpoint (" + closed + ") and that this host can reach it"},
		"bad endpoint":    {func(c *registry.S3Config) { c.RegionEndpoint = "minio:9000" }, "not an http(s) URL"},
		"bad redirect":    {func(c *registry.S3Config) { c.Redirect = "sometimes" }, "registry.s3.redirect"},
		"no region (AWS)": {func(c *registry.S3Config) { c.RegionEndpoint, c.Region = "", "" }, "set registry.s3.region"},
	} {
		t.Run(name, func(t *testing.T) {
			st := srv.RegistryStorage("")
			c.edit(&st.S3)
			_, err := registry.New(context.Background(), registry.Config{Storage: st, Authority: a, Grant: testkit.Policy(t).GrantRegistry})
			t.Log(err)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("New: %v; want an error saying %q", err, c.want)
			}
			for _, secret := range []string{srv.SecretKey, "wrong-secret-value"} {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("the error carries the secret key: %v", err)
				}
			}
		})
	}
}
