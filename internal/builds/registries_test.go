package builds

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/solve"
	"github.com/kiln-build/kiln/internal/store"
	"github.com/kiln-build/kiln/internal/testkit"
)

func registriesService(t *testing.T, allowed ...string) *Service {
	return &Service{cfg: Config{RegistryHost: "127.0.0.1:7070", ExternalRegistries: allowed, InsecureRegistries: []string{"reg.internal:5000"}},
		policy: testkit.Policy(t)}
}

var teamA = auth.Principal{Subject: "a", Tenant: "team-a", CacheScope: "team-a",
	Scopes: []auth.Scope{auth.ScopeBuildWrite, auth.ScopeImageRead}}

func TestRegistriesSplitsKilnNamesFromPushes(t *testing.T) {
	s := registriesService(t, "*", "localhost:5001")
	o := store.BuildOptions{Network: "egress"}
	req := Request{
		Tags:          []string{"app:1", "ghcr.io/org/app", "localhost:5001/x:2"},
		Push:          true,
		BuildContexts: []string{"base=docker-image://quay.io/org/base:1"},
		CacheFrom:     []string{"type=registry,ref=ghcr.io/org/app:cache", "app:cache"},
		CacheTo:       []string{"type=registry,ref=app:cache,mode=max"},
		RegistryAuth: map[string]solve.Credentials{
			"ghcr.io":        {Username: "u", Password: "p"},
			"quay.io":        {Username: "q", Password: "qp"},
			"unused.io":      {Username: "u", Password: "p"},
			"127.0.0.1:7070": {Username: "u", Password: "p"},
		},
	}
	kiln, creds, err := s.registries(context.Background(), teamA, &req, &o)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(kiln, ",") != "app:1" {
		t.Errorf("kiln names %v, want [app:1]", kiln)
	}
	if got := strings.Join(o.ExternalPush, ","); got != "ghcr.io/org/app:latest,localhost:5001/x:2" {
		t.Errorf("external pushes %s", got)
	}
	if len(o.CacheFrom) != 2 || o.CacheFrom[0].Ref != "ghcr.io/org/app:cache" || o.CacheFrom[0].KilnRepo != "" ||
		o.CacheFrom[1].Ref != "127.0.0.1:7070/team-a/app:cache" || o.CacheFrom[1].KilnRepo != "team-a/app" {
		t.Errorf("cache_from %+v", o.CacheFrom)
	}
	if o.CacheTo == nil || o.CacheTo.Ref != "127.0.0.1:7070/team-a/app:cache" || o.CacheTo.Mode != "max" {
		t.Errorf("cache_to %+v", o.CacheTo)
	}
	// Only the credentials of registries the build reaches are kept;
	// never any for kiln's own.
	if len(creds) != 2 || creds["ghcr.io"].Password != "p" || creds["quay.io"].Password != "qp" || strings.Join(o.RegistryAuthHosts, ",") != "ghcr.io,quay.io" {
		t.Errorf("kept credentials for %v (hosts %v)", creds, o.RegistryAuthHosts)
	}
	if dedupEligible(o) {
		t.Error("a build that pushes elsewhere and exports a cache is answered from dedup")
	}
	if !s.plainHTTP("localhost:5001") || !s.plainHTTP("reg.internal:5000") || s.plainHTTP("ghcr.io") {
		t.Error("plain HTTP is for loopback registries and registries.insecure only")
	}
}

