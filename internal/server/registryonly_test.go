package server

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/testkit"
)

// R8: what a builder VM's registry tunnel reaches serves the registry and
// its token endpoint, and nothing of kiln's API, metrics or health.
func TestRegistryOnlyServesTheRegistryAlone(t *testing.T) {
	a, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg, err := registry.New(context.Background(), registry.Config{RootDir: t.TempDir(), Authority: a,
		Grant: testkit.Policy(t).GrantRegistry, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	srv := httptest.NewServer((&Server{registry: reg}).RegistryOnly())
	defer srv.Close()
	for path, want := range map[string]int{
		"/v2/":                   http.StatusUnauthorized, // the registry's challenge
		"/v2/token?service=kiln": http.StatusUnauthorized, // the token endpoint, asking for a kiln token
		"/healthz":               http.StatusNotFound,
		"/metrics":               http.StatusNotFound,
		"/v1/builds":             http.StatusNotFound,
		"/v1/whoami":             http.StatusNotFound,
		"/v2/../v1/builds":       http.StatusNotFound,
	} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s through the builder's tunnel: %d, want %d", path, resp.StatusCode, want)
		}
	}
}
