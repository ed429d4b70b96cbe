package auth

import (
	"encoding/base64"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

func newTestAuthority(t *testing.T) *Authority {
	t.Helper()
	a, created, err := LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if !created {
		t.Fatal("LoadOrCreate on an empty dir reported created=false")
	}
	return a
}

func mustIssue(t *testing.T, a *Authority, subject string, scopes []Scope, cacheScope string, ttl time.Duration, access []Access) string {
	t.Helper()
	tok, err := a.Issue(TokenSpec{Subject: subject, Scopes: scopes, CacheScope: cacheScope, TTL: ttl, Access: access})
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	return tok.Token
}

func TestParseScopes(t *testing.T) {
	got, err := ParseScopes(" build:write, image:read,,build:write ")
	if err != nil {
		t.Fatal(err)
	}
	if want := []Scope{ScopeBuildWrite, ScopeImageRead}; !reflect.DeepEqual(got, want) {
		t.Fatalf("ParseScopes = %v, want %v", got, want)
	}
	_, err = ParseScopes("build:read,image:delete")
	if err == nil || !strings.Contains(err.Error(), `"image:delete"`) || !strings.Contains(err.Error(), "cache:admin") {
		t.Fatalf("unknown scope error should name it and list valid scopes, got %v", err)
	}
	if _, err := ParseScopes(" , "); err == nil {
		t.Fatal("empty scope list accepted")
	}
}

func TestScopeImplication(t *testing.T) {
	p := Principal{Scopes: []Scope{ScopeBuildWrite, ScopeImageWrite}}
	for s, want := range map[Scope]bool{
		ScopeBuildRead: true, ScopeBuildWrite: true, ScopeImageRead: true, ScopeImageWrite: true,
		ScopeBuildAdmin: false, ScopeCacheAdmin: false,
	} {
		if p.Has(s) != want {
			t.Errorf("build:write,image:write Has(%s) = %v, want %v", s, !want, want)
		}
	}
	admin := Principal{Scopes: []Scope{ScopeBuildAdmin}}
	for _, s := range AllScopes {
		if !admin.Has(s) {
			t.Errorf("build:admin should imply %s", s)
		}
	}
	if (Principal{Scopes: []Scope{ScopeImageRead}}).Has(ScopeImageWrite) {
		t.Error("image:read must not imply image:write")
	}
}

func TestLoadOrCreatePersistsKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "keys")
	a1, created, err := LoadOrCreate(dir)
	if err != nil || !created {
		t.Fatalf("first LoadOrCreate: created=%v err=%v", created, err)
	}
	path := filepath.Join(dir, KeyFile)
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode = %04o, want 0600", st.Mode().Perm())
	}
	data, _ := os.ReadFile(path)
	if b, _ := pem.Decode(data); b == nil || b.Type != "PRIVATE KEY" {
		t.Fatalf("key file is not a PEM private key:\n%s", data)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("key dir holds %d entries, want only %s (temp file left behind?)", len(entries), KeyFile)
	}

	tok := mustIssue(t, a1, "alice", []Scope{ScopeBuildRead}, "", time.Hour, nil)
	a2, created, err := LoadOrCreate(dir)
	if err != nil || created {
		t.Fatalf("second LoadOrCreate: created=%v err=%v", created, err)
	}
	if _, err := a2.Verify(tok); err != nil {
		t.Fatalf("token from the first load does not verify after reload: %v", err)
	}
}

func TestLoadOrCreateRejectsBadKeyFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, KeyFile)
	if err := os.WriteFile(path, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreate(dir); err == nil || !strings.Contains(err.Error(), "PEM") {
		t.Fatalf("garbage key file: err = %v", err)
	}

	dir = t.TempDir()
	if _, _, err := LoadOrCreate(dir); err != nil {
		t.Fatal(err)
	}
	path = filepath.Join(dir, KeyFile)
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreate(dir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable key file: err = %v", err)
	}
}

