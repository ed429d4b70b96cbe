package testkit

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/auth"
	kilnregistry "github.com/kiln-build/kiln/internal/registry"
)

// KilnRegistry is kiln's own embedded registry (token auth and all)
// served over HTTP for a test, with helpers to push images written in Go.
type KilnRegistry struct {
	Registry *kilnregistry.Registry
	Root     string // storage root directory (filesystem storage)
	// Storage is the registry's storage; the zero value is the
	// filesystem under Root.
	Storage   kilnregistry.StorageConfig
	URL       string // http://127.0.0.1:port
	Authority *auth.Authority
}

// StartKilnRegistry serves a fresh kiln registry until the test ends.
func StartKilnRegistry(t testing.TB) *KilnRegistry {
	t.Helper()
	a, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return ServeKilnRegistry(t, filepath.Join(t.TempDir(), "registry"), a)
}

// ServeKilnRegistry serves a new kiln registry over the storage at root
// (an earlier one's, to play a restart) until the test ends.
func ServeKilnRegistry(t testing.TB, root string, a *auth.Authority) *KilnRegistry {
	t.Helper()
	return ServeKilnRegistryOn(t, root, kilnregistry.StorageConfig{}, a)
}

// ServeKilnRegistryOn serves a new kiln registry over storage (the
// filesystem under root when storage is the zero value) until the test
// ends.
func ServeKilnRegistryOn(t testing.TB, root string, storage kilnregistry.StorageConfig, a *auth.Authority) *KilnRegistry {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	reg, err := kilnregistry.New(ctx, kilnregistry.Config{
		RootDir:   root,
		Storage:   storage,
		Authority: a,
		Grant:     Policy(t).GrantRegistry,
		Logger:    slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	srv := httptest.NewServer(reg)
	t.Cleanup(srv.Close)
	return &KilnRegistry{Registry: reg, Root: root, Storage: storage, URL: srv.URL, Authority: a}
}

// Do sends one registry API request with a push token for repo and fails
// the test unless the answer has status want.
func (r *KilnRegistry) Do(t testing.TB, repo, method, u, contentType string, body []byte, want int) *http.Response {
	t.Helper()
	tok, err := r.Authority.IssueRegistryToken(auth.Principal{Subject: "testkit", Scopes: []auth.Scope{auth.ScopeImageWrite}}, "kiln", []auth.RegistryAccess{{Type: "repository", Name: repo, Actions: []string{"pull", "push"}}})
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(method, u, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+tok.Token)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		t.Fatalf("%s %s: status %d, want %d: %s", method, u, resp.StatusCode, want, msg)
	}
	return resp
}

// PushBlob uploads data to repo and returns its descriptor.
func (r *KilnRegistry) PushBlob(t testing.TB, repo, mediaType string, data []byte) v1.Descriptor {
	t.Helper()
	d := digest.FromBytes(data)
	resp := r.Do(t, repo, http.MethodPost, r.URL+"/v2/"+repo+"/blobs/uploads/", "", nil, http.StatusAccepted)
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	base, _ := url.Parse(r.URL)
	u := base.ResolveReference(loc)
	q := u.Query()
	q.Set("digest", d.String())
	u.RawQuery = q.Encode()
	r.Do(t, repo, http.MethodPut, u.String(), "application/octet-stream", data, http.StatusCreated)
	return v1.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}
}

// PushManifest stores body as repo:tag and returns its digest.
func (r *KilnRegistry) PushManifest(t testing.TB, repo, tag, mediaType string, body []byte) string {
	t.Helper()
	r.Do(t, repo, http.MethodPut, r.URL+"/v2/"+repo+"/manifests/"+tag, mediaType, body, http.StatusCreated)
	return digest.FromBytes(body).String()
}
