// Package server is kiln's HTTP wiring: routes, authentication, JSON and
// Server-Sent Events. Business rules live in builds, images and cachevol.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/builders"
	"github.com/kiln-build/kiln/internal/builds"
	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/images"
	"github.com/kiln-build/kiln/internal/registry"
	"github.com/kiln-build/kiln/internal/tokens"
)

// Server routes HTTP to kiln's parts.
type Server struct {
	auth     *auth.Authority
	policy   *access.Policy
	tokens   *tokens.Service
	builds   *builds.Service
	images   *images.Service
	volumes  *cachevol.Manager
	builders *builders.Pool
	registry *registry.Registry
	log      *slog.Logger
	// RegistryHost is shown in pullable references.
	registryHost string
	heartbeat    time.Duration
	uploads      *uploadSlots
	mux          *http.ServeMux
	handler      http.Handler
	// gc serializes registry collections: two would each hold part of
	// the build slots and wait for the rest forever.
	gc sync.Mutex
	// builderImage is the digest of the builder VM image builds boot, for
	// GET /v1/version ("" for runtimes without one).
	builderImage string
}

// Deps are what the server exposes.
type Deps struct {
	Auth    *auth.Authority
	Policy  *access.Policy
	Tokens  *tokens.Service
	Builds  *builds.Service
	Images  *images.Service
	Volumes *cachevol.Manager
	// Builders are the builders kept up between builds.
	Builders     *builders.Pool
	Registry     *registry.Registry
	RegistryHost string
	// Heartbeat is how often an idle event stream sends a comment, so
	// proxies keep it open and clients notice a dead connection.
	Heartbeat time.Duration
	// Uploads bounds concurrent build submissions, globally and per
	// tenant (0: unbounded).
	UploadsGlobal, UploadsPerTenant int
	// MinUploadRate is the slowest a request body may arrive, in bytes
	// per second over each UploadWindow (0: any speed).
	MinUploadRate int64
	UploadWindow  time.Duration
	Logger        *slog.Logger
	// BuilderImage is the digest of the builder VM image the vm runtime
	// boots ("" for other runtimes), reported by GET /v1/version.
	BuilderImage string
}

// New builds the router.
func New(d Deps) *Server {
	s := &Server{auth: d.Auth, policy: d.Policy, tokens: d.Tokens, builds: d.Builds, images: d.Images, volumes: d.Volumes, builders: d.Builders,
		registry: d.Registry, log: d.Logger, registryHost: d.RegistryHost, heartbeat: d.Heartbeat, mux: http.NewServeMux(),
		uploads: newUploadSlots(d.UploadsGlobal, d.UploadsPerTenant), builderImage: d.BuilderImage}
	if s.heartbeat <= 0 {
		s.heartbeat = 15 * time.Second
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), d.Builds.Collector(),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "kiln_rootfs_conversions_total", Help: "Image digests converted to a bootable root filesystem since the server started.",
		}, func() float64 { return float64(d.Images.Conversions()) }))

	for _, r := range s.table(promhttp.HandlerFor(reg, promhttp.HandlerOpts{})) {
		h := r.h
		if r.need != "" {
			h = s.authed(h, r.need)
		}
		s.mux.Handle(r.pattern, h)
	}
	s.mux.HandleFunc("/v1/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", "no such endpoint "+r.Method+" "+r.URL.Path+"; see api/openapi.yaml")
	})
	s.handler = minUploadRate(s.mux, d.MinUploadRate, d.UploadWindow)
	return s
}

// route is one endpoint and the scope it needs.
type route struct {
	pattern string
	need    auth.Scope // "" answers without a token
	h       http.Handler
}

// anyScope: any valid token will do.
const anyScope auth.Scope = "*"

