package auth

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode"

	"github.com/distribution/reference"
	"github.com/golang-jwt/jwt/v5"

	"github.com/kiln-build/kiln/internal/errdefs"
)

// Issuer is the iss claim of every token kiln signs.
const Issuer = "kiln"

// KeyFile is the name of the signing key inside the directory given to
// LoadOrCreate.
const KeyFile = "signing.key"

// Errors callers branch on: ErrExpired, ErrRevoked and ErrInvalid are
// errdefs.ErrUnauthenticated, ErrForbidden is errdefs.ErrForbidden itself.
// Returned errors wrap them with the reason.
var (
	ErrExpired   = errdefs.Sentinel(errdefs.ErrUnauthenticated, "token expired")
	ErrRevoked   = errdefs.Sentinel(errdefs.ErrUnauthenticated, "token revoked")
	ErrInvalid   = errdefs.Sentinel(errdefs.ErrUnauthenticated, "invalid token")
	ErrForbidden = errdefs.ErrForbidden
)

// Revocations tells whether a token id was revoked. The Authority asks it
// on every verification, so it must answer from memory.
type Revocations interface {
	Revoked(id string) bool
}

// Access restricts a kiln token's registry access to the listed
// repositories. Repository is an exact name ("builds/abc"), a prefix pattern
// ("cache/scope-x/*" matches everything below cache/scope-x/) or "*" for all.
// Actions are "pull", "push", "delete" or "*".
type Access struct {
	Repository string   `json:"repository"`
	Actions    []string `json:"actions"`
}

// Principal is the verified identity behind a kiln token.
type Principal struct {
	Subject string
	Scopes  []Scope
	// Tenant owns everything this principal builds and names: the
	// token's namespace claim, or its cache scope up to the first '.'.
	Tenant string
	// CacheScope is the build cache scope this principal may use: the
	// token's cache_scope claim, the namespace, or a stable per-subject
	// default. It always lies within Tenant.
	CacheScope string
	// Build is set on the tokens kiln mints for one build's own pushes
	// and pulls: that build's id.
	Build string
	// Access, when non-empty, narrows registry access to these entries;
	// it never widens what Scopes allow.
	Access    []Access
	TokenID   string
	ExpiresAt time.Time
}

// Has reports whether the principal holds s directly or through a stronger
// scope (see Scope.Implies).
func (p Principal) Has(s Scope) bool {
	for _, held := range p.Scopes {
		if held.Implies(s) {
			return true
		}
	}
	return false
}

// CheckCacheScope returns the cache scope a request should use. A request
// may leave the scope empty or repeat its own; naming any other scope is
// refused with an error wrapping ErrForbidden, because scope comes from the
// token and never from a request field.
func (p Principal) CheckCacheScope(requested string) (string, error) {
	if requested == "" || requested == p.CacheScope {
		return p.CacheScope, nil
	}
	return "", fmt.Errorf("%w: cache scope %q is not this token's: it may only use %q (or leave the scope empty)", ErrForbidden, requested, p.CacheScope)
}

// DefaultCacheScope is the cache scope of a subject whose token carries no
// cache_scope claim: stable across tokens, distinct per subject.
func DefaultCacheScope(subject string) string {
	sum := sha256.Sum256([]byte(subject))
	return "u-" + hex.EncodeToString(sum[:])[:16]
}

// Authority holds the server's signing key and issues and verifies tokens.
type Authority struct {
	key   ed25519.PrivateKey
	pub   ed25519.PublicKey
	keyID string
	// now is swappable so tests can check expiry without sleeping.
	now     func() time.Time
	revoked Revocations // nil: nothing is revoked
}

func (a *Authority) checkRevoked(id string) error {
	if a.revoked != nil && id != "" && a.revoked.Revoked(id) {
		return fmt.Errorf("%w: token %s was revoked; ask for a new one", ErrRevoked, id)
	}
	return nil
}

