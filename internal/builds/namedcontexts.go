package builds

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/distribution/reference"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/store"
)

// Named contexts (docker buildx build --build-context NAME=SOURCE) replace
// what a Dockerfile names — FROM NAME, COPY --from=NAME — with a directory
// the client uploads, an image, a git repository or an HTTP(S) URL. Each
// is pinned at submission where it can be (a directory by its content
// hash, an image in kiln's registry by digest, a git ref by commit), so the
// input hash still says what the build sees; an image on another registry
// by tag cannot be, and such a build never deduplicates. URLs are
// downloaded by the server and become directories (see urlcontext.go).

var digestPattern = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)

// maxNamedContexts bounds the named contexts of one build.
const maxNamedContexts = 16

// namedUpload is a named context directory received with the submission.
type namedUpload struct {
	name string
	dir  string
	info buildcontext.Info
}

// namedDir is where an upload's index'th named context directory goes.
func namedDir(contextDir string, index int) string {
	return filepath.Join(contextDir+".named", strconv.Itoa(index))
}

// ReceiveNamedContext streams a named context directory (a tar, as the
// main context) into the upload. On error nothing of it is left behind.
func (s *Service) ReceiveNamedContext(ctx context.Context, u *Upload, name string, r io.Reader) error {
	name, err := contextName(name)
	if err != nil {
		return err
	}
	if len(u.named) >= maxNamedContexts {
		return badRequest("more than %d named contexts", maxNamedContexts)
	}
	for _, n := range u.named {
		if n.name == name {
			return badRequest("named context %s is sent twice", errdefs.Quote(name))
		}
	}
	dir, err := u.nextNamedDir()
	if err != nil {
		return err
	}
	info, err := buildcontext.Receive(ctx, r, dir, s.cfg.Context)
	if err != nil {
		return err
	}
	u.addNamed(name, dir, info)
	return nil
}

// nextNamedDir is where the upload's next named context directory goes
// (uploaded, or fetched from git or a URL).
func (u *Upload) nextNamedDir() (string, error) {
	if err := os.MkdirAll(u.dir+".named", 0o700); err != nil {
		return "", fmt.Errorf("store named context: %w", err)
	}
	return namedDir(u.dir, len(u.named)), nil
}

// addNamed records the named context received into dir, the one
// nextNamedDir gave, and returns its entry.
func (u *Upload) addNamed(name, dir string, info buildcontext.Info) store.NamedContext {
	u.named = append(u.named, namedUpload{name: name, dir: dir, info: info})
	return namedEntry(len(u.named)-1, u.named[len(u.named)-1])
}

// namedEntry is the build's record of its index'th named directory.
func namedEntry(index int, n namedUpload) store.NamedContext {
	return store.NamedContext{Name: n.name, Kind: store.NamedLocal, Source: strconv.Itoa(index), Hash: n.info.Hash}
}

// contextName is a named context's name as BuildKit's Dockerfile frontend
// looks it up: the familiar image reference without ":latest" (FROM
// node:22 and FROM docker.io/library/node:22 both look up "node:22").
func contextName(name string) (string, error) {
	if name == "" || len(name) > 256 {
		return "", badRequest("named context name %s must be 1 to 256 characters", errdefs.Quote(name))
	}
	named, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return "", badRequest("named context name %s is not what a FROM or COPY --from can name (%v): use a stage or image name like base or node:22", errdefs.Quote(name), err)
	}
	return strings.TrimSuffix(reference.FamiliarString(named), ":latest"), nil
}

// namedContexts resolves the build's named contexts: the uploaded
// directories and the NAME=SOURCE fields, each pinned where it can be.
func (s *Service) namedContexts(ctx context.Context, p auth.Principal, u *Upload, req *Request, o *store.BuildOptions) error {
	seen := map[string]bool{}
	for i, n := range u.named {
		seen[n.name] = true
		o.NamedContexts = append(o.NamedContexts, namedEntry(i, n))
	}
	if len(u.named)+len(req.BuildContexts) > maxNamedContexts {
		return badRequest("%d named contexts; at most %d", len(u.named)+len(req.BuildContexts), maxNamedContexts)
	}
	for _, kv := range req.BuildContexts {
		raw, src, ok := strings.Cut(kv, "=")
		if !ok || src == "" {
			return badRequest("build_contexts %s is not NAME=SOURCE (docker-image://REF, a git URL or an http(s):// URL; a directory is sent as a named_context part)", errdefs.Quote(kv))
		}
		name, err := contextName(raw)
		if err != nil {
			return err
		}
		if seen[name] {
			return badRequest("named context %s is given twice", errdefs.Quote(name))
		}
		seen[name] = true
		nc, err := s.namedSource(ctx, p, u, name, src, o)
		if err != nil {
			return err
		}
		o.NamedContexts = append(o.NamedContexts, nc)
	}
	slices.SortFunc(o.NamedContexts, func(a, b store.NamedContext) int { return strings.Compare(a.Name, b.Name) })
	return nil
}

