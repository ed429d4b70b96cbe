package mirror

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/registry"
)

// Config configures a Mirror.
type Config struct {
	// Registry is kiln's local store that mirrored images land in.
	Registry *registry.Registry
	// Credentials maps an upstream host as written in image references
	// ("docker.io", "ghcr.io", "registry.example.com:5000") to the
	// credentials kiln uses there. Server config key mirror.credentials.
	Credentials map[string]Credentials
	// Insecure lists upstream hosts spoken to over plain HTTP. Loopback
	// hosts (localhost, 127.0.0.0/8, ::1) always are.
	Insecure []string
	// Endpoints maps an upstream host to the base URL contacted instead,
	// e.g. a pull-through cache for Docker Hub: {"docker.io":
	// "https://mirror.example.com"}. Credentials stay keyed by the host.
	Endpoints map[string]string
	// Platforms lists the os/arch[/variant] children of a multi-platform
	// image that Ensure copies; default linux/<host arch>.
	Platforms []string
	// Logger receives one line per image mirrored; default slog.Default().
	Logger *slog.Logger
}

// Credentials for one upstream registry. They are kept in memory only and
// never appear in logs or errors.
type Credentials struct {
	// Username and Password are sent with HTTP Basic auth to the registry
	// or to its token endpoint. Access tokens such as Docker Hub or GitHub
	// personal access tokens go in Password, with the account's username.
	Username string `json:"username,omitempty" yaml:"username,omitempty" toml:"username,omitempty"`
	Password string `json:"password,omitempty" yaml:"password,omitempty" toml:"password,omitempty"`
	// Token is an identity token (Docker's "identitytoken", an OAuth2
	// refresh token as Azure Container Registry hands out), exchanged at
	// the registry's token endpoint instead of a username and password.
	Token string `json:"token,omitempty" yaml:"token,omitempty" toml:"token,omitempty"`
}

func (c Credentials) empty() bool { return c.Username == "" && c.Password == "" && c.Token == "" }

// Pinned is a base image reference resolved to a manifest digest.
type Pinned struct {
	// Upstream is the normalized reference as asked for, e.g.
	// docker.io/library/node:22 or registry.example.com/x@sha256:….
	Upstream string `json:"upstream"`
	// LocalRepo is the repository in kiln's registry the image is (or
	// will be) mirrored into, e.g. mirror/docker.io/library/node.
	LocalRepo string `json:"local_repo"`
	// Digest is the manifest (or index) digest the build uses.
	Digest string `json:"digest"`
	// FromUpstream is true when Digest was just read from the upstream
	// registry; Ensure then moves the local tag to it. A pin answered from
	// the local tag leaves that tag alone, so an old pin cannot move the
	// tag back after a pull moved it forward.
	FromUpstream bool `json:"from_upstream,omitempty"`
}

// LocalRef is the pinned image in kiln's registry reachable at
// registryHost (host:port as BuildKit reaches it).
func (p Pinned) LocalRef(registryHost string) string {
	return registryHost + "/" + p.LocalRepo + "@" + p.Digest
}

// ContextName is the name BuildKit's Dockerfile frontend (v0.34) looks up
// as frontend attribute "context:<name>" for a FROM naming this image:
// the familiar form without a ":latest" suffix ("node:22" for FROM node:22
// and FROM docker.io/library/node:22, "ghcr.io/org/img:tag" for that).
func (p Pinned) ContextName() string {
	named, err := reference.ParseNormalizedNamed(p.Upstream)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(reference.FamiliarString(named), ":latest")
}

// Errors callers can branch on; every error wrapping them also says what to
// do about it.
var (
	// ErrNotFound: the upstream registry has no such image (or tag).
	ErrNotFound = errdefs.Sentinel(errdefs.ErrUpstream, "image not found upstream")
	// ErrUnauthorized: the upstream registry refused access.
	ErrUnauthorized = errdefs.Sentinel(errdefs.ErrUpstream, "upstream registry refused access")
	// ErrDigestMismatch: upstream content did not match its digest.
	ErrDigestMismatch = registry.ErrDigestMismatch
)

// CredentialsConfigKey is the server configuration key that holds upstream
// credentials; errors about refused access point users at it.
const CredentialsConfigKey = "mirror.credentials"

