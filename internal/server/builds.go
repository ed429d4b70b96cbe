package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/platforms"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/builds"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/sshrelay"
	"github.com/kiln-build/kiln/internal/store"
)

const (
	maxSecretBytes = 64 << 10 // one secret
	maxSecrets     = 100
	// maxRegistryAuthBytes bounds the registry_auth part.
	maxRegistryAuthBytes = 256 << 10
	// maxFieldsBytes bounds all plain fields of one submission together,
	// counted as they stream, so no combination of fields can make the
	// server hold more.
	maxFieldsBytes = 2 << 20
)

// fieldLimits bounds each plain field: how large one value may be and
// how many times it may be sent. Both are checked before a value is read
// into memory.
var fieldLimits = map[string]struct {
	max   int64
	count int
}{
	"dockerfile":       {1 << 20, 1},
	"dockerfile_path":  {4096, 1},
	"build_args":       {128 << 10, 1},
	"target":           {256, 1},
	"platform":         {1024, 16},
	"tags":             {512, builds.MaxTags},
	"no_cache":         {16, 1},
	"pull":             {16, 1},
	"cpus":             {32, 1},
	"memory_mb":        {32, 1},
	"disk_gb":          {32, 1},
	"timeout_seconds":  {32, 1},
	"cache_scope":      {128, 1},
	"global_cache_key": {256, 1},
	"global_cache":     {16, 1},
	"network":          {32, 1},
	"allowed_domains":  {512, 256},
	"labels":           {64 << 10, 1},
	"annotations":      {64 << 10, 1},
	"add_hosts":        {512, 64},
	"shm_size":         {32, 1},
	"ulimits":          {128, 32},
	"context_url":      {8 << 10, 1},
	"push":             {16, 1},
	"cache_from":       {2048, 8},
	"cache_to":         {2048, 1},
	"build_contexts":   {8 << 10, 16},
	"call":             {64, 1},
	"allow":            {64, 4},
	"attach":           {16, 1},
	"attest":           {2048, 8},
	"ssh":              {256, sshrelay.MaxIDs},
}

// uploadSlot takes one of the caller's upload slots, or answers 429.
func (s *Server) uploadSlot(w http.ResponseWriter, r *http.Request) (release func(), ok bool) {
	release, err := s.uploads.acquire(principal(r).Tenant)
	if err != nil {
		var tm *tooManyUploadsError
		if errors.As(err, &tm) {
			writeTooMany(w, tm)
			return nil, false
		}
		s.fail(w, r, err)
		return nil, false
	}
	return release, true
}