// LoadOrCreate loads the Ed25519 signing key from dir/signing.key, creating
// it (mode 0600, PKCS#8 PEM) and dir if absent. created reports whether a new
// key was made, which means every token issued before is now invalid.
func LoadOrCreate(dir string) (a *Authority, created bool, err error) {
	if dir == "" {
		return nil, false, errors.New("load signing key: no directory given")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("create signing key directory %s: %w", dir, err)
	}
	path := filepath.Join(dir, KeyFile)
	a, err = loadKey(path)
	if err == nil {
		return a, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, false, err
	}

	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, false, fmt.Errorf("generate signing key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, false, fmt.Errorf("encode signing key: %w", err)
	}
	// Write to a temp file and hard-link it into place: a concurrent
	// LoadOrCreate either wins the link or loads the winner's key, so two
	// processes never end up signing with different keys.
	tmp, err := os.CreateTemp(dir, ".signing.key-*")
	if err != nil {
		return nil, false, fmt.Errorf("write signing key in %s: %w", dir, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, false, fmt.Errorf("write signing key %s: %w", tmp.Name(), err)
	}
	if err := pem.Encode(tmp, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
		tmp.Close()
		return nil, false, fmt.Errorf("write signing key %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, false, fmt.Errorf("write signing key %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return nil, false, fmt.Errorf("write signing key %s: %w", tmp.Name(), err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			a, err = loadKey(path)
			return a, false, err
		}
		return nil, false, fmt.Errorf("install signing key %s: %w", path, err)
	}
	return newAuthority(key), true, nil
}

func loadKey(path string) (*Authority, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("open signing key %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat signing key %s: %w", path, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("signing key %s has mode %04o, so others can read it and forge tokens: run `chmod 600 %s` (and consider rotating it by deleting the file)", path, st.Mode().Perm(), path)
	}
	data, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("read signing key %s: %w", path, err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("signing key %s is not a PEM \"PRIVATE KEY\" file: remove it to generate a new key", path)
	}
	parsed, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse signing key %s: %w", path, err)
	}
	key, ok := parsed.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("signing key %s holds a %T, kiln needs an Ed25519 key: remove it to generate a new key", path, parsed)
	}
	return newAuthority(key), nil
}

func newAuthority(key ed25519.PrivateKey) *Authority {
	pub := key.Public().(ed25519.PublicKey)
	sum := sha256.Sum256(pub)
	return &Authority{key: key, pub: pub, keyID: hex.EncodeToString(sum[:8]), now: time.Now}
}

// kilnClaims is the payload of a kiln token. Access is a pointer so that a
// present-but-empty list can be told apart from an absent one and rejected,
// instead of silently meaning "unrestricted".
type kilnClaims struct {
	jwt.RegisteredClaims
	Scopes     []Scope   `json:"scopes"`
	Namespace  string    `json:"namespace,omitempty"`
	CacheScope string    `json:"cache_scope,omitempty"`
	Access     *[]Access `json:"access,omitempty"`
	Build      string    `json:"build,omitempty"`
}

// TokenSpec is what a new kiln token says.
type TokenSpec struct {
	Subject string
	Scopes  []Scope
	// Namespace names the tenant; empty derives it from the cache scope.
	Namespace string
	// CacheScope may be empty: the namespace, else the subject's default.
	// With a namespace it must be the namespace or "<namespace>.<name>".
	CacheScope string
	// TTL must be positive: a token that never expires could only be
	// stopped by revoking it.
	TTL time.Duration
	// Access, when non-nil, must be non-empty and restricts registry
	// access to its entries.
	Access []Access
	// Build marks a token kiln mints for one build's own registry access.
	Build string
}

// Issued is a signed kiln token and what identifies it.
type Issued struct {
	Token      string
	ID         string
	Tenant     string
	CacheScope string
	IssuedAt   time.Time
	ExpiresAt  time.Time
}

