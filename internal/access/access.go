// Package access holds kiln's tenancy rules: who may see and do what with
// builds, image names, registry repositories and cache volumes. The REST
// API, the registry's token endpoint and the build path all ask this one
// Policy, so no route can grow a rule of its own.
//
// The model (docs/architecture.md, "Tenancy"):
//
//   - A token acts for one tenant (auth.Principal.Tenant). A build:admin
//     token acts across tenants.
//   - A tenant owns its builds, their builds/<id> repositories and the
//     image namespace <tenant>/…; a one-component name such as myapp:1
//     given by a tenant means <tenant>/myapp:1. One-component names as
//     such belong to admins, so a single-team server used with the admin
//     token names images exactly as before.
//   - Operators mark namespaces shared (config tenancy.shared, default
//     base): every tenant pulls them, only admins write them.
//   - kiln manages three namespaces itself: mirror/ is written only by its
//     base-image mirror, builds/<id> only by build <id>, and cache/global/
//     only by builds of build:admin tokens. Everyone with a read scope
//     pulls mirror/ and cache/global/.
package access

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	"github.com/distribution/reference"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
)

// Action is what a principal wants to do with a repository.
type Action string

// The registry's actions.
const (
	Pull   Action = "pull"
	Push   Action = "push"
	Delete Action = "delete"
)

// The namespaces kiln manages itself.
const (
	BuildsNamespace   = "builds"
	CacheNamespace    = "cache"
	GlobalCachePrefix = "cache/global"
	MirrorNamespace   = "mirror"
)

// Class says whose a repository is.
type Class int

// The classes of repository.
const (
	ClassTenant      Class = iota // <tenant>/…: that tenant's
	ClassRoot                     // a one-component name: the admins'
	ClassShared                   // an operator-shared namespace: read by all, written by admins
	ClassBuild                    // builds/<id>: build <id>'s result
	ClassGlobalCache              // cache/global/<key>: the global cache tier
	ClassMirror                   // mirror/…: base images from other registries
	ClassReserved                 // anything else below builds/ or cache/: nobody's
)

// Namespace is a repository's class and, for tenant namespaces and build
// repositories, the tenant or build it belongs to.
type Namespace struct {
	Class Class
	Owner string
}

// BuildOwners tells which tenant a build belongs to and whether it is
// still queued or running; an unknown build is an error wrapping
// errdefs.ErrNotFound.
type BuildOwners interface {
	BuildOwner(ctx context.Context, id string) (tenant string, active bool, err error)
}

// Policy decides. It is safe for concurrent use.
type Policy struct {
	shared []string
	// trust maps a tenant to the group of tenants whose build results it
	// may be answered with (dedup); absent tenants trust only themselves.
	trust  map[string]string
	owners BuildOwners
	// own are the host:port forms of kiln's own registry, which names
	// may carry (the form FROM needs): 127.0.0.1:7070/app:1 is app:1.
	own []string
}

// Config is the operator's part of the rules.
type Config struct {
	// Shared are namespaces (first path components, like "base") every
	// tenant may pull from and only admins write.
	Shared []string
	// TrustGroups name groups of tenants that trust each other's build
	// results: a build of one may be answered by an identical build of
	// another (never for builds using cache mounts, whose contents the
	// input hash cannot see).
	TrustGroups map[string][]string
	// RegistryHost is kiln's registry as builds and clients name it
	// (host:port); a name may start with it. A loopback IP's host also
	// answers as localhost:port.
	RegistryHost string
}

// New checks cfg and returns the policy.
func New(cfg Config, owners BuildOwners) (*Policy, error) {
	p := &Policy{owners: owners, trust: map[string]string{}}
	if h := cfg.RegistryHost; h != "" {
		p.own = append(p.own, h)
		if host, port, err := net.SplitHostPort(h); err == nil {
			if ip, err := netip.ParseAddr(host); err == nil && ip.IsLoopback() {
				p.own = append(p.own, net.JoinHostPort("localhost", port))
			}
		}
	}
	for _, s := range cfg.Shared {
		if err := auth.ValidTenant(s); err != nil {
			return nil, fmt.Errorf("tenancy.shared: %w", err)
		}
		if kilnManaged(s) {
			return nil, fmt.Errorf("tenancy.shared: %q is managed by kiln itself; share another namespace", s)
		}
		p.shared = append(p.shared, s)
	}
	for group, members := range cfg.TrustGroups {
		for _, t := range members {
			if err := auth.ValidTenant(t); err != nil {
				return nil, fmt.Errorf("dedup.trust_groups %q: %w", group, err)
			}
			if other, ok := p.trust[t]; ok && other != group {
				return nil, fmt.Errorf("dedup.trust_groups: tenant %q is in both %q and %q; a tenant may be in one group", t, other, group)
			}
			p.trust[t] = group
		}
	}
	return p, nil
}