// createBuild reads the multipart submission part by part; the context
// part streams straight to disk.
func (s *Server) createBuild(w http.ResponseWriter, r *http.Request) {
	ct, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || ct != "multipart/form-data" {
		writeError(w, http.StatusBadRequest, "bad_request", "POST /v1/builds takes multipart/form-data with a context part (tar, tar.gz or tar.zst) and optional fields; see api/openapi.yaml")
		return
	}
	mr, err := r.MultipartReader()
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", "malformed multipart body: "+err.Error())
		return
	}
	release, ok := s.uploadSlot(w, r)
	if !ok {
		return
	}
	defer release()
	up := s.builds.NewUpload()
	submitted := false
	defer func() {
		if !submitted {
			s.builds.Discard(up)
		}
	}()
	req := builds.Request{Secrets: map[string][]byte{}}
	// attach: the client follows the build and wants it canceled when it
	// goes away (see builds.Service.Attach); without it the build runs
	// regardless of watchers.
	attach := false
	counts := map[string]int{}
	budget := int64(maxFieldsBytes)
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			writeError(w, http.StatusBadRequest, "bad_request", "malformed multipart body: "+err.Error())
			return
		}
		name := part.FormName()
		switch name {
		case "context":
			if err := s.builds.ReceiveContext(r.Context(), up, part); err != nil {
				s.fail(w, r, err)
				return
			}
		case "context_manifest":
			if err := s.builds.ReceiveManifest(r.Context(), principal(r), up, part); err != nil {
				s.fail(w, r, err)
				return
			}
		case "named_context":
			if err := s.builds.ReceiveNamedContext(r.Context(), up, part.FileName(), part); err != nil {
				s.fail(w, r, err)
				return
			}
		case "secret":
			id := part.FileName()
			if id == "" {
				writeError(w, http.StatusBadRequest, "bad_request", "a secret part needs a filename, which is the secret id (curl: -F 'secret=@file;filename=ID')")
				return
			}
			if len(req.Secrets) >= maxSecrets {
				writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("more than %d secrets", maxSecrets))
				return
			}
			if _, dup := req.Secrets[id]; dup {
				writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("secret %q is sent twice", id))
				return
			}
			v, err := readLimited(part, maxSecretBytes)
			if err != nil {
				writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("secret %s: %v", errdefs.Quote(id), err))
				return
			}
			req.Secrets[id] = v
		case "ssh_key":
			if err := readSSHKey(&req, part); err != nil {
				s.fail(w, r, err)
				return
			}
		case "registry_auth":
			if req.RegistryAuth != nil {
				writeError(w, http.StatusBadRequest, "bad_request", "registry_auth is sent twice; send one JSON object with every registry")
				return
			}
			v, err := readLimited(part, maxRegistryAuthBytes)
			if err == nil {
				req.RegistryAuth, err = parseRegistryAuth(v)
			}
			clear(v)
			if err != nil {
				// Never the value: it holds passwords.
				writeError(w, http.StatusBadRequest, "bad_request", "registry_auth: "+err.Error())
				return
			}
		default:
			lim, ok := fieldLimits[name]
			if !ok {
				writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("unknown field %s; the fields are listed in api/openapi.yaml (BuildRequest)", errdefs.Quote(name)))
				return
			}
			if counts[name]++; counts[name] > lim.count {
				writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("field %s is sent more than %d times", name, lim.count))
				return
			}
			v, err := readLimited(part, min(lim.max, budget))
			if err != nil {
				writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("field %s: %v (each value may have %d bytes, all fields together %d)", name, err, lim.max, maxFieldsBytes))
				return
			}
			budget -= int64(len(v))
			if name == "attach" {
				b, e := strconv.ParseBool(strings.TrimSpace(string(v)))
				if e != nil {
					writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("field attach: %s is not true or false", errdefs.Quote(string(v))))
					return
				}
				attach = b
				continue
			}
			if err := setField(&req, name, string(v)); err != nil {
				writeError(w, http.StatusBadRequest, "bad_request", err.Error())
				return
			}
		}
	}
	b, err := s.builds.Submit(r.Context(), principal(r), up, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	submitted = true
	if attach && !store.Terminal(b.Status) {
		s.builds.Attach(b.ID)
	}
	writeJSON(w, http.StatusAccepted, s.apiBuild(r, b))
}

// parseRegistryAuth reads {"host": {"username": "u", "password": "p"}}.
// Its errors never quote the input.
func parseRegistryAuth(v []byte) (map[string]solve.Credentials, error) {
	var m map[string]struct {
		Username string `json:"username"`
		Password string `json:"password"`
	}
	if err := json.Unmarshal(v, &m); err != nil {
		return nil, errors.New(`not a JSON object of {"registry-host": {"username": "...", "password": "..."}}`)
	}
	out := make(map[string]solve.Credentials, len(m))
	for host, c := range m {
		if host == "" || strings.ContainsAny(host, "/ \n") {
			return nil, fmt.Errorf("%s is not a registry host[:port]", errdefs.Quote(host))
		}
		out[host] = solve.Credentials{Username: c.Username, Password: c.Password}
	}
	return out, nil
}

func readLimited(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("longer than the %d byte limit", limit)
	}
	return b, nil
}