func TestRegistriesRefusals(t *testing.T) {
	for _, c := range []struct {
		name    string
		allowed []string
		network string
		domains []string
		req     Request
		want    string
		kind    error
	}{
		{"other registry without push", []string{"*"}, "egress", nil,
			Request{Tags: []string{"ghcr.io/org/app:1"}}, "add --push", errdefs.ErrInvalid},
		{"digest", []string{"*"}, "egress", nil,
			Request{Push: true, Tags: []string{"ghcr.io/org/app@sha256:" + strings.Repeat("a", 64)}}, "", errdefs.ErrInvalid},
		{"not allowed by the operator", []string{"*.example.com"}, "egress", nil,
			Request{Push: true, Tags: []string{"ghcr.io/org/app:1"}}, "registries.allowed", errdefs.ErrForbidden},
		{"loopback by wildcard", []string{"*"}, "egress", nil,
			Request{Push: true, Tags: []string{"127.0.0.1:6000/app:1"}}, "must be listed by host:port", errdefs.ErrForbidden},
		{"none allowed", nil, "egress", nil,
			Request{CacheFrom: []string{"ghcr.io/org/app:c"}}, "registries.allowed: none", errdefs.ErrForbidden},
		{"isolated", []string{"*"}, "isolated", nil,
			Request{Push: true, Tags: []string{"ghcr.io/org/app:1"}}, "isolated", errdefs.ErrInvalid},
		{"not among allowed_domains", []string{"*"}, "egress", []string{"example.com"},
			Request{CacheTo: []string{"type=registry,ref=ghcr.io/org/app:c"}}, "allowed_domains", errdefs.ErrInvalid},
		{"cache type", []string{"*"}, "egress", nil,
			Request{CacheTo: []string{"type=local,dest=/tmp/x"}}, "type=registry", errdefs.ErrInvalid},
		{"inline cache", []string{"*"}, "egress", nil,
			Request{CacheTo: []string{"type=inline"}}, "inline", errdefs.ErrInvalid},
		{"mode on import", []string{"*"}, "egress", nil,
			Request{CacheFrom: []string{"type=registry,ref=app:c,mode=max"}}, "mode is for cache_to", errdefs.ErrInvalid},
		{"bad mode", []string{"*"}, "egress", nil,
			Request{CacheTo: []string{"type=registry,ref=app:c,mode=all"}}, "min or max", errdefs.ErrInvalid},
		{"two exports", []string{"*"}, "egress", nil,
			Request{CacheTo: []string{"a:c", "b:c"}}, "one registry cache", errdefs.ErrInvalid},
		{"another tenant's cache", []string{"*"}, "egress", nil,
			Request{CacheFrom: []string{"team-b/app:c"}}, "", errdefs.ErrNotFound},
		{"export into another tenant", []string{"*"}, "egress", nil,
			Request{CacheTo: []string{"team-b/app:c"}}, "", errdefs.ErrNotFound},
		{"export into kiln's namespaces", []string{"*"}, "egress", nil,
			Request{CacheTo: []string{"builds/x:c"}}, "reserved", errdefs.ErrInvalid},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := registriesService(t, c.allowed...)
			o := store.BuildOptions{Network: c.network, AllowedDomains: c.domains}
			_, _, err := s.registries(context.Background(), teamA, &c.req, &o)
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not say %q", err, c.want)
			}
			if !errors.Is(err, c.kind) && !(c.kind == errdefs.ErrNotFound && errors.Is(err, errdefs.ErrForbidden)) {
				t.Errorf("error %q is not %v", err, c.kind)
			}
		})
	}
}

func TestRegistryAllowedPatterns(t *testing.T) {
	for _, c := range []struct {
		host    string
		allowed []string
		want    bool
	}{
		{"ghcr.io", []string{"*"}, true},
		{"ghcr.io", nil, false},
		{"ghcr.io", []string{"ghcr.io"}, true},
		{"ghcr.io:443", []string{"ghcr.io"}, true},
		{"reg.example.com:5000", []string{"*.example.com"}, true},
		{"reg.example.com:5000", []string{"reg.example.com:5001"}, false},
		{"example.com.evil.io", []string{"*.example.com"}, false},
		// The server's own networks only by name, never by wildcard.
		{"127.0.0.1:5000", []string{"*"}, false},
		{"localhost:5000", []string{"*"}, false},
		{"10.0.0.5:5000", []string{"*"}, false},
		{"[::1]:5000", []string{"*"}, false},
		{"127.0.0.1:5000", []string{"127.0.0.1:5000"}, true},
		{"127.0.0.1:5001", []string{"127.0.0.1:5000"}, false},
		{"127.0.0.1:5001", []string{"127.0.0.1"}, false},
	} {
		if got := registryAllowed(c.host, c.allowed); got != c.want {
			t.Errorf("registryAllowed(%q, %v) = %v", c.host, c.allowed, got)
		}
	}
}
