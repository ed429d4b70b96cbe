// Package tokens keeps the lifecycle of the kiln tokens people use: it
// issues them within the server's maximum lifetime, remembers what each
// says (never the token itself), lists them and revokes them. The set of
// revoked ids is held in memory, because every request asks it.
package tokens

import (
	"context"
	"errors"
	"regexp"
	"sync"
	"time"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/store"
)

var defaultTenant = regexp.MustCompile(`^u-[0-9a-f]{16}$`)

// Service issues, lists and revokes tokens.
type Service struct {
	db     *store.DB
	auth   *auth.Authority
	policy *access.Policy
	maxTTL time.Duration

	mu      sync.RWMutex
	revoked map[string]bool
}

// Open loads the revoked token ids and makes auth refuse them from now on.
// maxTTL bounds the lifetime of tokens issued through Create.
func Open(ctx context.Context, db *store.DB, a *auth.Authority, policy *access.Policy, maxTTL time.Duration) (*Service, error) {
	ids, err := store.RevokedTokenIDs(ctx, db.SQL, time.Now())
	if err != nil {
		return nil, err
	}
	s := &Service{db: db, auth: a, policy: policy, maxTTL: maxTTL, revoked: map[string]bool{}}
	for _, id := range ids {
		s.revoked[id] = true
	}
	a.SetRevocations(s)
	return s, nil
}

// Revoked reports whether id was revoked (auth.Revocations).
func (s *Service) Revoked(id string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.revoked[id]
}

// Create issues and records a token. Its lifetime may not pass the
// server's maximum, and its namespace must not be one kiln or the
// operator reserved.
func (s *Service) Create(ctx context.Context, spec auth.TokenSpec) (auth.Issued, error) {
	if spec.TTL > s.maxTTL {
		return auth.Issued{}, errdefs.Invalid("ttl %s is longer than this server allows (tokens.max_ttl %s); ask for a shorter one", spec.TTL, s.maxTTL)
	}
	if spec.Access != nil || spec.Build != "" {
		return auth.Issued{}, errdefs.Invalid("tokens with an access list or a build are minted by kiln for its builds only")
	}
	// A token without namespace or cache scope gets the tenant u-<hash of
	// its subject>; naming such a tenant outright would join it.
	for _, v := range []string{spec.Namespace, auth.ScopeTenant(spec.CacheScope)} {
		if defaultTenant.MatchString(v) {
			return auth.Issued{}, errdefs.Invalid("%q is the form of the tenant kiln gives tokens without a namespace; pick another namespace or cache scope", v)
		}
	}
	iss, err := s.auth.Issue(spec)
	if err != nil {
		return auth.Issued{}, errdefs.Invalid("%v", err)
	}
	// The token was never handed out if its tenant is refused here.
	if err := s.policy.CheckTenant(iss.Tenant); err != nil {
		return auth.Issued{}, err
	}
	if err := s.Record(ctx, spec, iss); err != nil {
		return auth.Issued{}, err
	}
	return iss, nil
}

// Record remembers a token issued elsewhere (the admin token written at
// first start), so it can be listed and revoked.
func (s *Service) Record(ctx context.Context, spec auth.TokenSpec, iss auth.Issued) error {
	return store.PutToken(ctx, s.db.SQL, store.Token{ID: iss.ID, Subject: spec.Subject, Tenant: iss.Tenant,
		CacheScope: iss.CacheScope, Scopes: auth.ScopeNames(spec.Scopes), CreatedAt: iss.IssuedAt, ExpiresAt: iss.ExpiresAt})
}

// RecordPrincipal remembers the token behind p, if it is not yet known.
func (s *Service) RecordPrincipal(ctx context.Context, p auth.Principal, issuedAt time.Time) error {
	return store.PutToken(ctx, s.db.SQL, store.Token{ID: p.TokenID, Subject: p.Subject, Tenant: p.Tenant,
		CacheScope: p.CacheScope, Scopes: auth.ScopeNames(p.Scopes), CreatedAt: issuedAt, ExpiresAt: p.ExpiresAt})
}

// List returns every recorded token, newest first.
func (s *Service) List(ctx context.Context) ([]store.Token, error) {
	return store.ListTokens(ctx, s.db.SQL)
}

// Revoke revokes a recorded token: every request bearing it, and every
// registry token it was exchanged for, fails from now on.
func (s *Service) Revoke(ctx context.Context, id string) (store.Token, error) {
	t, err := store.RevokeToken(ctx, s.db.SQL, id, time.Now().UTC())
	if errors.Is(err, store.ErrNotFound) {
		return store.Token{}, errdefs.NotFound("no token with id %s (kiln token ls lists them)", errdefs.Quote(id))
	}
	if err != nil {
		return store.Token{}, err
	}
	s.mu.Lock()
	s.revoked[id] = true
	s.mu.Unlock()
	return t, nil
}