func setField(req *builds.Request, name, v string) error {
	var err error
	atoi := func(field string) int {
		n, e := strconv.Atoi(strings.TrimSpace(v))
		if e != nil {
			err = fmt.Errorf("field %s: %s is not a whole number", field, errdefs.Quote(v))
		}
		return n
	}
	boolean := func(field string) bool {
		b, e := strconv.ParseBool(strings.TrimSpace(v))
		if e != nil {
			err = fmt.Errorf("field %s: %s is not true or false", field, errdefs.Quote(v))
		}
		return b
	}
	switch name {
	case "dockerfile":
		req.Dockerfile = v
	case "dockerfile_path":
		req.DockerfilePath = v
	case "build_args":
		if e := json.Unmarshal([]byte(v), &req.BuildArgs); e != nil {
			return fmt.Errorf("field build_args must be a JSON object of strings, like {\"VERSION\":\"1.2\"}: %v", e)
		}
	case "target":
		req.Target = v
	case "platform":
		req.Platforms = append(req.Platforms, v)
	case "tags":
		req.Tags = append(req.Tags, v)
	case "no_cache":
		req.NoCache = boolean(name)
	case "pull":
		req.Pull = boolean(name)
	case "cpus":
		req.CPUs = atoi(name)
	case "memory_mb":
		req.MemoryMB = atoi(name)
	case "disk_gb":
		req.DiskGB = atoi(name)
	case "timeout_seconds":
		req.TimeoutSec = atoi(name)
	case "cache_scope":
		req.CacheScope = v
	case "global_cache_key":
		req.GlobalCacheKey = v
	case "global_cache":
		req.GlobalCache = boolean(name)
	case "network":
		req.Network = v
	case "allowed_domains":
		req.AllowedDomains = append(req.AllowedDomains, v)
	case "push":
		req.Push = boolean(name)
	case "cache_from":
		req.CacheFrom = append(req.CacheFrom, v)
	case "cache_to":
		req.CacheTo = append(req.CacheTo, v)
	case "build_contexts":
		req.BuildContexts = append(req.BuildContexts, v)
	case "call":
		req.Call = strings.TrimSpace(v)
	case "allow":
		req.Allow = append(req.Allow, strings.TrimSpace(v))
	case "attest":
		req.Attest = append(req.Attest, strings.TrimSpace(v))
	case "ssh":
		req.SSH = append(req.SSH, strings.TrimSpace(v))
	case "labels", "annotations":
		m := &req.Labels
		if name == "annotations" {
			m = &req.Annotations
		}
		if e := json.Unmarshal([]byte(v), m); e != nil {
			return fmt.Errorf("field %s must be a JSON object of strings, like {\"org.opencontainers.image.source\":\"https://…\"}: %v", name, e)
		}
	case "add_hosts":
		req.AddHosts = append(req.AddHosts, v)
	case "shm_size":
		n, e := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if e != nil {
			return fmt.Errorf("field shm_size: %s is not a number of bytes", errdefs.Quote(v))
		}
		req.ShmSize = n
	case "ulimits":
		req.Ulimits = append(req.Ulimits, v)
	case "context_url":
		req.ContextURL = strings.TrimSpace(v)
	}
	return err
}

