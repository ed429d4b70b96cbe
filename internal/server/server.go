// Package server is kiln's HTTP wiring: routes, authentication, JSON and
// Server-Sent Events. Business rules live in builds, images and cachevol.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/builds"
	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/images"
	"github.com/kiln-build/kiln/internal/registry"
)

// Server routes HTTP to kiln's parts.
type Server struct {
	auth     *auth.Authority
	builds   *builds.Service
	images   *images.Service
	volumes  *cachevol.Manager
	registry *registry.Registry
	log      *slog.Logger
	// RegistryHost is shown in pullable references.
	registryHost string
	heartbeat    time.Duration
	mux          *http.ServeMux
	// gc serializes registry collections: two would each hold part of
	// the build slots and wait for the rest forever.
	gc sync.Mutex
}

// Deps are what the server exposes.
type Deps struct {
	Auth         *auth.Authority
	Builds       *builds.Service
	Images       *images.Service
	Volumes      *cachevol.Manager
	Registry     *registry.Registry
	RegistryHost string
	// Heartbeat is how often an idle event stream sends a comment, so
	// proxies keep it open and clients notice a dead connection.
	Heartbeat time.Duration
	Logger    *slog.Logger
}

// New builds the router.
func New(d Deps) *Server {
	s := &Server{auth: d.Auth, builds: d.Builds, images: d.Images, volumes: d.Volumes,
		registry: d.Registry, log: d.Logger, registryHost: d.RegistryHost, heartbeat: d.Heartbeat, mux: http.NewServeMux()}
	if s.heartbeat <= 0 {
		s.heartbeat = 15 * time.Second
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), d.Builds.Collector(),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "kiln_rootfs_conversions_total", Help: "Image digests converted to a bootable root filesystem since the server started.",
		}, func() float64 { return float64(d.Images.Conversions()) }))

	m := s.mux
	m.Handle("/v2/", d.Registry)
	m.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	m.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))

	m.Handle("POST /v1/builds", s.authed(s.createBuild, auth.ScopeBuildWrite))
	m.Handle("GET /v1/builds", s.authed(s.listBuilds, auth.ScopeBuildRead))
	m.Handle("GET /v1/builds/{id}", s.authed(s.getBuild, auth.ScopeBuildRead))
	m.Handle("DELETE /v1/builds/{id}", s.authed(s.cancelBuild, auth.ScopeBuildWrite))
	m.Handle("POST /v1/builds/{id}/cancel", s.authed(s.cancelBuild, auth.ScopeBuildWrite))
	m.Handle("GET /v1/builds/{id}/events", s.authed(s.buildEvents, auth.ScopeBuildRead))
	m.Handle("GET /v1/builds/{id}/logs", s.authed(s.buildLogs, auth.ScopeBuildRead))
	m.Handle("GET /v1/builds/{id}/output", s.authed(s.buildOutput, auth.ScopeImageRead))

	m.Handle("GET /v1/images", s.authed(s.listImages, auth.ScopeImageRead))
	m.Handle("GET /v1/images/{name...}", s.authed(s.getImage, auth.ScopeImageRead))
	m.Handle("DELETE /v1/images/{name...}", s.authed(s.deleteImage, auth.ScopeImageWrite))
	m.Handle("POST /v1/images/{name...}", s.authed(s.imageAction, auth.ScopeImageRead))

	m.Handle("GET /v1/cache", s.authed(s.listCache, auth.ScopeBuildRead))
	m.Handle("DELETE /v1/cache/{scope}", s.authed(s.deleteCache, auth.ScopeCacheAdmin))

	m.Handle("POST /v1/tokens", s.authed(s.createToken, auth.ScopeBuildAdmin))
	m.Handle("POST /v1/registry/gc", s.authed(s.collectRegistryGarbage, auth.ScopeBuildAdmin))
	m.HandleFunc("/v1/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", "no such endpoint "+r.Method+" "+r.URL.Path+"; see api/openapi.yaml")
	})
	return s
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

type principalKey struct{}

func principal(r *http.Request) auth.Principal {
	p, _ := r.Context().Value(principalKey{}).(auth.Principal)
	return p
}

// authed checks the bearer token and the scope the route needs.
func (s *Server) authed(h http.HandlerFunc, need auth.Scope) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || strings.TrimSpace(raw) == "" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="kiln"`)
			writeError(w, http.StatusUnauthorized, "unauthenticated", "missing bearer token: send Authorization: Bearer <kiln token> (create one with kiln token create)")
			return
		}
		p, err := s.auth.Verify(strings.TrimSpace(raw))
		if err != nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="kiln", error="invalid_token"`)
			writeError(w, http.StatusUnauthorized, "invalid_token", err.Error())
			return
		}
		if !p.Has(need) {
			writeError(w, http.StatusForbidden, "forbidden", "this needs the "+string(need)+" scope, which your token does not have; ask for a token that has it")
			return
		}
		h(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, p)))
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

// fail maps a part's error to an HTTP answer.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	var in *builds.InputError
	var name *images.NameError
	var ce *buildcontext.Error
	switch {
	case errors.As(err, &ce):
		writeError(w, ce.Status, "bad_context", ce.Msg)
	case errors.As(err, &in):
		code := "bad_request"
		if in.Status == http.StatusForbidden {
			code = "forbidden"
		}
		writeError(w, in.Status, code, in.Msg)
	case errors.As(err, &name):
		writeError(w, http.StatusBadRequest, "bad_request", name.Msg)
	case errors.Is(err, builds.ErrNotFound), errors.Is(err, images.ErrNotFound), errors.Is(err, cachevol.ErrNotFound):
		writeError(w, http.StatusNotFound, "not_found", err.Error())
	case errors.Is(err, cachevol.ErrInUse):
		writeError(w, http.StatusConflict, "in_use", err.Error())
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		// The client went away; nobody reads the answer.
	default:
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInternalServerError, "internal", "kiln failed to handle this request: "+err.Error())
	}
}