// namedSource pins one NAME=SOURCE named context.
func (s *Service) namedSource(ctx context.Context, p auth.Principal, u *Upload, name, src string, o *store.BuildOptions) (store.NamedContext, error) {
	field := "build context " + name
	nc := store.NamedContext{Name: name}
	switch {
	case strings.HasPrefix(src, "docker-image://"):
		ref := strings.TrimPrefix(src, "docker-image://")
		nc.Kind = store.NamedImage
		if host, ok := s.policy.ExternalHost(ref); ok {
			named, err := reference.ParseNormalizedNamed(ref)
			if err != nil {
				return nc, badRequest("%s: image %s is invalid: %v", field, errdefs.Quote(ref), err)
			}
			if err := s.checkExternal(host, field, o); err != nil {
				return nc, err
			}
			nc.Source = "docker-image://" + reference.TagNameOnly(named).String()
			if d, ok := named.(reference.Digested); ok {
				nc.Hash = d.Digest().String() // pinned by the user
			}
			return nc, nil
		}
		// kiln's registry: resolved like a tag, read as the tenant, and
		// pinned to the digest the name has now.
		repo, tag, digest, err := s.resolveKilnImage(ctx, p, ref)
		if err != nil {
			return nc, badRequest("%s: %v", field, err)
		}
		if digest == "" {
			d, err := s.reg.Resolve(ctx, repo, tag)
			if err != nil {
				return nc, badRequest("%s: image %s is not in kiln's registry (%v); push it first, or name an image on another registry by its host", field, errdefs.Quote(ref), err)
			}
			digest = d
		}
		nc.Source = "docker-image://" + s.cfg.RegistryHost + "/" + repo + "@" + digest
		nc.Hash = digest
		return nc, nil
	case strings.HasPrefix(src, "oci-layout://"):
		return nc, badRequest("%s: an oci-layout:// context lives on the client, which a kiln server cannot read; push the image to kiln's registry and use docker-image://NAME", field)
	case strings.HasPrefix(src, "target:") || strings.HasPrefix(src, "input:"):
		return nc, badRequest("%s: %s contexts are for buildx bake; kiln build takes docker-image://, git and https:// sources and directories", field, errdefs.Quote(strings.SplitN(src, ":", 2)[0]))
	}
	if looksLikeGit(src) {
		g, err := buildcontext.ParseGitContext(src)
		if err != nil {
			return nc, badRequest("%s: %v", field, err)
		}
		dir, err := u.nextNamedDir()
		if err != nil {
			return nc, err
		}
		info, _, err := s.fetchGit(ctx, g, dir, field, o)
		if err != nil {
			return nc, err
		}
		return u.addNamed(name, dir, info), nil
	}
	if strings.HasPrefix(src, "https://") || strings.HasPrefix(src, "http://") {
		// Downloaded here, like an http(s) main context.
		return s.namedURL(ctx, u, name, src, o)
	}
	return nc, badRequest("%s: source %s is not docker-image://REF, a git URL or an http(s):// URL; a directory is sent by kiln build as a named_context part", field, errdefs.Quote(src))
}

// looksLikeGit tells a git URL from another http(s) URL as buildx does:
// a .git suffix (before any #fragment), a git@ or ssh/git scheme.
func looksLikeGit(src string) bool {
	base, _, _ := strings.Cut(src, "#")
	return strings.HasSuffix(base, ".git") || strings.HasPrefix(src, "git@") ||
		strings.HasPrefix(src, "ssh://") || strings.HasPrefix(src, "git://") || strings.HasPrefix(src, "github.com/")
}

// resolveKilnImage reads an image reference in kiln's registry as a tag
// is read (a tenant's one-component name is in its namespace), checks the
// tenant may pull it, and returns a digest when the reference has one.
func (s *Service) resolveKilnImage(ctx context.Context, p auth.Principal, ref string) (repo, tag, digest string, err error) {
	name, dgst, _ := strings.Cut(ref, "@")
	if dgst != "" && !digestPattern.MatchString(dgst) {
		return "", "", "", errdefs.Invalid("image %s: %s is not a sha256 digest", errdefs.Quote(ref), errdefs.Quote(dgst))
	}
	if repo, tag, err = s.policy.Resolve(p, name); err != nil {
		return "", "", "", err
	}
	if err := s.policy.CanPull(ctx, p, repo); err != nil {
		return "", "", "", err
	}
	return repo, tag, dgst, nil
}

// checkFetch applies the build's network policy to a host the builder
// fetches a source from.
func (s *Service) checkFetch(host, what string, o *store.BuildOptions) error {
	if o.Network == "isolated" {
		return badRequest("%s: the builder fetches it over the network, and an isolated build reaches nothing but kiln's registry; use network egress", what)
	}
	if len(o.AllowedDomains) > 0 && !domainAllowed(host, o.AllowedDomains) {
		return badRequest("%s: host %s is not among allowed_domains (%s); add it", what, errdefs.Quote(host), strings.Join(o.AllowedDomains, ", "))
	}
	return nil
}

// namedContextsPinned reports whether every named context is pinned, so
// the input hash can cover them.
func namedContextsPinned(o store.BuildOptions) bool {
	for _, n := range o.NamedContexts {
		if n.Hash == "" {
			return false
		}
	}
	return true
}

// userContextNames are the names the build's own named contexts take,
// which base pinning leaves to them.
func userContextNames(o store.BuildOptions) map[string]bool {
	m := map[string]bool{}
	for _, n := range o.NamedContexts {
		m[n.Name] = true
	}
	return m
}