func (s *Server) apiBuild(r *http.Request, b store.Build) api.Build {
	out := api.Build{
		Id:             b.ID,
		Status:         api.BuildStatus(b.Status),
		Phase:          b.Phase,
		Tenant:         &b.Tenant,
		CacheScope:     b.CacheScope,
		Tags:           b.Tags,
		StepsTotal:     b.StepsTotal,
		StepsCached:    b.StepsCached,
		Runtime:        b.Runtime,
		CreatedAt:      b.CreatedAt,
		Subject:        &b.Subject,
		Target:         &b.Options.Target,
		NoCache:        &b.Options.NoCache,
		Pull:           &b.Options.Pull,
		Cpus:           &b.Options.CPUs,
		MemoryMb:       &b.Options.MemoryMB,
		DiskGb:         &b.Options.DiskGB,
		TimeoutSeconds: &b.Options.TimeoutSeconds,
		ContextBytes:   &b.ContextBytes,
		Network:        &b.Options.Network,
	}
	if len(b.Options.AllowedDomains) > 0 {
		out.AllowedDomains = &b.Options.AllowedDomains
	}
	if len(b.Options.Platforms) > 0 {
		out.Platforms = &b.Options.Platforms
	}
	if len(b.Options.ExternalPush) > 0 {
		out.Pushed = &b.Options.ExternalPush
	}
	if len(b.Options.CacheFrom) > 0 {
		refs := make([]string, len(b.Options.CacheFrom))
		for i, c := range b.Options.CacheFrom {
			refs[i] = c.Ref
		}
		out.CacheFrom = &refs
	}
	if b.Options.Provenance != "" {
		out.Provenance = &b.Options.Provenance
	}
	if g := b.Options.SBOM; g != nil {
		gen := g.Generator.Upstream + "@" + g.Generator.Digest
		if g.Generator.Local {
			gen = g.Generator.LocalRepo + "@" + g.Generator.Digest
		}
		out.SbomGenerator = &gen
	}
	if b.Options.ContextSource != "" {
		out.ContextSource = &b.Options.ContextSource
	}
	if len(b.Options.Entitlements) > 0 {
		out.Allow = &b.Options.Entitlements
	}
	if b.Options.Call != "" {
		out.Call = &b.Options.Call
	}
	if len(b.Options.SSH) > 0 {
		ids := b.Options.SSHIDs()
		out.Ssh = &ids
	}
	if c := b.Check; c != nil {
		out.Check = &api.BuildCheck{Warnings: c.Warnings, Report: c.Report}
		if c.Error != "" {
			out.Check.Error = &c.Error
		}
	}
	if c := b.Options.CacheTo; c != nil {
		ref := "type=registry,ref=" + c.Ref + ",mode=" + c.Mode
		out.CacheTo = &ref
	}
	if b.Status != store.StatusQueued && b.Runtime != "" {
		out.BuilderReused = &b.BuilderReused
	}
	if len(b.Timings) > 0 {
		out.Timings = &b.Timings
	}
	if out.Tags == nil {
		out.Tags = []string{}
	}
	if b.ImageDigest != "" {
		out.ImageDigest = &b.ImageDigest
	}
	// builds/<id> names the result only once there is one: a failed or
	// canceled build, or one still running, has no image to point at.
	if b.Status == store.StatusSucceeded && b.ImageDigest != "" {
		out.Image = builds.CanonicalName(b.ID)
	}
	if b.DedupOf != "" {
		out.DedupOf = &b.DedupOf
	}
	if b.InputHash != "" {
		out.InputHash = &b.InputHash
	}
	if b.Error != "" {
		out.Error = &b.Error
	}
	if !b.StartedAt.IsZero() {
		out.StartedAt = &b.StartedAt
	}
	if !b.FinishedAt.IsZero() {
		out.FinishedAt = &b.FinishedAt
	}
	if b.Status == store.StatusQueued {
		if pos, err := s.builds.QueuePosition(r.Context(), b); err == nil && pos > 0 {
			out.QueuePosition = &pos
		}
	}
	return out
}

