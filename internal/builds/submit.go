package builds

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"golang.org/x/crypto/ssh/agent"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/ctxstore"
	"github.com/kiln-build/kiln/internal/egress"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/store"
)

// Upload is a submission in progress: it owns an id and a context
// directory until Submit accepts it or Discard drops it.
type Upload struct {
	ID      string
	dir     string
	context *buildcontext.Info
	// named are the named context directories sent with the submission
	// or downloaded for it.
	named []namedUpload
	// source is where the context came from when the server fetched it
	// (a git repository, an http(s) URL), for the build's messages.
	source string
}

// NewUpload starts a submission.
func (s *Service) NewUpload() *Upload {
	id := newID()
	return &Upload{ID: id, dir: s.contextDir(id)}
}

// ReceiveContext streams the build context into the upload's directory.
// On error nothing is left behind.
func (s *Service) ReceiveContext(ctx context.Context, u *Upload, r io.Reader) error {
	if u.context != nil {
		return badRequest("the request has more than one context part; send exactly one")
	}
	info, err := buildcontext.Receive(ctx, r, u.dir, s.cfg.Context)
	if err != nil {
		return err
	}
	u.context = &info
	return nil
}

// maxManifestBytes bounds a context manifest: a million entries of long
// paths fit.
const maxManifestBytes = 512 << 20

// ReceiveManifest materializes the context a manifest describes from the
// tenant's content store into the upload's directory (hard links, no
// copies). Content the store lacks fails with an error wrapping
// buildcontext.ErrMissingBlobs: the client sends it and submits again.
func (s *Service) ReceiveManifest(ctx context.Context, p auth.Principal, u *Upload, r io.Reader) error {
	if u.context != nil {
		return badRequest("the request has more than one context part; send exactly one context or context_manifest")
	}
	if s.contexts == nil {
		return badRequest("this kiln server keeps no context store; send the context as a tar in the field \"context\"")
	}
	var m buildcontext.Manifest
	dec := json.NewDecoder(io.LimitReader(r, maxManifestBytes))
	if err := dec.Decode(&m); err != nil {
		return badRequest("the context_manifest part is not a JSON context manifest (%v); see buildcontext.Manifest in the API docs", err)
	}
	src := s.contexts.Source(p.Tenant)
	defer src.Release()
	info, err := buildcontext.Materialize(ctx, m, src, u.dir, s.cfg.Context)
	if err != nil {
		return err
	}
	u.context = &info
	return nil
}

// MissingBlobs answers which of digests the tenant's context store lacks.
func (s *Service) MissingBlobs(p auth.Principal, digests []string) ([]string, error) {
	if !p.Has(auth.ScopeBuildWrite) {
		return nil, forbidden("the context store takes uploads for builds: it needs the build:write scope")
	}
	if s.contexts == nil {
		return nil, errdefs.NotFound("this kiln server keeps no context store; send contexts as tars")
	}
	if s.cfg.Context.MaxEntries > 0 && len(digests) > s.cfg.Context.MaxEntries {
		return nil, badRequest("%d digests in one query; at most %d (context.max_entries)", len(digests), s.cfg.Context.MaxEntries)
	}
	return s.contexts.Missing(p.Tenant, digests)
}

// PutBlobs stores a tar of blobs in the tenant's context store.
func (s *Service) PutBlobs(ctx context.Context, p auth.Principal, r io.Reader) (ctxstore.PutStats, error) {
	if !p.Has(auth.ScopeBuildWrite) {
		return ctxstore.PutStats{}, forbidden("the context store takes uploads for builds: it needs the build:write scope")
	}
	if s.contexts == nil {
		return ctxstore.PutStats{}, errdefs.NotFound("this kiln server keeps no context store; send contexts as tars")
	}
	return s.contexts.Put(ctx, p.Tenant, r)
}

// Discard drops an upload that was not submitted.
func (s *Service) Discard(u *Upload) {
	os.RemoveAll(u.dir)
	os.RemoveAll(u.dir + ".dockerfile")
	os.RemoveAll(u.dir + ".named")
}