// Issue signs a kiln bearer token.
func (a *Authority) Issue(spec TokenSpec) (Issued, error) {
	subject := spec.Subject
	if err := validateSubject(subject); err != nil {
		return Issued{}, fmt.Errorf("issue token: %w", err)
	}
	if err := validateScopes(spec.Scopes); err != nil {
		return Issued{}, fmt.Errorf("issue token for %q: %w", subject, err)
	}
	tenant, err := tenantOf(spec.Namespace, spec.CacheScope, subject)
	if err != nil {
		return Issued{}, fmt.Errorf("issue token for %q: %w", subject, err)
	}
	if spec.TTL <= 0 {
		return Issued{}, fmt.Errorf("issue token for %q: lifetime must be positive, got %s", subject, spec.TTL)
	}
	if spec.Access != nil {
		if len(spec.Access) == 0 {
			return Issued{}, fmt.Errorf("issue token for %q: access list is empty; pass nil for registry access by scopes alone, or list the repositories", subject)
		}
		if err := validateAccess(spec.Access); err != nil {
			return Issued{}, fmt.Errorf("issue token for %q: %w", subject, err)
		}
	}
	now := a.now()
	claims := kilnClaims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    Issuer,
			Subject:   subject,
			IssuedAt:  jwt.NewNumericDate(now),
			NotBefore: jwt.NewNumericDate(now),
			ExpiresAt: jwt.NewNumericDate(now.Add(spec.TTL)),
			ID:        newJTI(),
		},
		Scopes:     slices.Clone(spec.Scopes),
		Namespace:  spec.Namespace,
		CacheScope: spec.CacheScope,
		Build:      spec.Build,
	}
	if spec.Access != nil {
		acc := slices.Clone(spec.Access)
		claims.Access = &acc
	}
	tok, err := a.sign(claims)
	if err != nil {
		return Issued{}, err
	}
	return Issued{Token: tok, ID: claims.ID, Tenant: tenant, CacheScope: cacheScopeOf(spec.Namespace, spec.CacheScope, subject), IssuedAt: claims.IssuedAt.Time, ExpiresAt: claims.ExpiresAt.Time}, nil
}

// SetRevocations makes every later verification refuse revoked token ids.
func (a *Authority) SetRevocations(r Revocations) { a.revoked = r }

