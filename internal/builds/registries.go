package builds

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/distribution/reference"
	"golang.org/x/crypto/ssh/agent"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/store"
)

// Registries other than kiln's. A build's result always lands in kiln's
// registry; with push it also goes to names on other registries, and it
// may import and export registry caches in kiln's registry or another.
// The builder reaches other registries itself, with credentials the
// submitter sent for this build alone (held in memory, like secrets),
// and only as the operator (registries.allowed) and the build's network
// policy allow.

const (
	// maxCacheFrom bounds the registry caches one build imports.
	maxCacheFrom = 8
	// maxRegistryAuth bounds the registries one build sends credentials
	// for.
	maxRegistryAuth = 32
)

// attachment is what a build holds only in memory: its secrets, its
// credentials for other registries and its ssh key files. None is
// written anywhere.
type attachment struct {
	secrets      map[string][]byte
	registryAuth map[string]solve.Credentials
	// sshRings serve the key files of --ssh ID=KEYFILE, by id, parsed.
	sshRings map[string]agent.Agent
}

// registries validates the build's names and caches on registries and
// records them in o: kiln's own names are returned for nameTags; names on
// other registries need req.Push. Credentials are kept only for the
// other registries the build reaches.
func (s *Service) registries(ctx context.Context, p auth.Principal, req *Request, o *store.BuildOptions) (kilnTags []string, creds map[string]solve.Credentials, err error) {
	external := map[string]string{} // host → what names it, for errors
	for _, t := range req.Tags {
		host, ok := s.policy.ExternalHost(t)
		if !ok {
			kilnTags = append(kilnTags, t)
			continue
		}
		if !req.Push {
			return nil, nil, badRequest("image name %s is on registry %s, not in this kiln's: add --push (field push=true) to push the result there too, or name it in kiln's registry (repository[:tag])", errdefs.Quote(t), host)
		}
		ref, err := externalRef(t, "image name")
		if err != nil {
			return nil, nil, err
		}
		if !slices.Contains(o.ExternalPush, ref) {
			o.ExternalPush = append(o.ExternalPush, ref)
		}
		external[host] = "image name " + t
	}
	if len(o.ExternalPush)+len(kilnTags) > MaxTags {
		return nil, nil, badRequest("%d tags given; at most %d are allowed", len(o.ExternalPush)+len(kilnTags), MaxTags)
	}

	if len(req.CacheFrom) > maxCacheFrom {
		return nil, nil, badRequest("%d cache_from entries; at most %d", len(req.CacheFrom), maxCacheFrom)
	}
	for _, spec := range req.CacheFrom {
		c, host, err := s.cacheRef(ctx, p, spec, false)
		if err != nil {
			return nil, nil, err
		}
		o.CacheFrom = append(o.CacheFrom, c)
		if host != "" {
			external[host] = "cache_from " + spec
		}
	}
	switch len(req.CacheTo) {
	case 0:
	case 1:
		c, host, err := s.cacheRef(ctx, p, req.CacheTo[0], true)
		if err != nil {
			return nil, nil, err
		}
		o.CacheTo = &c
		if host != "" {
			external[host] = "cache_to " + req.CacheTo[0]
		}
	default:
		return nil, nil, badRequest("%d cache_to entries; a build exports one registry cache", len(req.CacheTo))
	}

	// Images named contexts take from other registries are pulled with
	// the submitter's credentials too (namedSource checks them again).
	for _, kv := range req.BuildContexts {
		_, src, _ := strings.Cut(kv, "=")
		if ref, ok := strings.CutPrefix(src, "docker-image://"); ok {
			if host, ok := s.policy.ExternalHost(ref); ok {
				external[host] = "build context " + kv
			}
		}
	}
	for host, what := range external {
		if err := s.checkExternal(host, what, o); err != nil {
			return nil, nil, err
		}
	}
	if len(req.RegistryAuth) > maxRegistryAuth {
		return nil, nil, badRequest("credentials for %d registries; at most %d", len(req.RegistryAuth), maxRegistryAuth)
	}
	// Credentials for registries the build never reaches are dropped
	// here rather than held: the server keeps no secret it does not need.
	for host, c := range req.RegistryAuth {
		if _, ok := external[host]; !ok {
			continue
		}
		if c.Password == "" {
			return nil, nil, badRequest("registry_auth for %s has no password or token", host)
		}
		if creds == nil {
			creds = map[string]solve.Credentials{}
		}
		creds[host] = c
		o.RegistryAuthHosts = append(o.RegistryAuthHosts, host)
	}
	slices.Sort(o.RegistryAuthHosts)
	return kilnTags, creds, nil
}

// externalRef is the full reference a name on another registry means,
// with :latest when it has no tag.
func externalRef(name, what string) (string, error) {
	named, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return "", badRequest("%s %s is invalid (%v): use host[:port]/repository[:tag]", what, errdefs.Quote(name), err)
	}
	if _, ok := named.(reference.Digested); ok {
		return "", badRequest("%s %s has a digest; a pushed name is host/repository[:tag]", what, errdefs.Quote(name))
	}
	return reference.TagNameOnly(named).String(), nil
}