// table lists every endpoint. Every route says the scope it needs here,
// once; the handlers then ask access.Policy about the resources they
// touch. The authorization matrix test walks Routes, so a route without a
// rule cannot ship.
func (s *Server) table(metrics http.Handler) []route {
	return []route{
		{"/v2/", "", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.registry.ServeHTTP(w, r) })},
		{"GET /healthz", "", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })},
		{"GET /metrics", "", metrics},

		{"POST /v1/builds", auth.ScopeBuildWrite, http.HandlerFunc(s.createBuild)},
		{"GET /v1/builds", auth.ScopeBuildRead, http.HandlerFunc(s.listBuilds)},
		{"GET /v1/builds/{id}", auth.ScopeBuildRead, http.HandlerFunc(s.getBuild)},
		{"DELETE /v1/builds/{id}", auth.ScopeBuildWrite, http.HandlerFunc(s.cancelBuild)},
		{"POST /v1/builds/{id}/cancel", auth.ScopeBuildWrite, http.HandlerFunc(s.cancelBuild)},
		{"GET /v1/builds/{id}/events", auth.ScopeBuildRead, http.HandlerFunc(s.buildEvents)},
		{"GET /v1/builds/{id}/logs", auth.ScopeBuildRead, http.HandlerFunc(s.buildLogs)},
		{"GET /v1/builds/{id}/output", auth.ScopeImageRead, http.HandlerFunc(s.buildOutput)},
		{"GET /v1/builds/{id}/ssh", auth.ScopeBuildWrite, http.HandlerFunc(s.buildSSH)},

		{"GET /v1/images", auth.ScopeImageRead, http.HandlerFunc(s.listImages)},
		{"GET /v1/images/{name...}", auth.ScopeImageRead, http.HandlerFunc(s.getImage)},
		{"DELETE /v1/images/{name...}", auth.ScopeImageWrite, http.HandlerFunc(s.deleteImage)},
		{"POST /v1/images/{name...}", auth.ScopeImageRead, http.HandlerFunc(s.imageAction)},

		{"GET /v1/cache", auth.ScopeBuildRead, http.HandlerFunc(s.listCache)},
		{"DELETE /v1/cache/{scope}", auth.ScopeCacheAdmin, http.HandlerFunc(s.deleteCache)},

		{"POST /v1/contexts/blobs/query", auth.ScopeBuildWrite, http.HandlerFunc(s.queryBlobs)},
		{"POST /v1/contexts/blobs", auth.ScopeBuildWrite, http.HandlerFunc(s.putBlobs)},

		{"GET /v1/builders", auth.ScopeBuildAdmin, http.HandlerFunc(s.listBuilders)},
		{"POST /v1/builders/stop", auth.ScopeBuildAdmin, http.HandlerFunc(s.stopBuilder)},

		{"GET /v1/whoami", anyScope, http.HandlerFunc(s.whoami)},
		{"GET /v1/version", anyScope, http.HandlerFunc(s.version)},
		{"POST /v1/tokens", auth.ScopeBuildAdmin, http.HandlerFunc(s.createToken)},
		{"GET /v1/tokens", auth.ScopeBuildAdmin, http.HandlerFunc(s.listTokens)},
		{"POST /v1/tokens/{id}/revoke", auth.ScopeBuildAdmin, http.HandlerFunc(s.revokeToken)},
		{"POST /v1/registry/gc", auth.ScopeBuildAdmin, http.HandlerFunc(s.collectRegistryGarbage)},
	}
}

// Routes lists every route pattern a server answers, for the tests that
// must cover each.
func Routes() []string {
	var out []string
	for _, r := range (&Server{}).table(nil) {
		out = append(out, r.pattern)
	}
	return out
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

// RegistryOnly serves the registry API and its token endpoint and
// nothing else: what a builder VM's registry tunnel reaches, so a build
// step cannot talk to kiln's API, metrics or health endpoints.
func (s *Server) RegistryOnly() http.Handler {
	return minUploadRate(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p := path.Clean(r.URL.Path); p != "/v2" && !strings.HasPrefix(p, "/v2/") {
			http.Error(w, "only kiln's registry (/v2/) is reachable from a build", http.StatusNotFound)
			return
		}
		s.registry.ServeHTTP(w, r)
	}), 0, 0)
}

type principalKey struct{}

func principal(r *http.Request) auth.Principal {
	p, _ := r.Context().Value(principalKey{}).(auth.Principal)
	return p
}

// bearer returns the token of an Authorization header; the scheme is
// case-insensitive (RFC 6750 section 2.1 and RFC 9110 section 11.1).
func bearer(r *http.Request) (string, bool) {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	tok = strings.TrimSpace(tok)
	return tok, ok && strings.EqualFold(scheme, "bearer") && tok != ""
}

