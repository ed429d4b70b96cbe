package registry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"regexp"
	"strings"
	"time"

	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	"github.com/distribution/distribution/v3/registry/storage"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"

	"github.com/kiln-build/kiln/internal/auth"
)

// Config configures the embedded registry.
type Config struct {
	// RootDir holds all registry content (blobs, manifests, tags) when
	// Storage is the filesystem; unused otherwise.
	RootDir string
	// Storage selects the storage driver; the zero value is the
	// filesystem under RootDir.
	Storage StorageConfig
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
	// Gate keeps GC apart from writes; nil: a LocalGate, for a registry
	// only this process writes to.
	Gate Gate
}

// foreignURLs are the URLs a layer descriptor may name (OCI
// non-distributable layers): any http(s) URL.
const foreignURLs = "^https?://"

// Registry is an OCI distribution registry with kiln token auth. It is an
// http.Handler for /v2/... and Config.TokenPath.
type Registry struct {
	app *handlers.App
	// direct is nil, or when app redirects blob downloads to the store,
	// an app over the same driver that never does: builds get their
	// blobs through kiln (see servesDirect).
	direct *handlers.App
	// access checks the tokens of the requests kiln answers itself, as
	// distribution's handlers do with the same controller.
	access    *accessController
	tokens    http.Handler
	tokenPath string
	// ns is a second view of the same storage for the helpers; it shares
	// no cache with app, so both always see what is stored.
	ns distribution.Namespace
	// driver is the one storage driver app, direct and ns all use.
	driver storagedriver.StorageDriver
	// started is when New made this Registry; GC purges uploads begun
	// before it, which no client can resume (see the upload secret).
	started time.Time
	// writes is held shared by every mutating API request and exclusively
	// by GC.
	writes Gate
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

// New creates the registry over cfg.Storage (by default the filesystem
// under cfg.RootDir). ctx bounds background work (the upload purger);
// Close stops it too. An S3 bucket is checked here: New fails, saying what
// to check, unless kiln can write, read and delete an object in it.
//
// The distribution library logs through the process-wide logrus standard
// logger; New routes that logger into cfg.Logger (its Info chatter at Debug)
// and silences logrus's own output. The last New wins.
func New(ctx context.Context, cfg Config) (*Registry, error) {
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
	if cfg.Gate == nil {
		cfg.Gate = &LocalGate{}
	}
	if cfg.Storage.Driver == "" {
		cfg.Storage.Driver = DriverFilesystem
	}
	driver, err := newDriver(ctx, cfg.RootDir, cfg.Storage)
	if err != nil {
		return nil, err
	}
	where := cfg.RootDir
	if cfg.Storage.Driver != DriverFilesystem {
		where = cfg.Storage.String()
		cfg.Logger.Info("registry storage", "driver", cfg.Storage.Driver, "location", where,
			"redirect", cfg.Storage.redirects())
	}
	routeLogrus(cfg.Logger.With("component", "registry"))

	// Upload state is HMAC-protected with this secret; a fresh one per
	// process only means uploads cannot resume across a kiln restart.
	var secret [32]byte
	if _, err := rand.Read(secret[:]); err != nil {
		return nil, fmt.Errorf("create registry: generate upload secret: %w", err)
	}
	appConfig := func(redirect, purge bool) *configuration.Configuration {
		maintenance := configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}}
		if purge {
			maintenance = configuration.Parameters{"uploadpurging": uploadPurging}
		}
		dc := &configuration.Configuration{
			Storage: configuration.Storage{
				prebuiltDriver: configuration.Parameters{optDriver: driver},
				"delete":       configuration.Parameters{"enabled": true},
				"redirect":     configuration.Parameters{"disable": !redirect},
				"maintenance":  maintenance,
			},
			Auth: configuration.Auth{
				accessControllerName: configuration.Parameters{
					optAuthority: cfg.Authority,
					optService:   cfg.Service,
					optTokenPath: cfg.TokenPath,
				},
			},
		}
		// Non-distributable (foreign) layers name where they are fetched
		// from; such layers are not pushed, and their URLs must be http(s).
		dc.Validation.Manifests.URLs.Allow = []string{foreignURLs}
		dc.HTTP.Secret = hex.EncodeToString(secret[:])
		dc.Log.AccessLog.Disabled = true
		return dc
	}

	app, err := newApp(ctx, appConfig(cfg.Storage.redirects(), true))
	if err != nil {
		return nil, fmt.Errorf("create registry over %s: %w", where, err)
	}
	var direct *handlers.App
	if cfg.Storage.redirects() {
		if direct, err = newApp(ctx, appConfig(false, false)); err != nil {
			_ = app.Shutdown()
			return nil, fmt.Errorf("create registry over %s: %w", where, err)
		}
	}

	// Same rules as the app applies to pushes (handlers.NewApp defaults),
	// so a manifest Tag copies is held to what a client push would be.
	ns, err := storage.NewRegistry(ctx, driver,
		storage.EnableDelete,
		storage.EnableValidateImageIndexImagesExist,
		storage.ManifestURLsAllowRegexp(regexp.MustCompile(foreignURLs)),
	)
	if err != nil {
		_ = app.Shutdown()
		if direct != nil {
			_ = direct.Shutdown()
		}
		return nil, fmt.Errorf("open registry storage %s: %w", where, err)
	}

	return &Registry{
		app:       app,
		direct:    direct,
		access:    &accessController{authority: cfg.Authority, service: cfg.Service, tokenPath: cfg.TokenPath},
		tokens:    cfg.Authority.TokenHandler(cfg.Service, cfg.Grant),
		tokenPath: cfg.TokenPath,
		ns:        ns,
		driver:    driver,
		started:   time.Now(),
		writes:    cfg.Gate,
	}, nil
}

// Driver is the storage driver the registry keeps its content through,
// shared by the HTTP API and the helpers. It is for tests and tools that
// inspect storage; write content only through the registry.
func (r *Registry) Driver() storagedriver.StorageDriver { return r.driver }

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
		release, ok, err := r.writes.TryShared(req.Context())
		if err != nil || !ok {
			msg := "kiln's registry is collecting garbage; retry the push in a few seconds"
			if err != nil {
				msg = "kiln's registry cannot reach its database to admit the write; retry in a few seconds"
			}
			w.Header().Set("Retry-After", "5")
			http.Error(w, msg, http.StatusServiceUnavailable)
			return
		}
		defer release()
	}
	w, req, answered := r.oci11(w, req)
	if answered {
		return
	}
	app := r.app
	if r.direct != nil && r.servesDirect(req) {
		app = r.direct
	}
	repo, tag, ok := manifestWrite(req)
	if !ok || r.onChange == nil {
		app.ServeHTTP(w, req)
		return
	}
	rec := &statusRecorder{ResponseWriter: w}
	app.ServeHTTP(rec, req)
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

// servesDirect reports whether req, a request to a registry that
// redirects blob downloads to the store, must be answered by kiln instead:
// blob reads by a build. Builders reach kiln's registry through their
// tunnel or allow-listed network only, never the store.
func (r *Registry) servesDirect(req *http.Request) bool {
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		return false
	}
	if !strings.Contains(req.URL.Path, "/blobs/") {
		return false
	}
	g, err := r.access.verify(req)
	// Build tokens are issued to subject build:<id> (internal/builds).
	return err == nil && strings.HasPrefix(g.Subject, "build:")
}

// Close stops the registry's background work. In-flight requests are the
// HTTP server's to drain.
func (r *Registry) Close() error {
	err := r.app.Shutdown()
	if r.direct != nil {
		err = errors.Join(err, r.direct.Shutdown())
	}
	return err
}