// Request is what a client asked for, already decoded from the wire.
type Request struct {
	Dockerfile     string // inline text; empty means DockerfilePath
	DockerfilePath string
	BuildArgs      map[string]string
	Target         string
	// Platforms are --platform values as sent: each one a platform or a
	// comma-separated list of them.
	Platforms      []string
	Tags           []string
	NoCache        bool
	Pull           bool
	Secrets        map[string][]byte
	CPUs           int
	MemoryMB       int
	DiskGB         int
	TimeoutSec     int
	CacheScope     string
	GlobalCacheKey string
	GlobalCache    bool
	Network        string
	AllowedDomains []string
	// docker build's knobs: --label, --annotation, --add-host
	// ("host:ip"), --shm-size (bytes), --ulimit ("nofile=1024:2048").
	Labels      map[string]string
	Annotations map[string]string
	AddHosts    []string
	ShmSize     int64
	Ulimits     []string
	// ContextURL is a git URL the builder fetches as the context instead
	// of an uploaded one (https://host/org/repo.git#ref:subdir).
	ContextURL string
	// Allow are insecure entitlements (docker buildx build --allow):
	// network.host, security.insecure.
	Allow []string
	// Call is "" or "build" (a build) or "check" (docker build --check:
	// the Dockerfile's checks, no image).
	Call string
	// Push lets Tags name images on other registries, which the result
	// is pushed to as well (kiln build --push).
	Push bool
	// CacheFrom and CacheTo are registry caches as buildx takes them
	// (type=registry,ref=NAME[,mode=max]).
	CacheFrom []string
	CacheTo   []string
	// BuildContexts are named contexts NAME=SOURCE (docker-image://REF,
	// a git URL, an http(s) URL); directories arrive through
	// ReceiveNamedContext.
	BuildContexts []string
	// RegistryAuth are the submitter's credentials per registry host for
	// the other registries the build reaches. Memory-only.
	RegistryAuth map[string]solve.Credentials
	// Attest are attestations as buildx's --attest takes them
	// (type=provenance,mode=max; type=sbom,generator=IMAGE); see
	// attest.go.
	Attest []string
	// SSH are ssh-agent ids forwarded from the client's agent through the
	// build's ssh session (kiln build --ssh ID); SSHKeys are ids served
	// from key files sent with the submission (--ssh ID=KEYFILE), held in
	// memory only, like Secrets. See ssh.go.
	SSH     []string
	SSHKeys map[string][][]byte

	// sshRings are SSHKeys parsed into keyrings by validateSSH.
	sshRings map[string]agent.Agent
}

// gitResolveTimeout bounds the host-side git ls-remote that pins a git
// context's ref to a commit.
const gitResolveTimeout = 20 * time.Second

// MaxTags is how many names one build may give its result.
const MaxTags = 32

