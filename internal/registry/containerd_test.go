package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
)

// TestContainerdResolver pushes and pulls with containerd's resolver, the
// client BuildKit uses, which fetches tokens with the OAuth2 POST form.
func TestContainerdResolver(t *testing.T) {
	e := startRegistry(t)
	var tokenPosts, tokenGets atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/token" {
			if r.Method == http.MethodPost {
				tokenPosts.Add(1)
			} else {
				tokenGets.Add(1)
			}
		}
		e.reg.ServeHTTP(w, r)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")

	resolverFor := func(token string) *docker.ResolverOptions {
		authz := docker.NewDockerAuthorizer(docker.WithAuthCreds(func(string) (string, string, error) { return "buildkit", token, nil }))
		return &docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(
			docker.WithPlainHTTP(docker.MatchAllHosts),
			docker.WithAuthorizer(authz),
		)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	img := writeTestImage(t, "pushed by containerd\n")
	blob := func(d digest.Digest) []byte {
		b, err := os.ReadFile(filepath.Join(img.dir, "blobs", "sha256", d.Encoded()))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var m v1.Manifest
	if err := json.Unmarshal(img.manifestBody, &m); err != nil {
		t.Fatal(err)
	}
	manifestDesc := v1.Descriptor{MediaType: v1.MediaTypeImageManifest, Digest: img.manifest, Size: int64(len(img.manifestBody))}

	writer := e.token([]auth.Scope{auth.ScopeImageWrite}, time.Hour, nil)
	ref := host + "/app/out:latest"
	pusher, err := docker.NewResolver(*resolverFor(writer)).Pusher(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	for _, desc := range []v1.Descriptor{m.Layers[0], m.Config, manifestDesc} {
		w, err := pusher.Push(ctx, desc)
		if errdefs.IsAlreadyExists(err) {
			continue
		}
		if err != nil {
			t.Fatalf("push %s: %v", desc.Digest, err)
		}
		if _, err := io.Copy(w, bytes.NewReader(blob(desc.Digest))); err != nil {
			t.Fatal(err)
		}
		if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
			t.Fatalf("commit %s: %v", desc.Digest, err)
		}
		w.Close()
	}
	if d, err := e.reg.Resolve(ctx, "app/out", "latest"); err != nil || d != img.manifest.String() {
		t.Fatalf("after containerd push, Resolve = %q, %v", d, err)
	}
	if tokenPosts.Load() == 0 || tokenGets.Load() != 0 {
		t.Fatalf("token requests: %d POST, %d GET; containerd should have succeeded with POST alone", tokenPosts.Load(), tokenGets.Load())
	}

	reader := e.token([]auth.Scope{auth.ScopeImageRead}, time.Hour, nil)
	resolver := docker.NewResolver(*resolverFor(reader))
	_, desc, err := resolver.Resolve(ctx, ref)
	if err != nil || desc.Digest != img.manifest {
		t.Fatalf("containerd resolve = %v, %v", desc.Digest, err)
	}
	fetcher, err := resolver.Fetcher(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := fetcher.Fetch(ctx, m.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(got, blob(m.Layers[0].Digest)) {
		t.Fatal("fetched layer differs from pushed layer")
	}

	// Pushing with a read token is refused, not silently ignored.
	pusher, err = docker.NewResolver(*resolverFor(reader)).Pusher(ctx, host+"/bk/other:latest")
	if err != nil {
		t.Fatal(err)
	}
	_, err = pusher.Push(ctx, m.Config)
	if err == nil || errdefs.IsAlreadyExists(err) {
		t.Fatalf("push with read token: %v", err)
	}
	if !strings.Contains(err.Error(), "insufficient_scope") {
		t.Fatalf("push with read token failed for another reason: %v", err)
	}
}
