package access

import (
	"context"
	"errors"
	"reflect"
	"testing"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
)

func testPolicy(t *testing.T, cfg Config) *Policy {
	t.Helper()
	p, err := New(cfg, OwnersFunc(func(_ context.Context, id string) (string, bool, error) {
		switch id {
		case "ba", "bx":
			return "acme", true, nil
		case "bb":
			return "bob", true, nil
		case "done":
			return "acme", false, nil
		}
		return "", false, errdefs.ErrNotFound
	}))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var (
	acmeWriter = auth.Principal{Subject: "a", Tenant: "acme", Scopes: []auth.Scope{auth.ScopeBuildWrite, auth.ScopeImageWrite}}
	acmeReader = auth.Principal{Subject: "r", Tenant: "acme", Scopes: []auth.Scope{auth.ScopeImageRead}}
	acmeBuilds = auth.Principal{Subject: "br", Tenant: "acme", Scopes: []auth.Scope{auth.ScopeBuildRead}}
	bobWriter  = auth.Principal{Subject: "b", Tenant: "bob", Scopes: []auth.Scope{auth.ScopeBuildWrite, auth.ScopeImageWrite}}
	adminTok   = auth.Principal{Subject: "admin", Tenant: "admin", Scopes: []auth.Scope{auth.ScopeBuildAdmin}}
	cacheOnly  = auth.Principal{Subject: "c", Tenant: "acme", Scopes: []auth.Scope{auth.ScopeCacheAdmin}}
	// buildBA is the token kiln mints for acme's build ba.
	buildBA = auth.Principal{Subject: "build:ba", Tenant: "acme", Build: "ba", Scopes: []auth.Scope{auth.ScopeImageRead, auth.ScopeImageWrite},
		Access: []auth.Access{{Repository: "*", Actions: []string{"pull"}}, {Repository: "builds/ba", Actions: []string{"pull", "push"}}, {Repository: "acme/app", Actions: []string{"pull", "push"}}}}
	// buildDone is the token of acme's build that has ended.
	buildDone = auth.Principal{Subject: "build:done", Tenant: "acme", Build: "done", Scopes: []auth.Scope{auth.ScopeImageRead, auth.ScopeImageWrite},
		Access: []auth.Access{{Repository: "*", Actions: []string{"pull"}}, {Repository: "builds/done", Actions: []string{"pull", "push"}}, {Repository: "acme/app", Actions: []string{"pull", "push"}}}}
	// adminBuild is an admin's build exporting the global cache tier.
	adminBuild = auth.Principal{Subject: "build:bx", Tenant: "admin", Build: "bx", Scopes: []auth.Scope{auth.ScopeImageRead, auth.ScopeImageWrite, auth.ScopeBuildAdmin},
		Access: []auth.Access{{Repository: "*", Actions: []string{"pull"}}, {Repository: "builds/bx", Actions: []string{"pull", "push"}}, {Repository: "cache/global/k", Actions: []string{"pull", "push"}}, {Repository: "base/busybox", Actions: []string{"pull", "push"}}}}
)

// TestRepoRules is the registry half of the tenancy rules, repository by
// repository: who may pull, push and delete, and whether a refusal hides
// the repository (not found) or says why (forbidden).
func TestRepoRules(t *testing.T) {
	p := testPolicy(t, Config{Shared: []string{"base"}})
	const (
		ok     = "ok"
		hidden = "hidden"
		denied = "denied"
	)
	type row struct {
		who              auth.Principal
		repo             string
		pull, push, dele string
	}
	for _, c := range []row{
		// A tenant's own namespace, and another's.
		{acmeWriter, "acme/app", ok, ok, ok},
		{acmeWriter, "acme/team/app", ok, ok, ok},
		{acmeReader, "acme/app", ok, denied, denied},
		{acmeBuilds, "acme/app", ok, denied, denied},
		{bobWriter, "acme/app", hidden, denied, denied},
		{cacheOnly, "acme/app", denied, denied, denied},
		{adminTok, "acme/app", ok, ok, ok},
		// One-component names are the admins'.
		{acmeWriter, "app", hidden, denied, denied},
		{adminTok, "app", ok, ok, ok},
		// Shared: everyone reads, admins write.
		{acmeWriter, "base/busybox", ok, denied, denied},
		{bobWriter, "base/busybox", ok, denied, denied},
		{adminTok, "base/busybox", ok, ok, ok},
		// Builds: their tenant and admins read and delete; only the build pushes.
		{acmeWriter, "builds/ba", ok, denied, ok},
		{bobWriter, "builds/ba", hidden, hidden, hidden},
		{adminTok, "builds/ba", ok, denied, ok},
		{buildBA, "builds/ba", ok, ok, denied},
		{buildBA, "builds/bb", hidden, denied, denied},
		{acmeWriter, "builds/unknown", hidden, hidden, hidden},
		// The build's token: its own tags, nothing else written.
		{buildBA, "acme/app", ok, ok, denied},
		{buildBA, "acme/other", ok, denied, denied},
		{buildBA, "bob/app", hidden, denied, denied},
		{buildBA, "base/busybox", ok, denied, denied},
		// A build's token dies with its build.
		{buildDone, "builds/done", denied, denied, denied},
		{buildDone, "acme/app", denied, denied, denied},
		// The mirror: everyone reads, nobody writes over HTTP.
		{acmeWriter, "mirror/docker.io/library/alpine", ok, denied, denied},
		{adminTok, "mirror/docker.io/library/alpine", ok, denied, denied},
		{adminBuild, "mirror/docker.io/library/alpine", ok, denied, denied},
		// The global cache tier: everyone reads, only adminTok builds write.
		{acmeWriter, "cache/global/k", ok, denied, denied},
		{adminTok, "cache/global/k", ok, denied, ok},
		{adminBuild, "cache/global/k", ok, ok, denied},
		{buildBA, "cache/global/k", ok, denied, denied},
		// Anything else in kiln's namespaces is nobody's.
		{acmeWriter, "cache/other", denied, denied, denied},
		{adminTok, "builds", ok, denied, denied},
		{adminTok, "mirror", ok, denied, denied},
		// Look-alikes are ordinary tenant namespaces.
		{acmeWriter, "mirrors/x", hidden, denied, denied},
		{adminTok, "buildsx/y", ok, ok, ok},
	} {
		for _, a := range []struct {
			act  Action
			want string
		}{{Pull, c.pull}, {Push, c.push}, {Delete, c.dele}} {
			err := p.Repo(context.Background(), c.who, c.repo, a.act)
			got := ok
			switch {
			case err == nil:
			case errors.Is(err, errdefs.ErrNotFound):
				got = hidden
			case errors.Is(err, errdefs.ErrForbidden):
				got = denied
			default:
				t.Errorf("%s %s %s: unclassified error %v", c.who.Subject, a.act, c.repo, err)
				continue
			}
			if got != a.want {
				t.Errorf("%s %s %s: %s (%v), want %s", c.who.Subject, a.act, c.repo, got, err, a.want)
			}
		}
	}
}

func TestNamesMapIntoTheTenantsNamespace(t *testing.T) {
	p := testPolicy(t, Config{Shared: []string{"base"}, RegistryHost: "127.0.0.1:7070"})
	ctx := context.Background()
	for _, c := range []struct {
		who       auth.Principal
		name      string
		repo, tag string
		err       error
	}{
		{acmeWriter, "app:1", "acme/app", "1", nil},
		{acmeWriter, "app", "acme/app", "latest", nil},
		{acmeWriter, "acme/app:1", "acme/app", "1", nil},
		{acmeWriter, "acme/team/app:1", "acme/team/app", "1", nil},
		{acmeWriter, "team/app:1", "", "", errdefs.ErrForbidden},
		{acmeWriter, "bob/app:1", "", "", errdefs.ErrForbidden},
		{acmeWriter, "base/busybox:1", "", "", errdefs.ErrForbidden},
		{acmeWriter, "mirror/docker.io/library/alpine:3.20", "", "", errdefs.ErrInvalid},
		{acmeWriter, "builds/x:latest", "", "", errdefs.ErrInvalid},
		{acmeWriter, "cache/global/k:cache", "", "", errdefs.ErrInvalid},
		// kiln's own host form, as FROM needs it, names kiln's registry.
		{acmeWriter, "127.0.0.1:7070/acme/app:1", "acme/app", "1", nil},
		{acmeWriter, "localhost:7070/app:2", "acme/app", "2", nil},
		{acmeWriter, "127.0.0.1:7070/bob/app:1", "", "", errdefs.ErrForbidden},
		{acmeWriter, "127.0.0.1:7071/acme/app:1", "", "", errdefs.ErrInvalid},
		{acmeWriter, "ghcr.io/acme/app:1", "", "", errdefs.ErrInvalid},
		{acmeWriter, "Bad Name", "", "", errdefs.ErrInvalid},
		{adminTok, "app:1", "app", "1", nil},
		{adminTok, "base/busybox", "base/busybox", "latest", nil},
		{adminTok, "bob/app:1", "bob/app", "1", nil},
		{adminTok, "mirror/docker.io/library/alpine:3.20", "", "", errdefs.ErrInvalid},
	} {
		repo, tag, err := p.Name(ctx, c.who, c.name)
		if c.err != nil {
			if !errors.Is(err, c.err) {
				t.Errorf("%s names %q: %v, want %v", c.who.Subject, c.name, err, c.err)
			}
			continue
		}
		if err != nil || repo != c.repo || tag != c.tag {
			t.Errorf("%s names %q: %s:%s %v, want %s:%s", c.who.Subject, c.name, repo, tag, err, c.repo, c.tag)
		}
	}
	// Resolving for a lookup maps the same way, without the naming check.
	if repo, _, _ := p.Resolve(acmeReader, "app:1"); repo != "acme/app" {
		t.Errorf("acme's reader resolves app:1 to %s", repo)
	}
	if repo, _, _ := p.Resolve(adminTok, "app:1"); repo != "app" {
		t.Errorf("adminTok resolves app:1 to %s", repo)
	}
}

func TestGrantRegistryGivesOnlyWhatTheRulesAllow(t *testing.T) {
	p := testPolicy(t, Config{Shared: []string{"base"}})
	ctx := context.Background()
	repo := func(name string, acts ...string) auth.RegistryAccess {
		return auth.RegistryAccess{Type: "repository", Name: name, Actions: acts}
	}
	catalog := auth.RegistryAccess{Type: "registry", Name: "catalog", Actions: []string{"*"}}
	for _, c := range []struct {
		who       auth.Principal
		requested []auth.RegistryAccess
		want      []auth.RegistryAccess
	}{
		{acmeWriter, []auth.RegistryAccess{repo("acme/app", "*")}, []auth.RegistryAccess{repo("acme/app", "pull", "push", "delete")}},
		{acmeWriter, []auth.RegistryAccess{repo("bob/app", "pull", "push")}, nil},
		{acmeWriter, []auth.RegistryAccess{repo("mirror/docker.io/library/busybox", "pull", "push")}, []auth.RegistryAccess{repo("mirror/docker.io/library/busybox", "pull")}},
		{acmeWriter, []auth.RegistryAccess{catalog}, nil},
		{adminTok, []auth.RegistryAccess{catalog}, []auth.RegistryAccess{catalog}},
		{adminBuild, []auth.RegistryAccess{catalog}, nil},
		{acmeWriter, []auth.RegistryAccess{repo("Bad/Name", "pull")}, nil},
		{acmeWriter, []auth.RegistryAccess{{Type: "plugin", Name: "x", Actions: []string{"pull"}}}, nil},
	} {
		if got := p.GrantRegistry(ctx, c.who, c.requested); !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s asks %+v: granted %+v, want %+v", c.who.Subject, c.requested, got, c.want)
		}
	}
}

