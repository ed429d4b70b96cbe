package registry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	"github.com/distribution/distribution/v3/registry/storage"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/distribution/distribution/v3/registry/storage/driver/filesystem"

	"github.com/kiln-build/kiln/internal/auth"
)

// Config configures the embedded registry.
type Config struct {
	// RootDir holds all registry content (blobs, manifests, tags).
	RootDir string
	// Authority verifies registry tokens and backs the token endpoint.
	Authority *auth.Authority
	// Grant decides what a token may have of the access it asks for
	// (internal/access holds kiln's rules).
	Grant auth.GrantFunc
	// Service is the token audience and the challenge's service; default "kiln".
	Service string
	// TokenPath is where the token endpoint is served; default "/v2/token".
	TokenPath string
	// Logger receives the registry's own logs; default slog.Default().
	Logger *slog.Logger
}

// Registry is an OCI distribution registry with kiln token auth. It is an
// http.Handler for /v2/... and Config.TokenPath.
type Registry struct {
	app       *handlers.App
	tokens    http.Handler
	tokenPath string
	// ns is a second view of the same storage for the helpers; it shares
	// no cache with app, so both always see what is on disk.
	ns     distribution.Namespace
	driver storagedriver.StorageDriver
	root   string
	// started is when New made this Registry; GC purges uploads begun
	// before it, which no client can resume (see the upload secret).
	started time.Time
	// writes is held shared by every mutating API request and exclusively
	// by GC.
	writes sync.RWMutex
	// onChange hears of every manifest pushed or deleted over HTTP.
	onChange func(ctx context.Context, repo, tag string)
}

// OnManifestChange makes fn hear, after the fact and before the client's
// request is answered, of every manifest a client pushed or deleted over
// the HTTP API, so kiln's image records follow direct pushes. tag names
// the one tag a push set; it is empty when any of repo's tags may have
// changed (a delete, a push by digest). Set it before serving.
func (r *Registry) OnManifestChange(fn func(ctx context.Context, repo, tag string)) { r.onChange = fn }

// uploadPurging removes upload sessions abandoned for a day; builds never
// resume an upload that old.
var uploadPurging = map[any]any{"enabled": true, "age": "24h", "interval": "6h", "dryrun": false}

// New creates the registry over cfg.RootDir. ctx bounds background work
// (the upload purger); Close stops it too.
//
// The distribution library logs through the process-wide logrus standard
// logger; New routes that logger into cfg.Logger (its Info chatter at Debug)
// and silences logrus's own output. The last New wins.
func New(ctx context.Context, cfg Config) (*Registry, error) {
	if cfg.RootDir == "" {
		return nil, errors.New("create registry: no root directory configured")
	}
	if cfg.Authority == nil || cfg.Grant == nil {
		return nil, errors.New("create registry: no token authority or access rules configured")
	}
	if cfg.Service == "" {
		cfg.Service = "kiln"
	}
	if cfg.TokenPath == "" {
		cfg.TokenPath = "/v2/token"
	}
	if cfg.TokenPath != path.Clean(cfg.TokenPath) || !path.IsAbs(cfg.TokenPath) {
		return nil, fmt.Errorf("create registry: token path %q must be a clean absolute path like /v2/token", cfg.TokenPath)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := os.MkdirAll(cfg.RootDir, 0o700); err != nil {
		return nil, fmt.Errorf("create registry root %s: %w", cfg.RootDir, err)
	}
	routeLogrus(cfg.Logger.With("component", "registry"))

	// Upload state is HMAC-protected with this secret; a fresh one per
	// process only means uploads cannot resume across a kiln restart.
	var secret [32]byte
	if _, err := rand.Read(secret[:]); err != nil {
		return nil, fmt.Errorf("create registry: generate upload secret: %w", err)
	}

	dc := &configuration.Configuration{
		Storage: configuration.Storage{
			"filesystem":  configuration.Parameters{"rootdirectory": cfg.RootDir},
			"delete":      configuration.Parameters{"enabled": true},
			"redirect":    configuration.Parameters{"disable": true},
			"maintenance": configuration.Parameters{"uploadpurging": uploadPurging},
		},
		Auth: configuration.Auth{
			accessControllerName: configuration.Parameters{
				optAuthority: cfg.Authority,
				optService:   cfg.Service,
				optTokenPath: cfg.TokenPath,
			},
		},
	}
	dc.HTTP.Secret = hex.EncodeToString(secret[:])
	dc.Log.AccessLog.Disabled = true

	app, err := newApp(ctx, dc)
	if err != nil {
		return nil, fmt.Errorf("create registry over %s: %w", cfg.RootDir, err)
	}

	driver := filesystem.New(filesystem.DriverParameters{RootDirectory: cfg.RootDir, MaxThreads: 100})
	// Same rules as the app applies to pushes (handlers.NewApp defaults),
	// so a manifest Tag copies is held to what a client push would be.
	ns, err := storage.NewRegistry(ctx, driver,
		storage.EnableDelete,
		storage.EnableValidateImageIndexImagesExist,
		storage.ManifestURLsAllowRegexp(regexp.MustCompile("^$")),
	)
	if err != nil {
		_ = app.Shutdown()
		return nil, fmt.Errorf("open registry storage %s: %w", cfg.RootDir, err)
	}

	return &Registry{
		app:       app,
		tokens:    cfg.Authority.TokenHandler(cfg.Service, cfg.Grant),
		tokenPath: cfg.TokenPath,
		ns:        ns,
		driver:    driver,
		root:      cfg.RootDir,
		started:   time.Now(),
	}, nil
}

// newApp turns handlers.NewApp's panics on bad configuration into errors.
func newApp(ctx context.Context, dc *configuration.Configuration) (app *handlers.App, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("distribution: %v", r)
		}
	}()
	return handlers.NewApp(ctx, dc), nil
}

// ServeHTTP serves the token endpoint at its path and the distribution API
// everywhere else.
func (r *Registry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path == r.tokenPath {
		r.tokens.ServeHTTP(w, req)
		return
	}
	if mutating(req) {
		if !r.writes.TryRLock() {
			w.Header().Set("Retry-After", "5")
			http.Error(w, "kiln's registry is collecting garbage; retry the push in a few seconds", http.StatusServiceUnavailable)
			return
		}
		defer r.writes.RUnlock()
	}
	repo, tag, ok := manifestWrite(req)
	if !ok || r.onChange == nil {
		r.app.ServeHTTP(w, req)
		return
	}
	rec := &statusRecorder{ResponseWriter: w}
	r.app.ServeHTTP(rec, req)
	if rec.status >= 200 && rec.status < 300 {
		r.onChange(req.Context(), repo, tag)
	}
}

var manifestPath = regexp.MustCompile(`^/v2/(.+)/manifests/([^/]+)$`)

// manifestWrite reports whether req pushes or deletes a manifest, in
// which repository, and the tag a push sets ("" when unknown).
func manifestWrite(req *http.Request) (repo, tag string, ok bool) {
	if req.Method != http.MethodPut && req.Method != http.MethodDelete {
		return "", "", false
	}
	m := manifestPath.FindStringSubmatch(req.URL.Path)
	if m == nil {
		return "", "", false
	}
	if req.Method == http.MethodPut && !strings.Contains(m[2], ":") {
		tag = m[2]
	}
	return m[1], tag, true
}

// statusRecorder remembers the status an answer carried. Manifest
// answers are small and never streamed.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// Close stops the registry's background work. In-flight requests are the
// HTTP server's to drain.
func (r *Registry) Close() error {
	return r.app.Shutdown()
}