func (s *Server) listBuilds(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := store.ListFilter{Status: q.Get("status"), InputHash: q.Get("input_hash"), IDPrefix: q.Get("id_prefix"), Limit: 50}
	if q.Has("id_prefix") && !validIDPrefix(f.IDPrefix) {
		writeError(w, http.StatusBadRequest, "bad_request", "id_prefix must be the start of a build id: 1 to 27 lower-case letters and digits, such as b0k3")
		return
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 500 {
			writeError(w, http.StatusBadRequest, "bad_request", "limit must be a number from 1 to 500")
			return
		}
		f.Limit = n
	}
	if v := q.Get("cursor"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 1 {
			writeError(w, http.StatusBadRequest, "bad_request", "cursor is not one this server gave out; use next_cursor from the previous page")
			return
		}
		f.BeforeSeq = n
	}
	list, err := s.builds.List(r.Context(), principal(r), f)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := api.BuildList{Builds: []api.Build{}}
	for _, b := range list {
		out.Builds = append(out.Builds, s.apiBuild(r, b))
	}
	if len(list) == f.Limit {
		c := strconv.FormatInt(list[len(list)-1].Seq, 10)
		out.NextCursor = &c
	}
	writeJSON(w, http.StatusOK, out)
}

// validIDPrefix reports whether p could start a build id (lower-case
// base32, at most 27 characters).
func validIDPrefix(p string) bool {
	if p == "" || len(p) > 27 {
		return false
	}
	for _, c := range p {
		if !strings.ContainsRune("0123456789abcdefghjkmnpqrstvwxyz", c) {
			return false
		}
	}
	return true
}

func (s *Server) getBuild(w http.ResponseWriter, r *http.Request) {
	b, err := s.builds.Get(r.Context(), principal(r), r.PathValue("id"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s.apiBuild(r, b))
}

func (s *Server) cancelBuild(w http.ResponseWriter, r *http.Request) {
	b, err := s.builds.Cancel(r.Context(), principal(r), r.PathValue("id"))
	switch {
	case errors.Is(err, builds.ErrFinished):
		writeJSON(w, http.StatusConflict, s.apiBuild(r, b))
	case err != nil:
		s.fail(w, r, err)
	default:
		writeJSON(w, http.StatusOK, s.apiBuild(r, b))
	}
}

// heartbeat is how often an idle event stream sends a comment, so proxies
// keep it open and clients notice a dead connection.
var heartbeat = 15 * time.Second

// buildEvents streams a build's events as Server-Sent Events. It reads
// from the database after the client's last id, then sleeps until the
// build gets a new event, so resuming is exact: no loss, no duplicate.
func (s *Server) buildEvents(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if _, err := s.builds.Get(r.Context(), principal(r), id); err != nil {
		s.fail(w, r, err)
		return
	}
	var after int64
	last := r.Header.Get("Last-Event-ID")
	if last == "" {
		last = r.URL.Query().Get("after")
	}
	if last != "" {
		n, err := strconv.ParseInt(last, 10, 64)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, "bad_request", "Last-Event-ID must be the id of an event this stream sent")
			return
		}
		after = n
	}
	flusher, ok := w.(http.Flusher)
	if !ok {
		writeError(w, http.StatusInternalServerError, "internal", "streaming unsupported by this connection")
		return
	}
	wake, stop := s.builds.Watch(id)
	defer stop()
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, ": kiln build %s events\n\n", id)
	flusher.Flush()
	tick := time.NewTicker(s.heartbeat)
	defer tick.Stop()
	for {
		evs, err := s.builds.Events(r.Context(), id, after, 500)
		if err != nil {
			return
		}
		for _, e := range evs {
			out := apiEvent(e)
			if e.Event.Kind == builds.KindEnd {
				if b, err := s.builds.Get(r.Context(), principal(r), id); err == nil {
					ab := s.apiBuild(r, b)
					out.Build = &ab
				}
			}
			data, _ := json.Marshal(out)
			fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s\n\n", e.Seq, e.Event.Kind, data)
			after = e.Seq
			if e.Event.Kind == builds.KindEnd {
				flusher.Flush()
				return
			}
		}
		flusher.Flush()
		if len(evs) == 500 {
			continue
		}
		select {
		case <-r.Context().Done():
			return
		case <-wake:
		case <-tick.C:
			if _, err := fmt.Fprint(w, ": heartbeat\n\n"); err != nil {
				return
			}
			flusher.Flush()
		}
	}
}