// dockerHub is the host of Docker Hub references and the address its
// registry API is served at.
const (
	dockerHub         = "docker.io"
	dockerHubEndpoint = "https://registry-1.docker.io"
)

// localPrefix is the top-level repository namespace of mirrored images.
const localPrefix = "mirror"

// Mirror resolves and copies base images. It is safe for concurrent use.
type Mirror struct {
	store     *registry.Registry
	creds     map[string]Credentials
	insecure  map[string]bool
	endpoints map[string]string
	platforms []platform
	log       *slog.Logger
	client    *http.Client

	mu        sync.Mutex
	upstreams map[string]*upstream
	flights   map[string]*flight
}

// New validates cfg and returns a Mirror. It does no network I/O.
func New(cfg Config) (*Mirror, error) {
	if cfg.Registry == nil {
		return nil, errors.New("create mirror: no local registry configured")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	m := &Mirror{
		store:     cfg.Registry,
		creds:     map[string]Credentials{},
		insecure:  map[string]bool{},
		endpoints: map[string]string{},
		log:       cfg.Logger.With("component", "mirror"),
		upstreams: map[string]*upstream{},
		flights:   map[string]*flight{},
	}
	for host, c := range cfg.Credentials {
		h, err := normalizeHost(host)
		if err != nil {
			return nil, fmt.Errorf("create mirror: %s: %w", CredentialsConfigKey, err)
		}
		if c.Token != "" && (c.Username != "" || c.Password != "") {
			return nil, fmt.Errorf("create mirror: %s for %q: set either token or username and password, not both", CredentialsConfigKey, host)
		}
		if c.Token == "" && (c.Username == "") != (c.Password == "") {
			return nil, fmt.Errorf("create mirror: %s for %q: username and password must be set together", CredentialsConfigKey, host)
		}
		if !c.empty() {
			m.creds[h] = c
		}
	}
	for _, host := range cfg.Insecure {
		h, err := normalizeHost(host)
		if err != nil {
			return nil, fmt.Errorf("create mirror: insecure hosts: %w", err)
		}
		m.insecure[h] = true
	}
	for host, ep := range cfg.Endpoints {
		h, err := normalizeHost(host)
		if err != nil {
			return nil, fmt.Errorf("create mirror: endpoints: %w", err)
		}
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			return nil, fmt.Errorf("create mirror: endpoint %q for %s must be a base URL like https://mirror.example.com", ep, host)
		}
		m.endpoints[h] = u.Scheme + "://" + u.Host
	}
	plats := cfg.Platforms
	if len(plats) == 0 {
		plats = []string{"linux/" + runtime.GOARCH}
	}
	for _, s := range plats {
		p, err := parsePlatform(s)
		if err != nil {
			return nil, fmt.Errorf("create mirror: %w", err)
		}
		m.platforms = append(m.platforms, p)
	}

	tr := http.DefaultTransport.(*http.Transport).Clone()
	// A registry that accepts the connection but never answers must not
	// hold a build forever; the body of a big layer may take long, the
	// headers may not.
	tr.ResponseHeaderTimeout = time.Minute
	m.client = &http.Client{Transport: tr}
	return m, nil
}

// normalizeHost maps the spellings of a registry host to the one
// references use, so "index.docker.io" and "https://index.docker.io/v1/"
// (docker config.json keys) mean Docker Hub.
func normalizeHost(h string) (string, error) {
	orig := h
	if i := strings.Index(h, "://"); i >= 0 {
		h = h[i+3:]
	}
	h = strings.TrimSuffix(h, "/v1/")
	h = strings.TrimSuffix(h, "/")
	h = strings.ToLower(h)
	switch h {
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		h = dockerHub
	}
	if h == "" || strings.ContainsAny(h, "/ @") {
		return "", fmt.Errorf("%q is not a registry host (want host or host:port, e.g. ghcr.io or registry.example.com:5000)", orig)
	}
	return h, nil
}

// image is a parsed base image reference.
type image struct {
	named  reference.Named // normalized, with a tag if it had no digest
	host   string          // lowercase reference domain, docker.io for Hub
	path   string          // repository path at the host, library/node
	tag    string          // "" when the reference has only a digest
	digest digest.Digest   // "" unless the reference carries one
	local  string          // mirror/<host>/<path>
}