func TestIssueVerifyRoundTrip(t *testing.T) {
	a := newTestAuthority(t)
	access := []Access{{Repository: "builds/b1", Actions: []string{"pull", "push"}}, {Repository: "base/*", Actions: []string{"pull"}}}
	tok := mustIssue(t, a, "ci-bot", []Scope{ScopeBuildWrite, ScopeImageWrite}, "team-a", time.Hour, access)
	p, err := a.Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	if p.Subject != "ci-bot" || p.CacheScope != "team-a" || !reflect.DeepEqual(p.Scopes, []Scope{ScopeBuildWrite, ScopeImageWrite}) || !reflect.DeepEqual(p.Access, access) {
		t.Fatalf("principal = %+v", p)
	}
	if p.TokenID == "" || time.Until(p.ExpiresAt) < 59*time.Minute {
		t.Fatalf("token id %q / expiry %v not carried", p.TokenID, p.ExpiresAt)
	}

	// Without a cache_scope claim the scope derives stably from the subject.
	p1, _ := a.Verify(mustIssue(t, a, "alice", []Scope{ScopeBuildRead}, "", time.Hour, nil))
	p2, _ := a.Verify(mustIssue(t, a, "alice", []Scope{ScopeImageRead}, "", time.Minute, nil))
	p3, _ := a.Verify(mustIssue(t, a, "bob", []Scope{ScopeBuildRead}, "", time.Hour, nil))
	if p1.CacheScope != p2.CacheScope || p1.CacheScope == p3.CacheScope {
		t.Fatalf("default cache scopes: alice %q/%q, bob %q", p1.CacheScope, p2.CacheScope, p3.CacheScope)
	}
	if !strings.HasPrefix(p1.CacheScope, "u-") || len(p1.CacheScope) != 18 {
		t.Fatalf("default cache scope %q, want u- + 16 hex", p1.CacheScope)
	}
	if p1.Access != nil {
		t.Fatalf("unrestricted token has access %v", p1.Access)
	}
}

func TestIssueRejectsBadInput(t *testing.T) {
	a := newTestAuthority(t)
	cases := map[string]func() error{
		"zero ttl": func() error {
			_, err := a.Issue(TokenSpec{Subject: "x", Scopes: []Scope{ScopeBuildRead}, CacheScope: "", TTL: 0, Access: nil})
			return err
		},
		"no scopes": func() error {
			_, err := a.Issue(TokenSpec{Subject: "x", Scopes: nil, CacheScope: "", TTL: time.Hour, Access: nil})
			return err
		},
		"unknown scope": func() error {
			_, err := a.Issue(TokenSpec{Subject: "x", Scopes: []Scope{"build:everything"}, CacheScope: "", TTL: time.Hour, Access: nil})
			return err
		},
		"empty subject": func() error {
			_, err := a.Issue(TokenSpec{Subject: " ", Scopes: []Scope{ScopeBuildRead}, CacheScope: "", TTL: time.Hour, Access: nil})
			return err
		},
		"bad cache scope": func() error {
			_, err := a.Issue(TokenSpec{Subject: "x", Scopes: []Scope{ScopeBuildRead}, CacheScope: "../etc", TTL: time.Hour, Access: nil})
			return err
		},
		"empty access": func() error {
			_, err := a.Issue(TokenSpec{Subject: "x", Scopes: []Scope{ScopeBuildRead}, CacheScope: "", TTL: time.Hour, Access: []Access{}})
			return err
		},
		"bad access repo": func() error {
			_, err := a.Issue(TokenSpec{Subject: "x", Scopes: []Scope{ScopeBuildRead}, CacheScope: "", TTL: time.Hour, Access: []Access{{Repository: "UP/*", Actions: []string{"pull"}}}})
			return err
		},
		"bad access action": func() error {
			_, err := a.Issue(TokenSpec{Subject: "x", Scopes: []Scope{ScopeBuildRead}, CacheScope: "", TTL: time.Hour, Access: []Access{{Repository: "a", Actions: []string{"write"}}}})
			return err
		},
	}
	for name, f := range cases {
		if err := f(); err == nil {
			t.Errorf("%s: Issue succeeded", name)
		}
	}
}

