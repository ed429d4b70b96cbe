package testkit

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"
)

// RegistryOptions configures StartRegistry.
type RegistryOptions struct {
	// Username and Password, when set, make the registry demand HTTP basic
	// auth (htpasswd) for every request.
	Username string
	Password string
}

// Registry starts a plain-HTTP OCI registry (distribution v3, filesystem
// storage in a temp dir, no auth) on 127.0.0.1 and returns its host:port.
// It stops when the test ends.
func Registry(t testing.TB) string {
	t.Helper()
	return registry(t, RegistryOptions{})
}

// RegistryWithAuth is Registry with basic auth for one user.
func RegistryWithAuth(t testing.TB, username, password string) string {
	t.Helper()
	return registry(t, RegistryOptions{Username: username, Password: password})
}

func registry(t testing.TB, opt RegistryOptions) string {
	t.Helper()
	addr, stop, err := StartRegistry(t.TempDir(), opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return addr
}

// StartRegistry is Registry for code without a testing.TB (TestMain): it
// stores blobs below dir and serves until stop is called.
func StartRegistry(dir string, opt RegistryOptions) (addr string, stop func(), err error) {
	// distribution logs every request, and every 404 a pusher probes for,
	// through logrus' standard logger; that drowns real failure output.
	logrus.SetLevel(logrus.FatalLevel)

	cfg := &configuration.Configuration{
		Storage: configuration.Storage{
			"filesystem": configuration.Parameters{"rootdirectory": filepath.Join(dir, "storage")},
			"delete":     configuration.Parameters{"enabled": true},
			"maintenance": configuration.Parameters{"uploadpurging": map[any]any{
				"enabled": false,
			}},
		},
	}
	if opt.Username != "" {
		hash, err := bcrypt.GenerateFromPassword([]byte(opt.Password), bcrypt.MinCost)
		if err != nil {
			return "", nil, err
		}
		htpasswd := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(htpasswd, []byte(opt.Username+":"+string(hash)+"\n"), 0o600); err != nil {
			return "", nil, fmt.Errorf("write htpasswd: %w", err)
		}
		cfg.Auth = configuration.Auth{"htpasswd": configuration.Parameters{"realm": "kiln-test", "path": htpasswd}}
	}

	ctx, cancel := context.WithCancel(context.Background())
	app := handlers.NewApp(ctx, cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		return "", nil, fmt.Errorf("listen for test registry: %w", err)
	}
	srv := &http.Server{Handler: app, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintf(os.Stderr, "test registry stopped: %v\n", err)
		}
	}()
	stop = func() {
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		_ = srv.Shutdown(sctx)
		_ = app.Shutdown()
		cancel()
	}
	return ln.Addr().String(), stop, nil
}

// MainWithRegistry is the TestMain of packages whose tests run as root
// against one shared scratch registry: it refuses to run without root
// (needsRoot says why root is needed), starts the registry, sets *addr to
// its host:port, runs the tests and exits with their status.
func MainWithRegistry(m *testing.M, needsRoot string, addr *string) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, needsRoot)
		os.Exit(1)
	}
	tmp, err := os.MkdirTemp("", "kiln-test-registry-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	reg, stop, err := StartRegistry(tmp, RegistryOptions{})
	if err != nil {
		os.RemoveAll(tmp)
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	*addr = reg
	code := m.Run()
	stop()
	os.RemoveAll(tmp)
	os.Exit(code)
}