var (
	argName     = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	secretID    = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,128}$`)
	globalKey   = regexp.MustCompile(`^[a-z0-9]+(?:[._-][a-z0-9]+)*$`)
	maxArgBytes = 64 << 10
)

// Submit validates an upload and its request and queues the build. On
// any error the upload is discarded and nothing is recorded.
func (s *Service) Submit(ctx context.Context, p auth.Principal, u *Upload, req Request) (b Build, err error) {
	defer func() {
		if err != nil {
			s.Discard(u)
		}
	}()
	if !p.Has(auth.ScopeBuildWrite) {
		return Build{}, forbidden("submitting a build needs the build:write scope; ask for a token that has it")
	}
	scope, err := p.CheckCacheScope(req.CacheScope)
	if err != nil {
		return Build{}, forbidden("cache_scope %q is not yours: your token's cache scope is %q; omit cache_scope or send your own", req.CacheScope, p.CacheScope)
	}
	if req.ContextURL != "" && u.context != nil {
		return Build{}, badRequest("the request has both a context part and context_url: send one of them")
	}
	// A URL context is fetched here, by the server, and is from then on
	// what an upload is: its Dockerfile read and its bases pinned now,
	// its content hashed, the same on every runtime.
	switch {
	case req.ContextURL == "":
	case isHTTPContext(req.ContextURL):
		if err := s.receiveURLContext(ctx, u, &req); err != nil {
			return Build{}, err
		}
	default:
		if err := s.receiveGitContext(ctx, u, &req); err != nil {
			return Build{}, err
		}
	}
	if u.context == nil {
		return Build{}, badRequest("the request has no context part: send the build context as a tar, tar.gz or tar.zst file in the multipart field \"context\" (or a manifest in \"context_manifest\", or a git or http(s) URL in \"context_url\")")
	}
	opts, dockerfile, err := s.validate(ctx, p, u, &req)
	if err != nil {
		return Build{}, err
	}
	opts.ContextSource = u.source
	if err := s.attestations(ctx, p, &req, &opts); err != nil {
		return Build{}, err
	}
	if !opts.InlineDockerfile {
		// BuildKit honours "<Dockerfile>.dockerignore" over .dockerignore.
		info, err := u.context.ForDockerfile(opts.DockerfilePath)
		if err != nil {
			return Build{}, err
		}
		u.context = &info
	}
	opts.ContextKey = contextKey(scope, opts)
	kilnTags, creds, err := s.registries(ctx, p, &req, &opts)
	if err != nil {
		return Build{}, err
	}
	tags, err := s.nameTags(ctx, p, kilnTags)
	if err != nil {
		return Build{}, err
	}
	if err := s.namedContexts(ctx, p, u, &req, &opts); err != nil {
		return Build{}, err
	}
	b = Build{
		ID:           u.ID,
		Status:       store.StatusQueued,
		Phase:        "queued",
		Subject:      p.Subject,
		Tenant:       p.Tenant,
		CacheScope:   scope,
		Tags:         tags,
		Options:      opts,
		ContextBytes: u.contextBytes(),
		Attempt:      1,
		Runtime:      s.runtime.Name(),
		CreatedAt:    time.Now().UTC(),
	}
	// A Dockerfile in a git context is read by the builder: its bases are
	// resolved there, not pinned here.
	var bases []pinnedBase
	if dockerfile != nil {
		bases, err = s.pinBases(ctx, p, dockerfile, opts)
		if err != nil {
			return Build{}, err
		}
	}
	var notes []string
	for _, pb := range bases {
		notes = append(notes, pb.ref+"@"+pb.digest)
		b.Options.Bases = append(b.Options.Bases, pb.pin)
	}
	basesNote := strings.Join(notes, ", ")
	// A git context whose Dockerfile the builder reads has unpinned
	// bases, so its hash could not say what it builds on: no dedup.
	if dedupEligible(opts) && dockerfile != nil && namedContextsPinned(opts) {
		b.InputHash = s.inputHash(u.contextHash(opts), dockerfile, opts, bases)
		orig, hit, err := s.findDedup(ctx, b.InputHash, b.Tenant, opts.CacheMounts)
		if err != nil {
			return Build{}, err
		}
		if hit {
			done, err := s.submitDedup(ctx, u, b, orig)
			if !errors.Is(err, errDedupGone) {
				return done, err
			}
			// Built anew, and the next identical submission dedups
			// against this build.
			s.log.Info("dedup hit on a build whose image is gone from the registry; building", "original", orig.ID, "input_hash", b.InputHash)
		}
	}
	if len(req.Secrets) > 0 || len(creds) > 0 || len(req.sshRings) > 0 {
		s.secrets.Store(b.ID, &attachment{secrets: req.Secrets, registryAuth: creds, sshRings: req.sshRings})
	}
	err = s.db.InTx(ctx, func(tx *sql.Tx) error {
		// Looked up in the transaction that records the build, so of
		// identical submissions arriving together exactly one leads.
		if b.InputHash != "" {
			leader, inFlight, err := s.findInFlight(ctx, tx, b.InputHash, b.Tenant, opts.CacheMounts, b.ID)
			if err != nil {
				return err
			}
			if inFlight {
				b.Options.Follows = leader.ID
			}
		}
		if err := store.CreateBuild(ctx, tx, &b); err != nil {
			return err
		}
		return s.enqueue(ctx, tx, b.ID, b.Attempt)
	})
	if err != nil {
		s.secrets.Delete(b.ID)
		return Build{}, fmt.Errorf("record build: %w", err)
	}
	s.emit(b.ID, Event{Status: store.StatusQueued, Event: progress.Event{Kind: KindStatus}})
	if u.source != "" {
		s.message(b.ID, "context: %s: %d files, %d bytes", u.source, u.context.Entries, u.context.UncompressedBytes)
	} else {
		s.message(b.ID, "context received: %d files, %d bytes", u.context.Entries, u.context.UncompressedBytes)
	}
	if basesNote != "" {
		s.message(b.ID, "base images: %s", basesNote)
	}
	if b.Options.Follows != "" {
		s.message(b.ID, "identical build %s is in flight: this build waits for it and takes its result instead of running the same steps", b.Options.Follows)
	}
	s.metrics.submitted()
	return b, nil
}

// validate checks everything about a request that can be checked before
// BuildKit runs, so a mistake answers 400 at once instead of a failed
// build minutes later.
func (s *Service) validate(ctx context.Context, p auth.Principal, u *Upload, req *Request) (store.BuildOptions, []byte, error) {
	o := store.BuildOptions{
		Target:         req.Target,
		NoCache:        req.NoCache,
		Pull:           req.Pull,
		BuildArgs:      req.BuildArgs,
		GlobalCacheKey: req.GlobalCacheKey,
		Admin:          p.Has(auth.ScopeBuildAdmin),
	}
	total := 0
	for k, v := range req.BuildArgs {
		if !argName.MatchString(k) {
			return o, nil, badRequest("build arg name %q is invalid: names start with a letter or _ and contain only letters, digits and _", k)
		}
		total += len(k) + len(v)
	}
	if total > maxArgBytes {
		return o, nil, badRequest("build args total %d bytes, more than the %d byte limit", total, maxArgBytes)
	}
	if err := validateKnobs(req, &o); err != nil {
		return o, nil, err
	}
	switch req.Call {
	case "", "build":
	case solve.CallCheck:
		if len(req.Tags) > 0 || req.Push || len(req.CacheTo) > 0 {
			return o, nil, badRequest("call=check runs the Dockerfile's checks and builds no image: drop tags, push and cache_to")
		}
		o.Call = solve.CallCheck
	default:
		return o, nil, badRequest("call %s is not supported: use build (the default) or check", errdefs.Quote(req.Call))
	}
	for id := range req.Secrets {
		if !secretID.MatchString(id) {
			return o, nil, badRequest("secret id %q is invalid: use 1-128 letters, digits, '.', '_' or '-'", id)
		}
		o.SecretIDs = append(o.SecretIDs, id)
	}
	sort.Strings(o.SecretIDs)
	if err := validateSSH(req, &o); err != nil {
		return o, nil, err
	}
	if req.GlobalCache {
		if !p.Has(auth.ScopeBuildAdmin) {
			return o, nil, forbidden("global_cache writes the shared global cache tier and needs the build:admin scope; drop global_cache to import it read-only with global_cache_key")
		}
		if req.GlobalCacheKey == "" {
			return o, nil, badRequest("global_cache needs global_cache_key: the key names the cache/global/<key> entry to write")
		}
		o.GlobalCacheExport = true
	}
	if req.GlobalCacheKey != "" && (!globalKey.MatchString(req.GlobalCacheKey) || len(req.GlobalCacheKey) > 128) {
		return o, nil, badRequest("global_cache_key %q is invalid: use lower-case letters, digits and single '.', '_' or '-' separators", req.GlobalCacheKey)
	}
	if err := s.validateNetwork(req, &o); err != nil {
		return o, nil, err
	}
	if err := s.validateEntitlements(req, &o); err != nil {
		return o, nil, err
	}
	if err := s.validatePlatforms(req, &o); err != nil {
		return o, nil, err
	}
	var err error
	if o.CPUs, err = capped("cpus", req.CPUs, s.cfg.CPUs, "limits.cpus"); err != nil {
		return o, nil, err
	}
	if o.MemoryMB, err = capped("memory_mb", req.MemoryMB, s.cfg.MemoryMB, "limits.memory_mb"); err != nil {
		return o, nil, err
	}
	if o.DiskGB, err = capped("disk_gb", req.DiskGB, s.cfg.DiskGB, "limits.disk_gb"); err != nil {
		return o, nil, err
	}
	if o.TimeoutSeconds, err = capped("timeout_seconds", req.TimeoutSec, s.cfg.TimeoutSec, "limits.timeout_seconds"); err != nil {
		return o, nil, err
	}

	// The Dockerfile: inline text, or a path inside the context.
	var dockerfile []byte
	if req.Dockerfile != "" {
		o.InlineDockerfile = true
		o.DockerfilePath = "Dockerfile"
		dockerfile = []byte(req.Dockerfile)
		dir := u.dir + ".dockerfile"
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return o, nil, fmt.Errorf("store inline Dockerfile: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), dockerfile, 0o600); err != nil {
			return o, nil, fmt.Errorf("store inline Dockerfile: %w", err)
		}
	} else {
		rel := req.DockerfilePath
		if rel == "" {
			rel = "Dockerfile"
		}
		clean := path.Clean("/" + rel)[1:]
		if clean == "" || rel != clean && rel != "./"+clean || strings.HasPrefix(rel, "/") {
			return o, nil, badRequest("dockerfile_path %q must be a relative path inside the context, like \"Dockerfile\" or \"docker/app.Dockerfile\"", rel)
		}
		o.DockerfilePath = clean
		full := filepath.Join(u.dir, filepath.FromSlash(clean))
		fi, err := os.Lstat(full)
		if err != nil || !fi.Mode().IsRegular() {
			return o, nil, badRequest("no Dockerfile at %q in the build context: add it, pass dockerfile_path, or send the Dockerfile inline in the dockerfile field", clean)
		}
		if fi.Size() > 1<<20 {
			return o, nil, badRequest("Dockerfile %q is %d bytes; the limit is 1 MiB", clean, fi.Size())
		}
		if dockerfile, err = os.ReadFile(full); err != nil {
			return o, nil, fmt.Errorf("read Dockerfile: %w", err)
		}
	}
	if o.CacheMounts, err = checkDockerfile(dockerfile, req.Target); err != nil {
		return o, nil, err
	}
	if syntaxImage(dockerfile, req.BuildArgs) != "" {
		o.CacheMounts = true // another frontend may mount caches kiln cannot see
	}
	return o, dockerfile, nil
}

func capped(name string, asked int, c Caps, key string) (int, error) {
	if asked < 0 {
		return 0, badRequest("%s must not be negative", name)
	}
	if asked == 0 {
		return c.Default, nil
	}
	if c.Max > 0 && asked > c.Max {
		return 0, badRequest("%s=%d is over the cap of %d set by the operator (%s)", name, asked, c.Max, key)
	}
	return asked, nil
}

// checkDockerfile parses the Dockerfile with BuildKit's own parser, so a
// syntax error or an unknown target is a 400 with BuildKit's message. It
// also says whether the Dockerfile may use cache mounts, whose contents
// no input hash covers: true whenever it cannot tell (a # syntax=
// frontend may understand more than the built-in parser).
func checkDockerfile(dockerfile []byte, target string) (cacheMounts bool, err error) {
	res, err := parser.Parse(bytes.NewReader(dockerfile))
	if err != nil {
		return true, badRequest("Dockerfile: %v", err)
	}
	if _, _, _, usesSyntax := parser.DetectSyntax(dockerfile); usesSyntax {
		return true, nil // let BuildKit judge it
	}
	stages, _, err := instructions.Parse(res.AST, nil)
	if err != nil {
		return true, badRequest("Dockerfile: %v", err)
	}
	if len(stages) == 0 {
		return true, badRequest("Dockerfile has no FROM instruction")
	}
	cacheMounts = usesCacheMounts(stages)
	if target == "" {
		return cacheMounts, nil
	}
	var names []string
	for _, st := range stages {
		if strings.EqualFold(st.Name, target) {
			return cacheMounts, nil
		}
		if st.Name != "" {
			names = append(names, st.Name)
		}
	}
	if len(names) == 0 {
		return true, badRequest("target %s not found: the Dockerfile has no named stages (name one with FROM image AS name)", errdefs.Quote(target))
	}
	return true, badRequest("target %s not found: the Dockerfile's stages are %s", errdefs.Quote(target), strings.Join(names, ", "))
}

// usesCacheMounts reports RUN --mount=type=cache. BuildKit parses a
// mount's type only when its words are expanded, so expand them as they
// are; a mount that needs ARGs to be read counts as a cache mount.
func usesCacheMounts(stages []instructions.Stage) bool {
	for _, st := range stages {
		for _, cmd := range st.Commands {
			if run, ok := cmd.(*instructions.RunCommand); ok {
				if err := run.Expand(func(w string) (string, error) { return w, nil }); err != nil {
					return true
				}
				for _, m := range instructions.GetMounts(run) {
					if m.Type == instructions.MountTypeCache {
						return true
					}
				}
			}
		}
	}
	return false
}

// nameTags turns the names a build's result should get into
// repository:tag names in kiln's registry, checking p may give each (see
// access.Policy.Name): a tenant's one-component name lands in its
// namespace, another tenant's or kiln's own namespaces are refused.
func (s *Service) nameTags(ctx context.Context, p auth.Principal, tags []string) ([]string, error) {
	if len(tags) > MaxTags {
		return nil, badRequest("%d tags given; at most %d are allowed", len(tags), MaxTags)
	}
	var out []string
	seen := map[string]bool{}
	for _, t := range tags {
		repo, tag, err := s.policy.Name(ctx, p, t)
		if err != nil {
			return nil, err
		}
		if name := repo + ":" + tag; !seen[name] {
			seen[name] = true
			out = append(out, name)
		}
	}
	return out, nil
}

// submitDedup records a build answered by an earlier identical one.
func (s *Service) submitDedup(ctx context.Context, u *Upload, b Build, orig Build) (Build, error) {
	if err := s.answerFromDedup(ctx, &b, orig); err != nil {
		return Build{}, err
	}
	err := s.db.InTx(ctx, func(tx *sql.Tx) error {
		if err := store.CreateBuild(ctx, tx, &b); err != nil {
			return err
		}
		return putImages(ctx, tx, b, b.ImageDigest)
	})
	if err != nil {
		return Build{}, fmt.Errorf("record deduplicated build: %w", err)
	}
	s.Discard(u)
	s.metrics.submitted()
	s.dedupAnswered(b, orig)
	return b, nil
}

// receiveGitContext makes a git URL the build's context: the ref pinned
// to a commit (pinGit), and that commit's tree fetched by the server into
// the upload's directory, as BuildKit's git source would present it.
func (s *Service) receiveGitContext(ctx context.Context, u *Upload, req *Request) error {
	g, err := buildcontext.ParseGitContext(req.ContextURL)
	if err != nil {
		return badRequest("context_url: %v", err)
	}
	var o store.BuildOptions
	if err := s.validateNetwork(req, &o); err != nil {
		return err
	}
	info, pinned, err := s.fetchGit(ctx, g, u.dir, "context_url", &o)
	if err != nil {
		return err
	}
	u.context, u.source = &info, "git "+pinned.Remote+" at commit "+pinned.Commit+gitSubdirNote(pinned)
	return nil
}

// fetchGit pins g and fetches its tree into dir. Every remote the fetch
// reaches (submodules' too) must be a host the server may fetch from
// and, with allowed_domains, one of them.
func (s *Service) fetchGit(ctx context.Context, g buildcontext.GitContext, dir, field string, o *store.BuildOptions) (buildcontext.Info, buildcontext.GitContext, error) {
	allow := func(remote string) error {
		host := gitHostPort(remote)
		if !registryAllowed(host, s.cfg.URLContextsAllowed) {
			return forbidden("%s: this server does not fetch contexts from %s (context.url_allowed: %s); hosts on the server's own networks must be listed by host:port", field, host, strings.Join(s.cfg.URLContextsAllowed, ", "))
		}
		if err := s.checkFetch(hostName(host), field, o); err != nil {
			return err
		}
		if !egress.Listed(host, s.cfg.URLContextsAllowed) {
			// git dials by itself: its host is checked once, here.
			if err := egress.CheckPublic(ctx, hostName(host)); err != nil {
				return fmt.Errorf("%s: git host %s: %w", field, host, err)
			}
		}
		return nil
	}
	if err := allow(g.Remote); err != nil {
		return buildcontext.Info{}, g, err
	}
	pinned, err := s.pinGit(ctx, g, o, field)
	if err != nil {
		return buildcontext.Info{}, g, err
	}
	info, err := buildcontext.FetchGit(ctx, pinned, dir, s.cfg.Context, buildcontext.GitFetchOptions{AllowRemote: allow})
	if err != nil {
		return buildcontext.Info{}, g, err
	}
	return info, pinned, nil
}

// pinGit pins a git context's ref to a commit, with the host's git and a
// short timeout, so the input hash names exactly what the builder will
// fetch. The builder fetches over the network: an isolated build cannot
// have one, and with allowed_domains the repository's host must be among
// them.
func (s *Service) pinGit(ctx context.Context, g buildcontext.GitContext, o *store.BuildOptions, field string) (buildcontext.GitContext, error) {
	if o.Network == "isolated" {
		return g, badRequest("%s: a git context is fetched by the builder over the network, and an isolated build reaches nothing but kiln's registry; use network egress, or send the context as a tar", field)
	}
	if len(o.AllowedDomains) > 0 {
		host := gitHost(g.Remote)
		if !domainAllowed(host, o.AllowedDomains) {
			return g, badRequest("%s: the git host %s is not among allowed_domains (%s); add it", field, errdefs.Quote(host), strings.Join(o.AllowedDomains, ", "))
		}
	}
	pinned, err := buildcontext.ResolveGit(ctx, g, gitResolveTimeout)
	if err != nil {
		if ctx.Err() != nil {
			return g, ctx.Err()
		}
		return g, badRequest("%s: %v; check the URL and the ref, and that the kiln server can reach the repository", field, err)
	}
	return pinned, nil
}

// gitHostPort is the host[:port] of a git remote (https://host:8443/...,
// user@host:path).
func gitHostPort(remote string) string {
	if u, err := url.Parse(remote); err == nil && strings.Contains(remote, "://") && u.Host != "" {
		_, host, ok := strings.Cut(u.Host, "@")
		if !ok {
			host = u.Host
		}
		return host
	}
	return gitHost(remote)
}

// gitHost is the host of a git remote (https://host/..., user@host:path).
func gitHost(remote string) string {
	if i := strings.Index(remote, "://"); i >= 0 {
		rest := remote[i+3:]
		rest, _, _ = strings.Cut(rest, "/")
		if _, h, ok := strings.Cut(rest, "@"); ok {
			rest = h
		}
		if h, _, err := net.SplitHostPort(rest); err == nil {
			return h
		}
		return rest
	}
	_, rest, _ := strings.Cut(remote, "@")
	h, _, _ := strings.Cut(rest, ":")
	return h
}

// domainAllowed matches host against allowed_domains entries
// (example.com, *.example.com).
func domainAllowed(host string, allowed []string) bool {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	for _, a := range allowed {
		a = strings.ToLower(a)
		if suffix, ok := strings.CutPrefix(a, "*."); ok {
			if strings.HasSuffix(host, "."+suffix) {
				return true
			}
		} else if host == a {
			return true
		}
	}
	return false
}

func gitSubdirNote(g buildcontext.GitContext) string {
	note := ""
	if g.Ref != "" {
		note = " (" + g.Ref + ")"
	}
	if g.SubDir != "" {
		note += ", directory " + g.SubDir
	}
	return note
}

// contextBytes is what the client uploaded for the context.
func (u *Upload) contextBytes() int64 {
	if u.context == nil {
		return 0
	}
	return u.context.Bytes
}

// contextHash is the context's part of the input hash.
func (u *Upload) contextHash(store.BuildOptions) string { return u.context.Hash }

// validateNetwork applies the operator's network policy: the default
// mode, the allowed modes (403 for others) and a valid domain list.
func (s *Service) validateNetwork(req *Request, o *store.BuildOptions) error {
	mode := req.Network
	if mode == "" {
		mode = s.cfg.NetworkDefault
	}
	if mode == "" {
		mode = "egress"
	}
	if mode != "egress" && mode != "isolated" {
		return badRequest("network %s is unknown: use egress or isolated", errdefs.Quote(req.Network))
	}
	if len(s.cfg.NetworkAllowed) > 0 && !slices.Contains(s.cfg.NetworkAllowed, mode) {
		return forbidden("network mode %q is not allowed on this server (network.allowed is %s)", mode, strings.Join(s.cfg.NetworkAllowed, ", "))
	}
	if len(req.AllowedDomains) > 0 {
		if mode != "egress" {
			return badRequest("allowed_domains needs network egress: an isolated build reaches nothing but kiln's registry")
		}
		if _, err := egress.New(egress.Config{Allowed: req.AllowedDomains}); err != nil {
			return badRequest("allowed_domains: %v", err)
		}
	}
	if nc, ok := s.runtime.(runtime.NetworkChecker); ok {
		if err := nc.CheckNetwork(mode, req.AllowedDomains); err != nil {
			return badRequest("%v", err)
		}
	}
	o.Network, o.AllowedDomains = mode, req.AllowedDomains
	return nil
}

// entitlements are the insecure entitlements BuildKit knows.
var entitlements = []string{"network.host", "security.insecure"}

// validateEntitlements checks --allow against what BuildKit knows and
// what the operator allows (builds.entitlements).
func (s *Service) validateEntitlements(req *Request, o *store.BuildOptions) error {
	for _, e := range req.Allow {
		if !slices.Contains(entitlements, e) {
			return badRequest("allow %s is not an entitlement: use network.host or security.insecure", errdefs.Quote(e))
		}
		if !slices.Contains(s.cfg.Entitlements, e) {
			return forbidden("entitlement %s is not allowed on this server (builds.entitlements: %s); drop --allow %s, or ask the operator", e, orNone(s.cfg.Entitlements), e)
		}
		if e == "network.host" && (o.Network == "isolated" || len(o.AllowedDomains) > 0) {
			return badRequest("allow network.host would let RUN --network=host steps around the build's network policy (%s); drop one of them", networkNote(*o))
		}
		if !slices.Contains(o.Entitlements, e) {
			o.Entitlements = append(o.Entitlements, e)
		}
	}
	slices.Sort(o.Entitlements)
	return nil
}

func orNone(l []string) string {
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ", ")
}

func networkNote(o store.BuildOptions) string {
	if o.Network == "isolated" {
		return "network isolated"
	}
	return "allowed_domains " + strings.Join(o.AllowedDomains, ", ")
}

// contextKey is the build's solve.Request.ContextKey: one per cache scope
// and Dockerfile location, so the scope's next build of the same project
// gets BuildKit's incremental transfer and sends only the files that
// changed. That is safe because Receive gives every file an mtime made of
// its content (buildcontext.ContentTime): a changed file always differs
// in size or mtime, which is what BuildKit compares. The transfer's
// snapshot lives on the scope's volume, so it never crosses scopes.
// Builds without a scope, or on a scratch volume, transfer afresh.
func contextKey(scope string, o store.BuildOptions) string {
	if scope == "" || o.NoCache {
		return ""
	}
	h := sha256.New()
	fmt.Fprintf(h, "kiln-transfer-v2\n%q\n%q\n%t\n", scope, o.DockerfilePath, o.InlineDockerfile)
	return "kiln-" + hex.EncodeToString(h.Sum(nil)[:16])
}

// ulimitNames are the limits BuildKit's --ulimit takes.
var ulimitNames = []string{"core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"}

var ulimitPattern = regexp.MustCompile(`^([a-z]+)=(-1|[0-9]+)(?::(-1|[0-9]+))?$`)

// validateKnobs checks docker build's labels, annotations, hosts, shm and
// ulimits and records them in o.
func validateKnobs(req *Request, o *store.BuildOptions) error {
	total := 0
	for _, m := range []map[string]string{req.Labels, req.Annotations} {
		for k, v := range m {
			if k == "" || strings.ContainsAny(k, "\x00\n") {
				return badRequest("label and annotation keys must be non-empty single lines; got %s", errdefs.Quote(k))
			}
			total += len(k) + len(v)
		}
	}
	if total > maxArgBytes {
		return badRequest("labels and annotations total %d bytes, more than the %d byte limit", total, maxArgBytes)
	}
	for _, h := range req.AddHosts {
		// host=ip as BuildKit spells it, or host:ip as docker does (an
		// IPv6 ip keeps its colons).
		i := strings.LastIndex(h, "=")
		if i < 0 {
			i = strings.Index(h, ":")
		}
		var host, ip string
		if i > 0 {
			host, ip = h[:i], h[i+1:]
		}
		if _, err := netip.ParseAddr(ip); host == "" || strings.ContainsAny(host, " ,=:") || err != nil {
			return badRequest("add_host %s is not host:ip (e.g. db.internal:10.0.0.5)", errdefs.Quote(h))
		}
		o.AddHosts = append(o.AddHosts, host+"="+ip)
	}
	if req.ShmSize < 0 || req.ShmSize > 64<<30 {
		return badRequest("shm_size %d is out of range: give bytes between 0 and 64 GiB", req.ShmSize)
	}
	for _, u := range req.Ulimits {
		m := ulimitPattern.FindStringSubmatch(u)
		if m == nil || !slices.Contains(ulimitNames, m[1]) {
			return badRequest("ulimit %s is not name=soft[:hard] with a name among %s", errdefs.Quote(u), strings.Join(ulimitNames, ", "))
		}
	}
	o.Labels, o.Annotations, o.ShmSize, o.Ulimits = req.Labels, req.Annotations, req.ShmSize, req.Ulimits
	return nil
}
