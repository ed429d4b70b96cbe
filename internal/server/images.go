package server

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/auth"
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
	list, err := s.images.List(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := api.ImageList{Images: []api.Image{}}
	for _, im := range list {
		out.Images = append(out.Images, s.apiImage(im, nil))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) getImage(w http.ResponseWriter, r *http.Request) {
	im, err := s.images.Get(r.Context(), r.PathValue("name"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.apiFullImage(im))
}

func (s *Server) deleteImage(w http.ResponseWriter, r *http.Request) {
	if err := s.images.Delete(r.Context(), r.PathValue("name")); err != nil {
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
	im, err := s.images.Tag(r.Context(), name, req.Name)
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
		// Without cache:admin a caller sees only its own scope.
		if !p.Has(auth.ScopeCacheAdmin) && v.Scope != p.CacheScope {
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
	if err := s.volumes.Delete(r.Context(), r.PathValue("scope")); err != nil {
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
	})
}

func (s *Server) createToken(w http.ResponseWriter, r *http.Request) {
	var req api.TokenRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", `body must be JSON {"subject": "...", "scopes": ["build:write"], "cache_scope": "...", "ttl": "24h"}`)
		return
	}
	scopes, err := auth.ParseScopes(strings.Join(req.Scopes, ","))
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	ttl := 24 * time.Hour
	if req.Ttl != nil && *req.Ttl != "" {
		if ttl, err = time.ParseDuration(*req.Ttl); err != nil || ttl <= 0 {
			writeError(w, http.StatusBadRequest, "bad_request", "ttl must be a positive duration like 24h or 30m")
			return
		}
	}
	cacheScope := ""
	if req.CacheScope != nil {
		cacheScope = *req.CacheScope
	}
	tok, err := s.auth.Issue(req.Subject, scopes, cacheScope, ttl, nil)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	writeJSON(w, http.StatusCreated, api.Token{Token: tok, ExpiresAt: time.Now().Add(ttl).UTC()})
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
	if _, err := s.images.Get(r.Context(), name); err != nil {
		s.fail(w, r, err)
		return
	}
	out := &ndjsonWriter{w: w, flusher: w.(http.Flusher)}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("X-Accel-Buffering", "no")
	code, err := s.images.Run(r.Context(), name, spec, out.stream("stdout"), out.stream("stderr"))
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