// parseImage normalizes ref the way Docker and BuildKit do: node:22 is
// docker.io/library/node:22, a bare name means :latest.
func parseImage(ref string) (image, error) {
	named, err := reference.ParseNormalizedNamed(strings.TrimSpace(ref))
	if err != nil {
		return image{}, fmt.Errorf("image reference %q is invalid: %w (want e.g. node:22, ghcr.io/org/img:tag or host/repo@sha256:…)", ref, err)
	}
	img := image{
		host: strings.ToLower(reference.Domain(named)),
		path: reference.Path(named),
	}
	if d, ok := named.(reference.Digested); ok {
		img.digest = d.Digest()
	}
	if t, ok := named.(reference.Tagged); ok {
		img.tag = t.Tag()
	}
	if img.digest == "" {
		named = reference.TagNameOnly(named)
		img.tag = named.(reference.Tagged).Tag()
	}
	img.named = named
	local, err := localRepo(img.host, img.path)
	if err != nil {
		return image{}, fmt.Errorf("image reference %q: %w", ref, err)
	}
	img.local = local
	return img, nil
}

// localRepo names the repository a mirrored image lives in. A repository
// path component cannot hold ':' but a host name cannot hold '_', so
// mapping the port separator to '_' keeps distinct hosts distinct.
func localRepo(host, path string) (string, error) {
	if strings.ContainsAny(host, "[]") {
		return "", fmt.Errorf("registry host %s: IPv6 literal hosts cannot be mirrored; use a DNS name", host)
	}
	name := localPrefix + "/" + strings.ReplaceAll(host, ":", "_") + "/" + path
	if _, err := reference.WithName(name); err != nil {
		return "", fmt.Errorf("cannot name a local mirror repository for %s/%s (%s): %w", host, path, name, err)
	}
	return name, nil
}

// Resolve pins ref to a manifest digest. A digest in ref is the pin. Else,
// unless pull is set, a tag mirrored before answers from the local store
// without network; otherwise the upstream registry is asked for the digest
// the tag points at now.
func (m *Mirror) Resolve(ctx context.Context, ref string, pull bool) (Pinned, error) {
	img, err := parseImage(ref)
	if err != nil {
		return Pinned{}, err
	}
	p := Pinned{Upstream: img.named.String(), LocalRepo: img.local}
	if img.digest != "" {
		p.Digest = img.digest.String()
		return p, nil
	}
	if !pull {
		d, err := m.store.Resolve(ctx, img.local, img.tag)
		if err == nil {
			p.Digest = d
			return p, nil
		}
		if !errors.Is(err, registry.ErrNotFound) {
			return Pinned{}, fmt.Errorf("resolve %s from the local mirror: %w", p.Upstream, err)
		}
	}
	d, err := m.upstream(img.host).resolveTag(ctx, img.path, img.tag)
	if err != nil {
		return Pinned{}, fmt.Errorf("resolve %s: %w", p.Upstream, err)
	}
	p.Digest = d.String()
	p.FromUpstream = true
	return p, nil
}

// upstream returns the client state for host, creating it on first use so
// tokens are cached across resolves.
func (m *Mirror) upstream(host string) *upstream {
	m.mu.Lock()
	defer m.mu.Unlock()
	if u, ok := m.upstreams[host]; ok {
		return u
	}
	base, ok := m.endpoints[host]
	if !ok {
		scheme := "https"
		if m.insecure[host] || isLoopback(host) {
			scheme = "http"
		}
		if host == dockerHub {
			base = dockerHubEndpoint
		} else {
			base = scheme + "://" + host
		}
	}
	u := &upstream{
		host:   host,
		base:   base,
		client: m.client,
		tokens: map[string]cachedToken{},
	}
	if c, ok := m.creds[host]; ok {
		u.creds = &c
	}
	m.upstreams[host] = u
	return u
}

// isLoopback reports whether host (optionally with a port) names this
// machine, where plain HTTP is the norm for test and sidecar registries.
func isLoopback(host string) bool {
	h := host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		h = hh
	}
	h = strings.Trim(h, "[]")
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}