func kilnManaged(first string) bool {
	return first == BuildsNamespace || first == CacheNamespace || first == MirrorNamespace
}

var buildID = regexp.MustCompile(`^[a-z0-9]{1,64}$`)

// globalKey is the grammar of a global cache key (one path component).
var globalKey = regexp.MustCompile(`^[a-z0-9]+(?:[._-][a-z0-9]+)*$`)

// Classify says whose repo is, from its name alone.
func (p *Policy) Classify(repo string) Namespace {
	first, rest, nested := strings.Cut(repo, "/")
	switch {
	case first == MirrorNamespace && nested:
		return Namespace{Class: ClassMirror}
	case first == BuildsNamespace && nested && buildID.MatchString(rest):
		return Namespace{Class: ClassBuild, Owner: rest}
	case strings.HasPrefix(repo, GlobalCachePrefix+"/") && globalKey.MatchString(strings.TrimPrefix(repo, GlobalCachePrefix+"/")):
		return Namespace{Class: ClassGlobalCache}
	case kilnManaged(first):
		return Namespace{Class: ClassReserved}
	case slices.Contains(p.shared, first):
		return Namespace{Class: ClassShared}
	case !nested:
		return Namespace{Class: ClassRoot}
	}
	return Namespace{Class: ClassTenant, Owner: first}
}

// AdminTenant is the tenant of the admin token kiln writes at first start.
// No other token may act for it: its builds and cache are the admins'.
const AdminTenant = "admin"

// CheckTenant refuses tenant names that would collide with a namespace
// kiln or the operator reserved, or with the admin token's tenant.
func (p *Policy) CheckTenant(name string) error {
	if err := auth.ValidTenant(name); err != nil {
		return errdefs.Invalid("%v", err)
	}
	if kilnManaged(name) || name == AdminTenant || slices.Contains(p.shared, name) {
		return errdefs.Invalid("namespace %q is reserved (kiln's builds, cache and mirror, the admin token's admin, and the shared %s); pick another", name, strings.Join(p.shared, ", "))
	}
	return nil
}

func admin(pr auth.Principal) bool { return pr.Has(auth.ScopeBuildAdmin) }

// Repo decides whether pr may act on repository repo. A refusal wraps
// errdefs.ErrNotFound when pr may not even see the repository, so callers
// answer as if it did not exist, and errdefs.ErrForbidden otherwise.
func (p *Policy) Repo(ctx context.Context, pr auth.Principal, repo string, act Action) error {
	if _, err := reference.WithName(repo); err != nil {
		return errdefs.Invalid("repository name %s is invalid: %v", errdefs.Quote(repo), err)
	}
	switch act {
	case Pull:
		if !pr.Has(auth.ScopeImageRead) && !pr.Has(auth.ScopeBuildRead) {
			return errdefs.Forbidden("pulling %s needs the image:read or build:read scope, which your token does not have", repo)
		}
	case Push, Delete:
		if !pr.Has(auth.ScopeImageWrite) {
			return errdefs.Forbidden("%s on %s needs the image:write scope, which your token does not have", act, repo)
		}
	default:
		return errdefs.Invalid("unknown registry action %q", act)
	}
	if !pr.AccessAllows(repo, string(act)) {
		return errdefs.Forbidden("this token may %s only the repositories of its build, not %s", act, repo)
	}
	if pr.Build != "" {
		// A build's own token works while the build does, and no longer.
		_, active, err := p.owners.BuildOwner(ctx, pr.Build)
		if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return fmt.Errorf("look up build %s: %w", pr.Build, err)
		}
		if !active {
			return errdefs.Forbidden("build %s has ended; its registry token no longer works", pr.Build)
		}
	}
	return p.namespace(ctx, pr, repo, act)
}