func TestVerifyExpired(t *testing.T) {
	a := newTestAuthority(t)
	tok := mustIssue(t, a, "alice", []Scope{ScopeBuildRead}, "", time.Minute, nil)
	a.now = func() time.Time { return time.Now().Add(2 * time.Minute) }
	_, err := a.Verify(tok)
	if !errors.Is(err, ErrExpired) || errors.Is(err, ErrInvalid) {
		t.Fatalf("expired token: err = %v, want ErrExpired", err)
	}
	if !strings.Contains(err.Error(), "kiln token create") {
		t.Fatalf("expired error should tell the user what to do: %v", err)
	}
}

func TestVerifyRejectsForgedAndMalformed(t *testing.T) {
	a := newTestAuthority(t)
	other := newTestAuthority(t)
	good := mustIssue(t, a, "alice", []Scope{ScopeBuildRead}, "", time.Hour, nil)

	parts := strings.Split(good, ".")
	// Lift alice to build:admin without re-signing.
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	forgedPayload := strings.Replace(string(payload), `"build:read"`, `"build:admin"`, 1)
	tampered := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(forgedPayload)) + "." + parts[2]

	unsigned, _ := jwt.NewWithClaims(jwt.SigningMethodNone, jwt.MapClaims{
		"iss": Issuer, "sub": "mallory", "scopes": []string{"build:admin"}, "iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
	}).SignedString(jwt.UnsafeAllowNoneSignatureType)

	expiredForeign := mustIssue(t, other, "alice", []Scope{ScopeBuildRead}, "", time.Second, nil)

	for name, tok := range map[string]string{
		"other key":             mustIssue(t, other, "alice", []Scope{ScopeBuildRead}, "", time.Hour, nil),
		"tampered payload":      tampered,
		"alg none":              unsigned,
		"garbage":               "not.a.jwt",
		"empty":                 "",
		"expired and foreign":   expiredForeign,
		"unknown scope claim":   signRaw(t, a, jwt.MapClaims{"iss": Issuer, "sub": "x", "scopes": []string{"root"}, "iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix()}),
		"no scopes claim":       signRaw(t, a, jwt.MapClaims{"iss": Issuer, "sub": "x", "iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix()}),
		"no exp":                signRaw(t, a, jwt.MapClaims{"iss": Issuer, "sub": "x", "scopes": []string{"build:read"}, "iat": time.Now().Unix()}),
		"wrong issuer":          signRaw(t, a, jwt.MapClaims{"iss": "elsewhere", "sub": "x", "scopes": []string{"build:read"}, "iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix()}),
		"empty access claim":    signRaw(t, a, jwt.MapClaims{"iss": Issuer, "sub": "x", "scopes": []string{"image:write"}, "access": []any{}, "iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix()}),
		"bad cache_scope claim": signRaw(t, a, jwt.MapClaims{"iss": Issuer, "sub": "x", "scopes": []string{"build:read"}, "cache_scope": "A/B", "iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix()}),
	} {
		if name == "expired and foreign" {
			a.now = func() time.Time { return time.Now().Add(time.Hour) }
		}
		_, err := a.Verify(tok)
		a.now = time.Now
		if !errors.Is(err, ErrInvalid) || errors.Is(err, ErrExpired) {
			t.Errorf("%s: err = %v, want ErrInvalid", name, err)
		}
	}
}

// signRaw signs arbitrary claims with a's key, to build tokens Issue refuses to make.
func signRaw(t *testing.T, a *Authority, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(jwt.SigningMethodEdDSA, claims).SignedString(a.key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestCheckCacheScope(t *testing.T) {
	p := Principal{Subject: "alice", CacheScope: "team-a"}
	for _, req := range []string{"", "team-a"} {
		got, err := p.CheckCacheScope(req)
		if err != nil || got != "team-a" {
			t.Errorf("CheckCacheScope(%q) = %q, %v; want team-a", req, got, err)
		}
	}
	_, err := p.CheckCacheScope("team-b")
	if !errors.Is(err, ErrForbidden) || !strings.Contains(err.Error(), "team-b") {
		t.Fatalf("foreign scope: err = %v, want ErrForbidden naming team-b", err)
	}
}

func TestTokensAreEdDSASigned(t *testing.T) {
	// Guard against an accidental switch to a weaker or symmetric algorithm.
	a := newTestAuthority(t)
	tok := mustIssue(t, a, "alice", []Scope{ScopeBuildRead}, "", time.Hour, nil)
	parsed, _, err := jwt.NewParser().ParseUnverified(tok, jwt.MapClaims{})
	if err != nil {
		t.Fatal(err)
	}
	if parsed.Method.Alg() != "EdDSA" || parsed.Header["kid"] == "" {
		t.Fatalf("header = %v", parsed.Header)
	}
}

func TestTenantComesFromNamespaceOrCacheScope(t *testing.T) {
	a := newTestAuthority(t)
	verify := func(spec TokenSpec) (Principal, error) {
		spec.Scopes, spec.TTL = []Scope{ScopeBuildRead}, time.Hour
		if spec.Subject == "" {
			spec.Subject = "alice"
		}
		iss, err := a.Issue(spec)
		if err != nil {
			return Principal{}, err
		}
		if iss.ID == "" || iss.Tenant == "" {
			t.Errorf("issued %+v without id or tenant", iss)
		}
		p, err := a.Verify(iss.Token)
		if err == nil && p.Tenant != iss.Tenant {
			t.Errorf("Issue said tenant %q, Verify %q", iss.Tenant, p.Tenant)
		}
		return p, err
	}
	for _, c := range []struct {
		spec          TokenSpec
		tenant, scope string
	}{
		{TokenSpec{CacheScope: "team-a"}, "team-a", "team-a"},
		{TokenSpec{CacheScope: "acme.web"}, "acme", "acme.web"},
		{TokenSpec{Namespace: "acme"}, "acme", "acme"},
		{TokenSpec{Namespace: "acme", CacheScope: "acme.api"}, "acme", "acme.api"},
		{TokenSpec{}, DefaultCacheScope("alice"), DefaultCacheScope("alice")},
	} {
		p, err := verify(c.spec)
		if err != nil {
			t.Errorf("%+v: %v", c.spec, err)
			continue
		}
		if p.Tenant != c.tenant || p.CacheScope != c.scope {
			t.Errorf("%+v: tenant %q scope %q, want %q %q", c.spec, p.Tenant, p.CacheScope, c.tenant, c.scope)
		}
	}
	// A cache scope outside the namespace would let two tenants share
	// one cache volume.
	for _, bad := range []TokenSpec{
		{Namespace: "acme", CacheScope: "other"},
		{Namespace: "acme", CacheScope: "acmex"},
		{Namespace: "Acme"},
		{Namespace: "a.b"},
		{CacheScope: "team_"},
	} {
		if _, err := verify(bad); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

type revokedSet map[string]bool

func (r revokedSet) Revoked(id string) bool { return r[id] }

func TestRevokedTokensAndTheirRegistryTokensStopWorking(t *testing.T) {
	a := newTestAuthority(t)
	revoked := revokedSet{}
	a.SetRevocations(revoked)
	iss, err := a.Issue(TokenSpec{Subject: "alice", Scopes: []Scope{ScopeImageRead}, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	p, err := a.Verify(iss.Token)
	if err != nil {
		t.Fatal(err)
	}
	rt, err := a.IssueRegistryToken(p, "kiln", nil)
	if err != nil {
		t.Fatal(err)
	}
	revoked[iss.ID] = true
	if _, err := a.Verify(iss.Token); !errors.Is(err, ErrRevoked) {
		t.Errorf("revoked token verified: %v", err)
	}
	if _, err := a.VerifyRegistryToken(rt.Token, "kiln"); !errors.Is(err, ErrRevoked) {
		t.Errorf("registry token of a revoked token verified: %v", err)
	}
}