// authed checks the bearer token and the scope the route needs.
func (s *Server) authed(h http.Handler, need auth.Scope) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, ok := bearer(r)
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="kiln"`)
			writeError(w, http.StatusUnauthorized, "unauthenticated", "missing bearer token: send Authorization: Bearer <kiln token> (create one with kiln token create)")
			return
		}
		p, err := s.auth.Verify(raw)
		if err != nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="kiln", error="invalid_token"`)
			writeError(w, http.StatusUnauthorized, "invalid_token", err.Error())
			return
		}
		if p.Build != "" {
			writeError(w, http.StatusForbidden, "forbidden", "a build's own registry token cannot use the API")
			return
		}
		if need != anyScope && !p.Has(need) {
			writeError(w, http.StatusForbidden, "forbidden", "this needs the "+string(need)+" scope, which your token does not have; ask for a token that has it")
			return
		}
		h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, p)))
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, api.Error{Error: msg, Code: &code})
}

// answer is the HTTP status and error code of one errdefs class.
type answer struct {
	class  error
	status int
	code   string
}

// answers maps every errdefs class to its status and code: the one place
// kiln's error vocabulary meets HTTP. Narrower classes come before the
// ones they wrap (errdefs.Classes' order), so the first match is the most
// precise. Clients branch on the codes; keep them stable.
var answers = []answer{
	{errdefs.ErrTooLarge, http.StatusRequestEntityTooLarge, "too_large"},
	{errdefs.ErrInvalid, http.StatusBadRequest, "bad_request"},
	{errdefs.ErrUnauthenticated, http.StatusUnauthorized, "invalid_token"},
	{errdefs.ErrForbidden, http.StatusForbidden, "forbidden"},
	{errdefs.ErrNotFound, http.StatusNotFound, "not_found"},
	{errdefs.ErrInUse, http.StatusConflict, "in_use"},
	// kiln build uploads what is missing and submits again.
	{errdefs.ErrMissingContent, http.StatusConflict, "missing_blobs"},
	{errdefs.ErrConflict, http.StatusConflict, "conflict"},
	{errdefs.ErrLimit, http.StatusTooManyRequests, "too_many"},
	{errdefs.ErrTimeout, http.StatusRequestTimeout, "too_slow"},
	{errdefs.ErrCanceled, statusClientClosedRequest, "canceled"},
	{errdefs.ErrUnavailable, http.StatusServiceUnavailable, "unavailable"},
	{errdefs.ErrUpstreamTimeout, http.StatusGatewayTimeout, "upstream_timeout"},
	{errdefs.ErrUpstream, http.StatusBadGateway, "upstream"},
}

// statusClientClosedRequest is nginx's convention for "the client went
// away"; net/http accepts any three-digit code.
const statusClientClosedRequest = 499

// answerFor returns the answer of err's class; ok is false for an
// unclassified error, kiln's own failure.
func answerFor(err error) (a answer, ok bool) {
	var slow *slowUploadError
	if errors.As(err, &slow) && !classified(err) {
		// The body-rate guard's own error: the client was too slow.
		err = &errdefs.Error{Class: errdefs.ErrTimeout, Msg: slow.Error()}
	}
	for _, a := range answers {
		if errors.Is(err, a.class) {
			return a, true
		}
	}
	return answer{}, false
}

func classified(err error) bool {
	for _, c := range errdefs.Classes() {
		if errors.Is(err, c) {
			return true
		}
	}
	return false
}

// fail answers a part's error: its errdefs class picks the status and
// code (answers), its message is the user's. An unclassified error is
// kiln's own failure: 500 "internal", and logged.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		return // the client went away; nobody reads the answer
	}
	a, ok := answerFor(err)
	if !ok {
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInternalServerError, "internal", "kiln failed to handle this request: "+err.Error())
		return
	}
	msg := err.Error()
	var de *errdefs.Error
	if errors.As(err, &de) && de.Class != nil && errors.Is(err, de.Class) {
		msg = de.Msg
		if de.RetryAfter > 0 && a.class == errdefs.ErrLimit {
			w.Header().Set("Retry-After", strconv.Itoa(retryAfterSeconds(de.RetryAfter)))
		}
	}
	writeError(w, a.status, a.code, msg)
}