// namespace applies the namespace rules, scopes aside.
func (p *Policy) namespace(ctx context.Context, pr auth.Principal, repo string, act Action) error {
	ns := p.Classify(repo)
	hidden := errdefs.NotFound("no repository %s that this token may see", repo)
	switch ns.Class {
	case ClassMirror:
		if act == Pull {
			return nil
		}
		return errdefs.Forbidden("%s holds base images every build trusts; only kiln's mirror writes it", repo)
	case ClassGlobalCache:
		switch {
		case act == Pull:
			return nil
		case act == Push && pr.Build != "" && admin(pr):
			return nil // a global_cache build of a build:admin token
		case act == Delete && pr.Build == "" && admin(pr):
			return nil
		}
		return errdefs.Forbidden("%s is the global cache tier: only builds of a build:admin token with global_cache=true write it", repo)
	case ClassReserved:
		if act == Pull && admin(pr) {
			return nil
		}
		return errdefs.Forbidden("%s is in kiln's reserved builds/ and cache/ namespaces; pick another repository", repo)
	case ClassBuild:
		return p.buildRepo(ctx, pr, repo, ns.Owner, act, hidden)
	case ClassShared:
		if act == Pull || admin(pr) {
			return nil
		}
		return errdefs.Forbidden("%s is in a shared namespace: every tenant reads it, only build:admin tokens write it", repo)
	case ClassRoot:
		switch {
		case admin(pr):
			return nil
		case act == Pull:
			return hidden
		}
		return errdefs.Forbidden("one-component names like %s belong to the server's admins; your images are named %s/…", repo, pr.Tenant)
	}
	// ClassTenant
	switch {
	case admin(pr) || pr.Tenant == ns.Owner:
		return nil
	case act == Pull:
		return hidden
	}
	return errdefs.Forbidden("%s is in namespace %s/, which is not yours: your images are named %s/… (a name without a namespace, like app:1, goes there)", repo, ns.Owner, pr.Tenant)
}

// buildRepo is the rule of builds/<id>: its tenant and admins read and
// delete it, only the build itself writes it.
func (p *Policy) buildRepo(ctx context.Context, pr auth.Principal, repo, id string, act Action, hidden error) error {
	visible := admin(pr) || pr.Build == id
	if !visible {
		owner, _, err := p.owners.BuildOwner(ctx, id)
		if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return fmt.Errorf("look up the owner of build %s: %w", id, err)
		}
		visible = err == nil && owner == pr.Tenant
	}
	switch {
	case !visible:
		return hidden
	case act == Pull, act == Delete && pr.Build == "":
		return nil
	case act == Push && pr.Build == id:
		return nil
	}
	return errdefs.Forbidden("%s holds build %s's result and is written only by that build", repo, id)
}

// GrantRegistry is the registry token endpoint's rule (an auth.GrantFunc):
// the part of requested that pr may have. Only admins without an access
// list may list the catalog, which names every tenant's repositories.
func (p *Policy) GrantRegistry(ctx context.Context, pr auth.Principal, requested []auth.RegistryAccess) []auth.RegistryAccess {
	var out []auth.RegistryAccess
	for _, r := range requested {
		var actions []string
		switch r.Type {
		case "registry":
			if r.Name == "catalog" && slices.Contains(r.Actions, "*") && admin(pr) && len(pr.Access) == 0 {
				actions = []string{"*"}
			}
		case "repository":
			for _, a := range auth.ExpandActions(r) {
				if p.Repo(ctx, pr, r.Name, Action(a)) == nil && !slices.Contains(actions, a) {
					actions = append(actions, a)
				}
			}
		}
		if len(actions) > 0 {
			out = auth.MergeAccess(out, auth.RegistryAccess{Type: r.Type, Name: r.Name, Actions: actions})
		}
	}
	return out
}

// SeeBuild reports whether pr may see and act on a build of tenant.
func (p *Policy) SeeBuild(pr auth.Principal, tenant string) bool {
	return admin(pr) || pr.Tenant == tenant
}

// SeeCacheScope reports whether pr may see a cache scope's volume: its
// own tenant's scopes, or every scope for an admin.
func (p *Policy) SeeCacheScope(pr auth.Principal, scope string) bool {
	return admin(pr) || auth.ScopeTenant(scope) == pr.Tenant
}

// TrustedTenants lists the tenants whose build results may answer a build
// of tenant: itself, and the rest of its trust group.
func (p *Policy) TrustedTenants(tenant string) []string {
	group, ok := p.trust[tenant]
	if !ok {
		return []string{tenant}
	}
	var out []string
	for t, g := range p.trust {
		if g == group {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return out
}

// OwnersFunc adapts a function to BuildOwners.
type OwnersFunc func(ctx context.Context, id string) (tenant string, active bool, err error)

// BuildOwner calls f.
func (f OwnersFunc) BuildOwner(ctx context.Context, id string) (string, bool, error) {
	return f(ctx, id)
}
