package auth

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/distribution/reference"
	"github.com/golang-jwt/jwt/v5"
)

// RegistryTokenTTL is how long a registry token lives (capped by the kiln
// token it was exchanged for). Clients fetch a new one on 401, so this only
// needs to outlast a single request.
const RegistryTokenTTL = 15 * time.Minute

// GlobalCachePrefix is the repository namespace of the global cache tier;
// pushing below it needs build:admin whatever else a token says.
const GlobalCachePrefix = "cache/global"

// MirrorPrefix is where kiln keeps base images mirrored from upstream
// registries. Builds trust what is there, so like the global cache only
// build:admin may push below it (kiln itself writes it through storage).
const MirrorPrefix = "mirror"

// RegistryAccess is one resource entry of a registry token's access claim,
// as in the Docker registry token specification.
type RegistryAccess struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

// String renders the entry in scope syntax, e.g. "repository:app:pull,push".
func (r RegistryAccess) String() string {
	return r.Type + ":" + r.Name + ":" + strings.Join(r.Actions, ",")
}

// RegistryToken is a signed registry token and what it grants.
type RegistryToken struct {
	Token     string
	Access    []RegistryAccess
	IssuedAt  time.Time
	ExpiresAt time.Time
}

// RegistryGrant is what a verified registry token allows.
type RegistryGrant struct {
	Subject   string
	Access    []RegistryAccess
	ExpiresAt time.Time
}

// Allows reports whether the grant covers action on the typed resource.
func (g RegistryGrant) Allows(typ, name, action string) bool {
	for _, a := range g.Access {
		if a.Type == typ && a.Name == name && (slices.Contains(a.Actions, action) || slices.Contains(a.Actions, "*")) {
			return true
		}
	}
	return false
}

// ParseRegistryScopes parses the scope parameters of a token request. Each
// parameter may hold several space-separated scopes of the form
// type[(class)]:name:action[,action...]; the name may itself contain colons
// (a registry host with a port). Repeated resources are merged.
func ParseRegistryScopes(params []string) ([]RegistryAccess, error) {
	var out []RegistryAccess
	for _, param := range params {
		for _, s := range strings.Fields(param) {
			typ, rest, ok := strings.Cut(s, ":")
			i := strings.LastIndex(rest, ":")
			if !ok || i <= 0 || typ == "" {
				return nil, fmt.Errorf("scope %q is malformed: want type:name:actions, e.g. repository:app:pull,push", s)
			}
			name, acts := rest[:i], rest[i+1:]
			if j := strings.IndexByte(typ, '('); j > 0 && strings.HasSuffix(typ, ")") {
				typ = typ[:j] // resource class, e.g. repository(plugin); kiln ignores it
			}
			var actions []string
			for _, a := range strings.Split(acts, ",") {
				if a != "" && !slices.Contains(actions, a) {
					actions = append(actions, a)
				}
			}
			if len(actions) == 0 {
				return nil, fmt.Errorf("scope %q names no actions", s)
			}
			out = mergeAccess(out, RegistryAccess{Type: typ, Name: name, Actions: actions})
		}
	}
	return out, nil
}

func mergeAccess(list []RegistryAccess, r RegistryAccess) []RegistryAccess {
	for i := range list {
		if list[i].Type == r.Type && list[i].Name == r.Name {
			for _, a := range r.Actions {
				if !slices.Contains(list[i].Actions, a) {
					list[i].Actions = append(list[i].Actions, a)
				}
			}
			return list
		}
	}
	return append(list, r)
}

// GrantRegistryAccess returns the part of requested that p may have; what is
// not granted is omitted, as the token specification asks.
//
// By scopes: image:read or build:read may pull any repository; image:write
// may also push, except below cache/global; build:admin may do everything,
// including delete and listing the catalog. A principal with an Access list
// gets the intersection of that list and its scopes, never more and never the
// catalog. Pushing below cache/global always needs build:admin.
func GrantRegistryAccess(p Principal, requested []RegistryAccess) []RegistryAccess {
	var out []RegistryAccess
	for _, r := range requested {
		var actions []string
		for _, a := range expandActions(r) {
			if registryAllowed(p, r.Type, r.Name, a) && !slices.Contains(actions, a) {
				actions = append(actions, a)
			}
		}
		if len(actions) > 0 {
			out = mergeAccess(out, RegistryAccess{Type: r.Type, Name: r.Name, Actions: actions})
		}
	}
	return out
}

