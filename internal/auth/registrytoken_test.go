package auth

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseRegistryScopes(t *testing.T) {
	got, err := ParseRegistryScopes([]string{
		"repository:app/web:pull,push",
		"repository:localhost:5000/base:pull repository(plugin):app/web:delete",
		"registry:catalog:*",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []RegistryAccess{
		{Type: "repository", Name: "app/web", Actions: []string{"pull", "push", "delete"}},
		{Type: "repository", Name: "localhost:5000/base", Actions: []string{"pull"}},
		{Type: "registry", Name: "catalog", Actions: []string{"*"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	for _, bad := range []string{"repository", "repository:app", ":app:pull", "repository:app:"} {
		if _, err := ParseRegistryScopes([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func repo(name string, actions ...string) RegistryAccess {
	return RegistryAccess{Type: "repository", Name: name, Actions: actions}
}

// testGrant stands in for internal/access: everything but pushes below
// cache/.
func testGrant(_ context.Context, _ Principal, requested []RegistryAccess) []RegistryAccess {
	var out []RegistryAccess
	for _, r := range requested {
		var acts []string
		for _, a := range ExpandActions(r) {
			if a != "push" || !strings.HasPrefix(r.Name, "cache/") {
				acts = append(acts, a)
			}
		}
		if len(acts) > 0 {
			out = MergeAccess(out, RegistryAccess{Type: r.Type, Name: r.Name, Actions: acts})
		}
	}
	return out
}

func TestRegistryTokenRoundTrip(t *testing.T) {
	a := newTestAuthority(t)
	p := Principal{Subject: "alice", Scopes: []Scope{ScopeImageWrite}, ExpiresAt: time.Now().Add(time.Hour)}
	rt, err := a.IssueRegistryToken(p, "kiln", []RegistryAccess{repo("app", "pull", "push")})
	if err != nil {
		t.Fatal(err)
	}
	g, err := a.VerifyRegistryToken(rt.Token, "kiln")
	if err != nil {
		t.Fatal(err)
	}
	if g.Subject != "alice" || !g.Allows("repository", "app", "push") || !g.Allows("repository", "app", "pull") || g.Allows("repository", "cache/global/x", "push") {
		t.Fatalf("grant = %+v", g)
	}
	if d := time.Until(g.ExpiresAt); d > RegistryTokenTTL || d < RegistryTokenTTL-time.Minute {
		t.Fatalf("registry token lives %v, want about %v", d, RegistryTokenTTL)
	}
	if _, err := a.VerifyRegistryToken(rt.Token, "other"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("token for service kiln accepted by service other: %v", err)
	}
	if _, err := a.Verify(rt.Token); !errors.Is(err, ErrInvalid) {
		t.Fatalf("registry token accepted as a kiln token: %v", err)
	}
	kiln := mustIssue(t, a, "alice", []Scope{ScopeBuildAdmin}, "", time.Hour, nil)
	if _, err := a.VerifyRegistryToken(kiln, "kiln"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("kiln token accepted as a registry token: %v", err)
	}

	// A registry token never outlives the kiln token it came from.
	p.ExpiresAt = time.Now().Add(30 * time.Second)
	rt, err = a.IssueRegistryToken(p, "kiln", nil)
	if err != nil {
		t.Fatal(err)
	}
	if rt.ExpiresAt.After(p.ExpiresAt) {
		t.Fatalf("registry token expires %v, after kiln token %v", rt.ExpiresAt, p.ExpiresAt)
	}
	a.now = func() time.Time { return time.Now().Add(time.Minute) }
	if _, err := a.VerifyRegistryToken(rt.Token, "kiln"); !errors.Is(err, ErrExpired) {
		t.Fatalf("expired registry token: %v", err)
	}
}

type tokenResponse struct {
	Token       string `json:"token"`
	AccessToken string `json:"access_token"`
	ExpiresIn   int    `json:"expires_in"`
	IssuedAt    string `json:"issued_at"`
	Errors      []struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"errors"`
}

func doToken(t *testing.T, req *http.Request) (int, tokenResponse) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var tr tokenResponse
	if err := json.Unmarshal(body, &tr); err != nil {
		t.Fatalf("token endpoint answered %d with non-JSON %q", resp.StatusCode, body)
	}
	if resp.StatusCode == http.StatusUnauthorized && resp.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("401 without WWW-Authenticate")
	}
	return resp.StatusCode, tr
}

func TestTokenHandler(t *testing.T) {
	a := newTestAuthority(t)
	srv := httptest.NewServer(a.TokenHandler("kiln", testGrant))
	defer srv.Close()
	writer := mustIssue(t, a, "alice", []Scope{ScopeImageWrite}, "", time.Hour, nil)

	get := func(query string, setAuth func(*http.Request)) (int, tokenResponse) {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v2/token?"+query, nil)
		if setAuth != nil {
			setAuth(req)
		}
		return doToken(t, req)
	}
	grants := func(tok string) RegistryGrant {
		g, err := a.VerifyRegistryToken(tok, "kiln")
		if err != nil {
			t.Fatalf("issued token does not verify: %v", err)
		}
		return g
	}

	q := "service=kiln&scope=repository:app:pull,push&scope=repository:cache/global/x:pull,push"
	code, tr := get(q, func(r *http.Request) { r.SetBasicAuth("anything", writer) })
	if code != 200 || tr.Token == "" || tr.Token != tr.AccessToken || tr.ExpiresIn <= 0 || tr.IssuedAt == "" {
		t.Fatalf("basic auth: %d %+v", code, tr)
	}
	g := grants(tr.Token)
	want := []RegistryAccess{repo("app", "pull", "push"), repo("cache/global/x", "pull")}
	if !reflect.DeepEqual(g.Access, want) {
		t.Fatalf("granted %+v, want %+v", g.Access, want)
	}

	code, tr = get(q, func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+writer) })
	if code != 200 || !grants(tr.Token).Allows("repository", "app", "push") {
		t.Fatalf("bearer auth: %d %+v", code, tr)
	}

	code, tr = get(q, nil)
	if code != 401 || len(tr.Errors) == 0 || !strings.Contains(tr.Errors[0].Message, "kiln token create") {
		t.Fatalf("no credentials: %d %+v", code, tr)
	}

	code, tr = get(q, func(r *http.Request) { r.SetBasicAuth("x", writer+"x") })
	if code != 401 || !strings.Contains(tr.Errors[0].Message, "invalid token") {
		t.Fatalf("bad token: %d %+v", code, tr)
	}

	expired := mustIssue(t, a, "alice", []Scope{ScopeImageWrite}, "", time.Minute, nil)
	a.now = func() time.Time { return time.Now().Add(2 * time.Minute) }
	code, tr = get(q, func(r *http.Request) { r.SetBasicAuth("x", expired) })
	a.now = time.Now
	if code != 401 || !strings.Contains(tr.Errors[0].Message, "expired") || !strings.Contains(tr.Errors[0].Message, "kiln token create") {
		t.Fatalf("expired token: %d %+v", code, tr)
	}

	code, _ = get("service=elsewhere&scope=repository:app:pull", func(r *http.Request) { r.SetBasicAuth("x", writer) })
	if code != 400 {
		t.Fatalf("foreign service: %d, want 400", code)
	}
	code, _ = get("service=kiln&scope=nonsense", func(r *http.Request) { r.SetBasicAuth("x", writer) })
	if code != 400 {
		t.Fatalf("malformed scope: %d, want 400", code)
	}

	// OAuth2 password grant, as containerd sends it.
	form := url.Values{"grant_type": {"password"}, "username": {"bk"}, "password": {writer}, "service": {"kiln"}, "scope": {"repository:app:pull,push"}, "client_id": {"containerd-client"}}
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v2/token", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	code, tr = doToken(t, req)
	if code != 200 || !grants(tr.AccessToken).Allows("repository", "app", "push") {
		t.Fatalf("oauth password grant: %d %+v", code, tr)
	}
	form.Set("grant_type", "authorization_code")
	req, _ = http.NewRequest(http.MethodPost, srv.URL+"/v2/token", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if code, _ = doToken(t, req); code != 400 {
		t.Fatalf("unsupported grant type: %d, want 400", code)
	}
}