// cacheRef parses a --cache-from or --cache-to value as buildx takes it
// (type=registry,ref=REF[,mode=min|max], or REF alone) and resolves REF:
// a name in kiln's registry lands in the tenant's namespace like -t and
// must be one the tenant may write (export) or read (import); a name on
// another registry comes back with its host.
func (s *Service) cacheRef(ctx context.Context, p auth.Principal, spec string, export bool) (c store.CacheRef, externalHost string, err error) {
	field := "cache_from"
	if export {
		field = "cache_to"
	}
	ref, typ := spec, "registry"
	if strings.Contains(spec, "=") {
		ref = ""
		for _, kv := range strings.Split(spec, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return c, "", badRequest("%s %s: %q is not key=value", field, errdefs.Quote(spec), kv)
			}
			switch k {
			case "type":
				typ = v
			case "ref":
				ref = v
			case "mode":
				if !export {
					return c, "", badRequest("%s %s: mode is for cache_to", field, errdefs.Quote(spec))
				}
				if v != "min" && v != "max" {
					return c, "", badRequest("%s %s: mode %s is unknown: use min or max", field, errdefs.Quote(spec), errdefs.Quote(v))
				}
				c.Mode = v
			default:
				return c, "", badRequest("%s %s: key %s is not supported: kiln takes type=registry, ref and (for cache_to) mode", field, errdefs.Quote(spec), errdefs.Quote(k))
			}
		}
	}
	switch typ {
	case "registry":
	case "inline":
		return c, "", badRequest("%s %s: inline cache is not supported; kiln keeps every build's cache on its scope's volume, and type=registry,ref=NAME shares it through a registry", field, errdefs.Quote(spec))
	default:
		return c, "", badRequest("%s %s: cache type %s is not supported on a kiln server, which keeps each scope's cache on its own volume; use type=registry,ref=NAME to share a cache through a registry", field, errdefs.Quote(spec), errdefs.Quote(typ))
	}
	if ref == "" {
		return c, "", badRequest("%s %s: no ref: give type=registry,ref=NAME", field, errdefs.Quote(spec))
	}
	if export && c.Mode == "" {
		c.Mode = "min" // buildx's default
	}
	if host, ok := s.policy.ExternalHost(ref); ok {
		if c.Ref, err = externalRef(ref, field); err != nil {
			return c, "", err
		}
		return c, host, nil
	}
	var repo, tag string
	if export {
		repo, tag, err = s.policy.Name(ctx, p, ref)
	} else {
		if repo, tag, err = s.policy.Resolve(p, ref); err == nil {
			err = s.policy.CanPull(ctx, p, repo)
		}
	}
	if err != nil {
		return c, "", err
	}
	c.Ref, c.KilnRepo = s.cfg.RegistryHost+"/"+repo+":"+tag, repo
	return c, "", nil
}

// checkExternal applies the operator's list of registries builds may
// reach and the build's network policy to one registry host: the builder
// reaches it over the network, as it would a git context.
func (s *Service) checkExternal(host, what string, o *store.BuildOptions) error {
	if !registryAllowed(host, s.cfg.ExternalRegistries) {
		allowed := strings.Join(s.cfg.ExternalRegistries, ", ")
		if allowed == "" {
			allowed = "none"
		}
		hint := "ask the operator, or use kiln's registry"
		if localHost(hostName(host)) {
			hint = "a registry on the server's own networks (localhost, loopback or private IPs) must be listed by host:port, never matched by a wildcard; ask the operator"
		}
		return forbidden("%s: builds on this server may not reach registry %s (registries.allowed: %s); %s", what, host, allowed, hint)
	}
	if o.Network == "isolated" {
		return badRequest("%s: the builder reaches registry %s over the network, and an isolated build reaches nothing but kiln's registry; use network egress", what, host)
	}
	if len(o.AllowedDomains) > 0 {
		name := hostName(host)
		if !domainAllowed(name, o.AllowedDomains) {
			return badRequest("%s: registry host %s is not among allowed_domains (%s); add it", what, errdefs.Quote(name), strings.Join(o.AllowedDomains, ", "))
		}
	}
	return nil
}

// registryAllowed matches a registry host[:port] against registries.allowed
// entries: "*", host, host:port, *.domain. Wildcards never match a host on
// the server's own networks (localhost, loopback, private and link-local
// IPs): the builder dials from the server, so reaching one of those needs
// an entry of its own.
func registryAllowed(host string, allowed []string) bool {
	host = strings.ToLower(host)
	local := localHost(hostName(host))
	for _, a := range allowed {
		a = strings.ToLower(strings.TrimSpace(a))
		switch {
		case a == host || a == hostName(host) && !local:
			return true
		case local:
		case a == "*":
			return true
		case !strings.Contains(a, ":") && strings.HasPrefix(a, "*.") && domainAllowed(hostName(host), []string{a}):
			return true
		}
	}
	return false
}

// localHost reports a name or IP on the server's own networks.
func localHost(name string) bool {
	if name == "localhost" || strings.HasSuffix(name, ".localhost") {
		return true
	}
	ip, err := netip.ParseAddr(strings.Trim(name, "[]"))
	return err == nil && (ip.IsLoopback() || ip.IsPrivate() || ip.IsLinkLocalUnicast() || ip.IsUnspecified())
}

// hostName is host without its port.
func hostName(host string) string {
	if h, _, err := net.SplitHostPort(host); err == nil {
		return h
	}
	return host
}

// plainHTTP reports whether the builder reaches registry host over plain
// HTTP: loopback registries always (as the mirror does), others when the
// operator listed them in registries.insecure.
func (s *Service) plainHTTP(host string) bool {
	name := hostName(host)
	if name == "localhost" {
		return true
	}
	if ip, err := netip.ParseAddr(name); err == nil && ip.IsLoopback() {
		return true
	}
	return slices.Contains(s.cfg.InsecureRegistries, host)
}