// Verify checks a kiln token's signature, lifetime and claims. Errors wrap
// ErrExpired (the user should create a new token) or ErrInvalid (anything
// else: bad signature, malformed, unknown scope, a registry token).
func (a *Authority) Verify(token string) (Principal, error) {
	var c kilnClaims
	if _, err := a.parse(token, &c); err != nil {
		return Principal{}, err
	}
	if len(c.Audience) > 0 {
		return Principal{}, fmt.Errorf("%w: this is a registry token (audience %v), not a kiln token", ErrInvalid, []string(c.Audience))
	}
	if err := validateSubject(c.Subject); err != nil {
		return Principal{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if err := validateScopes(c.Scopes); err != nil {
		return Principal{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if err := a.checkRevoked(c.ID); err != nil {
		return Principal{}, err
	}
	tenant, err := tenantOf(c.Namespace, c.CacheScope, c.Subject)
	if err != nil {
		return Principal{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	p := Principal{
		Subject:    c.Subject,
		Scopes:     c.Scopes,
		Tenant:     tenant,
		CacheScope: cacheScopeOf(c.Namespace, c.CacheScope, c.Subject),
		Build:      c.Build,
		TokenID:    c.ID,
		ExpiresAt:  c.ExpiresAt.Time,
	}
	if c.Access != nil {
		if len(*c.Access) == 0 {
			return Principal{}, fmt.Errorf("%w: access claim is present but empty", ErrInvalid)
		}
		if err := validateAccess(*c.Access); err != nil {
			return Principal{}, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		p.Access = *c.Access
	}
	return p, nil
}

func (a *Authority) sign(claims jwt.Claims) (string, error) {
	t := jwt.NewWithClaims(jwt.SigningMethodEdDSA, claims)
	t.Header["kid"] = a.keyID
	s, err := t.SignedString(a.key)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return s, nil
}

// parse verifies signature, issuer and lifetime, mapping the library's
// errors onto ErrExpired and ErrInvalid. The signature is checked before the
// lifetime, so only genuine tokens are ever reported as expired.
func (a *Authority) parse(token string, claims jwt.Claims, opts ...jwt.ParserOption) (*jwt.Token, error) {
	if token == "" {
		return nil, fmt.Errorf("%w: empty token", ErrInvalid)
	}
	opts = append(opts,
		jwt.WithValidMethods([]string{jwt.SigningMethodEdDSA.Alg()}),
		jwt.WithIssuer(Issuer),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithTimeFunc(a.now),
	)
	t, err := jwt.NewParser(opts...).ParseWithClaims(token, claims, func(*jwt.Token) (any, error) {
		return a.pub, nil
	})
	if err != nil {
		if errors.Is(err, jwt.ErrTokenExpired) {
			exp, _ := claims.GetExpirationTime()
			when := "already"
			if exp != nil {
				when = "at " + exp.Time.UTC().Format(time.RFC3339)
			}
			return nil, fmt.Errorf("%w: it expired %s; create a new token with `kiln token create`", ErrExpired, when)
		}
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return t, nil
}

func newJTI() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b[:])
}

func validateSubject(s string) error {
	if strings.TrimSpace(s) == "" {
		return errors.New("subject is empty: name who the token is for")
	}
	if len(s) > 256 {
		return fmt.Errorf("subject is %d bytes long, the limit is 256", len(s))
	}
	if strings.IndexFunc(s, unicode.IsControl) >= 0 {
		return fmt.Errorf("subject %q contains control characters", s)
	}
	return nil
}

// Cache scopes name on-disk volumes, so they are kept to a safe alphabet.
var cacheScopeRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// Tenant names are the first component of image names (<tenant>/app),
// so they follow the registry's path-component grammar, without dots:
// a dot in a cache scope separates the tenant from the project.
var tenantRE = regexp.MustCompile(`^[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)*$`)

// ValidTenant checks a tenant (namespace) name.
func ValidTenant(s string) error {
	if len(s) > 63 || !tenantRE.MatchString(s) {
		return fmt.Errorf("namespace %q is invalid: use 1-63 characters from a-z, 0-9, '-' and '_', starting and ending with a letter or digit (no dots)", s)
	}
	return nil
}

// tenantOf derives and checks a token's tenant: the namespace, else the
// cache scope (or the subject's default) up to its first '.'. A cache
// scope given with a namespace must lie within it, so no two tenants can
// ever share a cache volume.
func tenantOf(namespace, cacheScope, subject string) (string, error) {
	if cacheScope != "" {
		if err := validateCacheScope(cacheScope); err != nil {
			return "", err
		}
	}
	if namespace != "" {
		if err := ValidTenant(namespace); err != nil {
			return "", err
		}
		if cacheScope != "" && cacheScope != namespace && !strings.HasPrefix(cacheScope, namespace+".") {
			return "", fmt.Errorf("cache scope %q is outside namespace %q: use %q or %q", cacheScope, namespace, namespace, namespace+"."+cacheScope)
		}
		return namespace, nil
	}
	scope := cacheScopeOf("", cacheScope, subject)
	tenant := ScopeTenant(scope)
	if err := ValidTenant(tenant); err != nil {
		return "", fmt.Errorf("cache scope %q does not name a tenant (the part before its first '.'): %v; give the token a namespace", scope, err)
	}
	return tenant, nil
}

// ScopeTenant is the tenant a cache scope belongs to: the part before its
// first '.'.
func ScopeTenant(scope string) string {
	t, _, _ := strings.Cut(scope, ".")
	return t
}

// cacheScopeOf is the cache scope a token uses: its claim, else its
// namespace, else the subject's default.
func cacheScopeOf(namespace, cacheScope, subject string) string {
	switch {
	case cacheScope != "":
		return cacheScope
	case namespace != "":
		return namespace
	}
	return DefaultCacheScope(subject)
}

func validateCacheScope(s string) error {
	if !cacheScopeRE.MatchString(s) {
		return fmt.Errorf("cache scope %q is invalid: use 1-64 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit", s)
	}
	return nil
}

var validActions = []string{"pull", "push", "delete", "*"}

func validateAccess(access []Access) error {
	for i, e := range access {
		if err := validateRepoPattern(e.Repository); err != nil {
			return fmt.Errorf("access entry %d: %w", i, err)
		}
		if len(e.Actions) == 0 {
			return fmt.Errorf("access entry %d (%q) has no actions: list some of pull, push, delete, *", i, e.Repository)
		}
		for _, act := range e.Actions {
			if !slices.Contains(validActions, act) {
				return fmt.Errorf("access entry %d (%q): unknown action %q: use pull, push, delete or *", i, e.Repository, act)
			}
		}
	}
	return nil
}

func validateRepoPattern(p string) error {
	if p == "*" {
		return nil
	}
	name := strings.TrimSuffix(p, "/*")
	if _, err := reference.WithName(name); err != nil {
		return fmt.Errorf("repository pattern %q is invalid: use a repository name, a prefix like \"team/*\", or \"*\": %v", p, err)
	}
	return nil
}

// matchRepo reports whether pattern (as in Access.Repository) covers repo.
func matchRepo(pattern, repo string) bool {
	if pattern == "*" {
		return true
	}
	if prefix, ok := strings.CutSuffix(pattern, "/*"); ok {
		return strings.HasPrefix(repo, prefix+"/")
	}
	return pattern == repo
}
