package server

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/images"
	"github.com/kiln-build/kiln/internal/store"
)

func (s *Server) apiFullImage(im images.Image) api.Image {
	out := s.apiImage(im.Image, im.Names)
	out.Size = &im.Size
	rs := api.RootFS{Status: api.RootFSStatus(im.RootFS.Status)}
	if im.RootFS.Error != "" {
		rs.Error = &im.RootFS.Error
	}
	if im.RootFS.Size > 0 {
		rs.Size = &im.RootFS.Size
		rs.Format = &im.RootFS.Format
	}
	out.Rootfs = &rs
	return out
}

func (s *Server) apiImage(im store.Image, names []string) api.Image {
	ref := s.registryHost + "/" + im.Name
	out := api.Image{Name: im.Name, Repository: im.Repository, Tag: im.Tag, Digest: im.Digest, Reference: &ref,
		CreatedAt: &im.CreatedAt}
	if im.BuildID != "" {
		out.BuildId = &im.BuildID
	}
	if names != nil {
		out.Names = &names
	}
	return out
}

func (s *Server) listImages(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	opts := images.ListOptions{Filter: q.Get("filter")}
	if v := q.Get("include_builds"); v != "" {
		include, err := strconv.ParseBool(v)
		if err != nil {
			writeError(w, http.StatusBadRequest, "bad_request", "include_builds must be true or false")
			return
		}
		opts.NoBuilds = !include
	}
	list, err := s.images.List(r.Context(), principal(r), opts)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := api.ImageList{Images: []api.Image{}}
	for _, im := range list {
		a := s.apiImage(im.Image, nil)
		a.Size = &im.Size
		out.Images = append(out.Images, a)
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) getImage(w http.ResponseWriter, r *http.Request) {
	im, err := s.images.Get(r.Context(), principal(r), r.PathValue("name"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.apiFullImage(im))
}

func (s *Server) deleteImage(w http.ResponseWriter, r *http.Request) {
	if err := s.images.Delete(r.Context(), principal(r), r.PathValue("name")); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// imageAction serves POST /v1/images/{name}/tags and /run; {name} may
// itself hold slashes (team/app:1), so the route is a catch-all and the
// action is cut off here, each checking the scope it needs.
func (s *Server) imageAction(w http.ResponseWriter, r *http.Request) {
	p := principal(r)
	if name, ok := strings.CutSuffix(r.PathValue("name"), "/tags"); ok {
		if !p.Has(auth.ScopeImageWrite) {
			writeError(w, http.StatusForbidden, "forbidden", "adding a name needs the image:write scope, which your token does not have")
			return
		}
		s.tagImage(w, r, name)
		return
	}
	if name, ok := strings.CutSuffix(r.PathValue("name"), "/run"); ok {
		if !p.Has(auth.ScopeBuildWrite) {
			writeError(w, http.StatusForbidden, "forbidden", "running an image executes it on kiln's machines and needs the build:write scope, which your token does not have")
			return
		}
		s.runImage(w, r, name)
		return
	}
	writeError(w, http.StatusNotFound, "not_found", "no such endpoint; use POST /v1/images/{name}/tags or /v1/images/{name}/run")
}

func (s *Server) tagImage(w http.ResponseWriter, r *http.Request, name string) {
	var req api.TagRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&req); err != nil || req.Name == "" {
		writeError(w, http.StatusBadRequest, "bad_request", `body must be JSON {"name": "repository:tag"}`)
		return
	}
	im, err := s.images.Tag(r.Context(), principal(r), name, req.Name)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, s.apiFullImage(im))
}

func (s *Server) listCache(w http.ResponseWriter, r *http.Request) {
	p := principal(r)
	vols, err := s.volumes.List()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := api.CacheVolumeList{Volumes: []api.CacheVolume{}}
	for _, v := range vols {
		// A tenant sees its own scopes; an admin every tenant's.
		if !s.policy.SeeCacheScope(p, v.Scope) {
			continue
		}
		cv := api.CacheVolume{Scope: v.Scope, SizeBytes: v.SizeBytes, UsedBytes: v.UsedBytes,
			AllocatedBytes: v.AllocatedBytes, InUse: v.InUse}
		if !v.LastUsed.IsZero() {
			t := v.LastUsed
			cv.LastUsed = &t
		}
		out.Volumes = append(out.Volumes, cv)
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) deleteCache(w http.ResponseWriter, r *http.Request) {
	scope := r.PathValue("scope")
	if !s.policy.SeeCacheScope(principal(r), scope) {
		s.fail(w, r, errdefs.NotFound("no cache volume for scope %s (kiln cache ls lists yours)", errdefs.Quote(scope)))
		return
	}
	if err := s.volumes.Delete(r.Context(), scope); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// collectRegistryGarbage pauses builds (waiting for running ones) and
// sweeps the registry's unreferenced blobs.
func (s *Server) collectRegistryGarbage(w http.ResponseWriter, r *http.Request) {
	if !s.gc.TryLock() {
		writeError(w, http.StatusConflict, "conflict", "a registry garbage collection is already running; wait for it to finish")
		return
	}
	defer s.gc.Unlock()
	resume, err := s.builds.Pause(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer resume()
	st, err := s.registry.GC(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.log.Info("registry garbage collected", "blobs_deleted", st.BlobsBefore-st.BlobsAfter, "bytes_freed", st.BytesBefore-st.BytesAfter, "took", st.Took.Round(time.Millisecond))
	writeJSON(w, http.StatusOK, api.RegistryGC{
		BlobsBefore: st.BlobsBefore, BlobsAfter: st.BlobsAfter,
		BytesBefore: st.BytesBefore, BytesAfter: st.BytesAfter,
		BytesFreed: st.BytesBefore - st.BytesAfter, TookMs: st.Took.Milliseconds(),
		UploadsRemoved: &st.UploadsRemoved,
	})
}

func (s *Server) createToken(w http.ResponseWriter, r *http.Request) {
	var req api.TokenRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", `body must be JSON {"subject": "...", "scopes": ["build:write"], "namespace": "...", "cache_scope": "...", "ttl": "24h"}`)
		return
	}
	scopes, err := auth.ParseScopes(strings.Join(req.Scopes, ","))
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	spec := auth.TokenSpec{Subject: req.Subject, Scopes: scopes, TTL: 24 * time.Hour}
	if req.Ttl != nil && *req.Ttl != "" {
		if spec.TTL, err = time.ParseDuration(*req.Ttl); err != nil || spec.TTL <= 0 {
			writeError(w, http.StatusBadRequest, "bad_request", "ttl must be a positive duration like 24h or 30m")
			return
		}
	}
	if req.CacheScope != nil {
		spec.CacheScope = *req.CacheScope
	}
	if req.Namespace != nil {
		spec.Namespace = *req.Namespace
	}
	iss, err := s.tokens.Create(r.Context(), spec)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, api.Token{Token: iss.Token, Id: iss.ID, Tenant: iss.Tenant, ExpiresAt: iss.ExpiresAt.UTC()})
}

func (s *Server) listTokens(w http.ResponseWriter, r *http.Request) {
	list, err := s.tokens.List(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := api.TokenList{Tokens: []api.TokenInfo{}}
	for _, t := range list {
		out.Tokens = append(out.Tokens, apiToken(t))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) revokeToken(w http.ResponseWriter, r *http.Request) {
	t, err := s.tokens.Revoke(r.Context(), r.PathValue("id"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.log.Info("token revoked", "id", t.ID, "subject", t.Subject, "by", principal(r).Subject)
	writeJSON(w, http.StatusOK, apiToken(t))
}

func apiToken(t store.Token) api.TokenInfo {
	out := api.TokenInfo{Id: t.ID, Subject: t.Subject, Tenant: t.Tenant, CacheScope: t.CacheScope, Scopes: t.Scopes,
		CreatedAt: t.CreatedAt, ExpiresAt: t.ExpiresAt}
	if !t.RevokedAt.IsZero() {
		out.RevokedAt = &t.RevokedAt
	}
	return out
}

// whoami tells a caller which tenant its token acts for and where its
// images are named, so the mapping of app:1 to <tenant>/app:1 is never a
// surprise.
func (s *Server) whoami(w http.ResponseWriter, r *http.Request) {
	p := principal(r)
	admin := p.Has(auth.ScopeBuildAdmin)
	prefix := p.Tenant + "/"
	if admin {
		prefix = ""
	}
	writeJSON(w, http.StatusOK, api.Whoami{Subject: p.Subject, Tenant: p.Tenant, CacheScope: p.CacheScope, Scopes: auth.ScopeNames(p.Scopes),
		TokenId: p.TokenID, ExpiresAt: p.ExpiresAt.UTC(), Admin: admin, ImagePrefix: prefix})
}

// runImage boots an image and streams its output as NDJSON RunOutput
// lines, the last carrying the exit code.
func (s *Server) runImage(w http.ResponseWriter, r *http.Request, name string) {
	var req api.RunRequest
	if r.ContentLength != 0 {
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
			writeError(w, http.StatusBadRequest, "bad_request", `body must be JSON {"args": [...], "env": ["K=V"]}`)
			return
		}
	}
	spec := images.RunSpec{}
	if req.Args != nil {
		spec.Args = *req.Args
	}
	if req.Env != nil {
		spec.Env = *req.Env
	}
	if req.MemoryMb != nil {
		spec.MemoryMB = *req.MemoryMb
	}
	if req.Cpus != nil {
		spec.CPUs = *req.Cpus
	}
	if _, err := s.images.Get(r.Context(), principal(r), name); err != nil {
		s.fail(w, r, err)
		return
	}
	out := &ndjsonWriter{w: w, flusher: w.(http.Flusher)}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("X-Accel-Buffering", "no")
	code, err := s.images.Run(r.Context(), principal(r), name, spec, out.stream("stdout"), out.stream("stderr"))
	if err != nil && errors.Is(err, images.ErrNoBuilderImage) && !out.started {
		writeError(w, http.StatusServiceUnavailable, "no_builder_image", err.Error())
		return
	}
	end := api.RunOutput{ExitCode: &code}
	if err != nil {
		msg := err.Error()
		end.Error = &msg
	}
	out.write(end)
}

// ndjsonWriter frames a run's stdout and stderr as JSON lines; the two
// streams write concurrently.
type ndjsonWriter struct {
	mu      sync.Mutex
	w       http.ResponseWriter
	flusher http.Flusher
	started bool
}

func (n *ndjsonWriter) write(v api.RunOutput) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.started = true
	json.NewEncoder(n.w).Encode(v)
	n.flusher.Flush()
}

func (n *ndjsonWriter) stream(name string) io.Writer {
	st := api.RunOutputStream(name)
	return writerFunc(func(p []byte) (int, error) {
		data := string(p)
		n.write(api.RunOutput{Stream: &st, Data: &data})
		return len(p), nil
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