func TestTenantsAndTrust(t *testing.T) {
	p := testPolicy(t, Config{Shared: []string{"base"}, TrustGroups: map[string][]string{"web": {"acme", "bob"}}})
	for _, bad := range []string{"builds", "cache", "mirror", "base", "admin", "Acme", "a.b"} {
		if err := p.CheckTenant(bad); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("tenant %q accepted: %v", bad, err)
		}
	}
	if err := p.CheckTenant("acme"); err != nil {
		t.Errorf("acme: %v", err)
	}
	if got := p.TrustedTenants("acme"); !reflect.DeepEqual(got, []string{"acme", "bob"}) {
		t.Errorf("acme trusts %v", got)
	}
	if got := p.TrustedTenants("carol"); !reflect.DeepEqual(got, []string{"carol"}) {
		t.Errorf("carol trusts %v", got)
	}
	if !p.SeeBuild(acmeWriter, "acme") || p.SeeBuild(acmeWriter, "bob") || !p.SeeBuild(adminTok, "bob") {
		t.Error("build visibility")
	}
	if !p.SeeCacheScope(acmeWriter, "acme.web") || p.SeeCacheScope(acmeWriter, "acmex") || !p.SeeCacheScope(adminTok, "acmex") {
		t.Error("cache scope visibility")
	}
	for _, cfg := range []Config{
		{Shared: []string{"mirror"}},
		{Shared: []string{"Bad"}},
		{TrustGroups: map[string][]string{"a": {"x"}, "b": {"x"}}},
	} {
		if _, err := New(cfg, nil); err == nil {
			t.Errorf("config %+v accepted", cfg)
		}
	}
}