// expandActions turns a repository "*" into its concrete actions, because
// the registry checks pull, push and delete individually.
func expandActions(r RegistryAccess) []string {
	if r.Type != "repository" || !slices.Contains(r.Actions, "*") {
		return r.Actions
	}
	return []string{"pull", "push", "delete"}
}

func registryAllowed(p Principal, typ, name, action string) bool {
	switch typ {
	case "registry":
		// The catalog names every tenant's repositories.
		return name == "catalog" && action == "*" && len(p.Access) == 0 && p.Has(ScopeBuildAdmin)
	case "repository":
	default:
		return false
	}
	if _, err := reference.WithName(name); err != nil {
		return false
	}
	var byScope bool
	switch action {
	case "pull":
		byScope = p.Has(ScopeImageRead) || p.Has(ScopeBuildRead)
	case "push":
		byScope = p.Has(ScopeImageWrite) && (!isProtected(name) || p.Has(ScopeBuildAdmin))
	case "delete":
		byScope = p.Has(ScopeBuildAdmin)
	}
	if !byScope {
		return false
	}
	if len(p.Access) == 0 {
		return true
	}
	for _, e := range p.Access {
		if matchRepo(e.Repository, name) && (slices.Contains(e.Actions, action) || slices.Contains(e.Actions, "*")) {
			return true
		}
	}
	return false
}

// isProtected reports repositories whose contents other builds trust:
// the global cache tier and the base-image mirror.
func isProtected(repo string) bool {
	for _, p := range []string{GlobalCachePrefix, MirrorPrefix} {
		if repo == p || strings.HasPrefix(repo, p+"/") {
			return true
		}
	}
	return false
}

type registryClaims struct {
	jwt.RegisteredClaims
	Access []RegistryAccess `json:"access"`
}

// IssueRegistryToken grants p what it may have of the requested scope
// parameters (see GrantRegistryAccess) and signs a registry token for
// service. A request for nothing, or for nothing grantable, still gets a
// token, with an empty access list, as the specification does for /v2/ login.
func (a *Authority) IssueRegistryToken(p Principal, service string, scopeParams []string) (RegistryToken, error) {
	if service == "" {
		return RegistryToken{}, fmt.Errorf("issue registry token for %q: no service given", p.Subject)
	}
	requested, err := ParseRegistryScopes(scopeParams)
	if err != nil {
		return RegistryToken{}, fmt.Errorf("issue registry token for %q: %w", p.Subject, err)
	}
	granted := GrantRegistryAccess(p, requested)
	if granted == nil {
		granted = []RegistryAccess{}
	}
	now := a.now()
	exp := now.Add(RegistryTokenTTL)
	if !p.ExpiresAt.IsZero() && p.ExpiresAt.Before(exp) {
		exp = p.ExpiresAt
	}
	if !exp.After(now) {
		return RegistryToken{}, fmt.Errorf("issue registry token for %q: %w: the kiln token has run out; create a new token with `kiln token create`", p.Subject, ErrExpired)
	}
	tok, err := a.sign(registryClaims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    Issuer,
			Subject:   p.Subject,
			Audience:  jwt.ClaimStrings{service},
			IssuedAt:  jwt.NewNumericDate(now),
			NotBefore: jwt.NewNumericDate(now),
			ExpiresAt: jwt.NewNumericDate(exp),
			ID:        newJTI(),
		},
		Access: granted,
	})
	if err != nil {
		return RegistryToken{}, fmt.Errorf("issue registry token for %q: %w", p.Subject, err)
	}
	return RegistryToken{Token: tok, Access: granted, IssuedAt: now, ExpiresAt: exp}, nil
}

// VerifyRegistryToken checks a registry token issued for service. Errors
// wrap ErrExpired or ErrInvalid; a kiln token is invalid here.
func (a *Authority) VerifyRegistryToken(token, service string) (RegistryGrant, error) {
	var c registryClaims
	if _, err := a.parse(token, &c, jwt.WithAudience(service)); err != nil {
		return RegistryGrant{}, err
	}
	if c.Subject == "" {
		return RegistryGrant{}, fmt.Errorf("%w: registry token has no subject", ErrInvalid)
	}
	return RegistryGrant{Subject: c.Subject, Access: c.Access, ExpiresAt: c.ExpiresAt.Time}, nil
}
