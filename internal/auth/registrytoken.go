package auth

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// RegistryTokenTTL is how long a registry token lives (capped by the kiln
// token it was exchanged for). Clients fetch a new one on 401, so this only
// needs to outlast a single request.
const RegistryTokenTTL = 15 * time.Minute

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

// GrantFunc decides what part of the requested registry access p may
// have; what is not granted is left out, as the token specification asks.
// kiln's rules live in internal/access.
type GrantFunc func(ctx context.Context, p Principal, requested []RegistryAccess) []RegistryAccess

// AccessAllows reports whether p's Access list, if it has one, covers
// action on repo. A principal without a list is not narrowed.
func (p Principal) AccessAllows(repo, action string) bool {
	if len(p.Access) == 0 {
		return true
	}
	for _, e := range p.Access {
		if matchRepo(e.Repository, repo) && (slices.Contains(e.Actions, action) || slices.Contains(e.Actions, "*")) {
			return true
		}
	}
	return false
}

// ExpandActions turns a repository "*" into its concrete actions, because
// the registry checks pull, push and delete individually.
func ExpandActions(r RegistryAccess) []string {
	if r.Type != "repository" || !slices.Contains(r.Actions, "*") {
		return r.Actions
	}
	return []string{"pull", "push", "delete"}
}

// MergeAccess adds r to list, merging the actions of a resource already
// there.
func MergeAccess(list []RegistryAccess, r RegistryAccess) []RegistryAccess {
	return mergeAccess(list, r)
}

// registryClaims is a registry token's payload. Parent is the id of the
// kiln token it was exchanged for, so revoking that token also stops the
// registry tokens it begot, on their next request.
type registryClaims struct {
	jwt.RegisteredClaims
	Access []RegistryAccess `json:"access"`
	Parent string           `json:"kiln_token,omitempty"`
}

// IssueRegistryToken signs a registry token for service granting p the
// given access (decided by the caller, see GrantFunc). Granting nothing
// still gets a token, with an empty access list, as the specification
// does for /v2/ login.
func (a *Authority) IssueRegistryToken(p Principal, service string, granted []RegistryAccess) (RegistryToken, error) {
	if service == "" {
		return RegistryToken{}, fmt.Errorf("issue registry token for %q: no service given", p.Subject)
	}
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
		Parent: p.TokenID,
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
	if err := a.checkRevoked(c.Parent); err != nil {
		return RegistryGrant{}, err
	}
	return RegistryGrant{Subject: c.Subject, Access: c.Access, ExpiresAt: c.ExpiresAt.Time}, nil
}