func apiEvent(e builds.StoredEvent) api.Event {
	ev := e.Event
	out := api.Event{Id: e.Seq, Kind: string(ev.Kind), Time: ev.Time}
	str := func(s string) *string {
		if s == "" {
			return nil
		}
		return &s
	}
	out.Phase, out.Status, out.Vertex, out.Name = str(ev.Phase), str(ev.Status), str(ev.Vertex), str(ev.Name)
	out.Error, out.Data, out.Message = str(ev.Error), str(ev.Data), str(ev.Message)
	if ev.Stream != 0 {
		out.Stream = &ev.Stream
	}
	return out
}

// buildLogs renders the build's events as a plain-text log.
func (s *Server) buildLogs(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if _, err := s.builds.Get(r.Context(), principal(r), id); err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	var after int64
	for {
		evs, err := s.builds.Events(r.Context(), id, after, 1000)
		if err != nil || len(evs) == 0 {
			return
		}
		for _, e := range evs {
			after = e.Seq
			if line := apiEvent(e).LogLine(); line != "" {
				io.WriteString(w, line)
			}
		}
	}
}

// buildOutput streams a succeeded build's result as a tar: its flattened
// filesystem (type=tar, what --output type=local|tar exports) or its image
// as an OCI layout (type=oci, for --output type=oci|docker).
func (s *Server) buildOutput(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !principal(r).Has(auth.ScopeBuildRead) {
		writeError(w, http.StatusForbidden, "forbidden", "a build's output needs the build:read and image:read scopes; ask for a token that has both")
		return
	}
	b, err := s.builds.Get(r.Context(), principal(r), id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if b.Status != store.StatusSucceeded || b.ImageDigest == "" {
		writeError(w, http.StatusConflict, "not_succeeded", fmt.Sprintf("build %s is %s; its output exists once it has succeeded", id, b.Status))
		return
	}
	platform := r.URL.Query().Get("platform")
	if platform != "" {
		p, err := platforms.Parse(platform)
		if err != nil {
			writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("platform %s is not a platform: use os/arch[/variant], like linux/arm64", errdefs.Quote(platform)))
			return
		}
		platform = platforms.Format(platforms.Normalize(p))
	}
	var export func(io.Writer) error
	switch typ := r.URL.Query().Get("type"); typ {
	case "", "tar":
		export = func(w io.Writer) error { return s.images.ExportFilesystem(r.Context(), b.ImageDigest, platform, w) }
	case "oci":
		name := builds.CanonicalName(b.ID)
		if len(b.Tags) > 0 {
			name = b.Tags[0]
		}
		export = func(w io.Writer) error {
			if platform == "" && len(b.Options.Platforms) > 1 {
				return s.images.ExportImageIndex(r.Context(), b.ImageDigest, s.registryHost+"/"+name, w)
			}
			return s.images.ExportImage(r.Context(), b.ImageDigest, s.registryHost+"/"+name, platform, w)
		}
	default:
		writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("output type %q is unknown: use tar (the filesystem) or oci (the image)", typ))
		return
	}
	w.Header().Set("Content-Type", "application/x-tar")
	sw := &startedWriter{w: w}
	if err := export(sw); err != nil {
		if !sw.started {
			// Nothing is sent yet (the export failed preparing the
			// filesystem): a plain error answer says why.
			w.Header().Del("Content-Type")
			s.fail(w, r, fmt.Errorf("export the output of build %s: %w", id, err))
			return
		}
		// The status is sent; abort so the client sees a broken stream,
		// never a tar that looks complete.
		s.log.Error("export build output", "build", id, "err", err)
		panic(http.ErrAbortHandler)
	}
}

// startedWriter notes whether anything was written, i.e. whether the
// response's status is already sent.
type startedWriter struct {
	w       io.Writer
	started bool
}

func (s *startedWriter) Write(p []byte) (int, error) {
	s.started = s.started || len(p) > 0
	return s.w.Write(p)
}
