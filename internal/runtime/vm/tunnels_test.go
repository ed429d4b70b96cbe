package vm

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/guest"
	"github.com/kiln-build/kiln/internal/progress"
	"github.com/kiln-build/kiln/internal/runtime"
	"github.com/kiln-build/kiln/internal/solve"
)

// Every registry a build names becomes one guest listener: loopback IPs
// as they are, host names on loopback IPs of their own that the guest's
// hosts file maps them to, localhost and 127.0.0.1 on one port as one.
func TestRegistryTunnelsNameEveryRegistryOnce(t *testing.T) {
	got, err := registryTunnels(runtime.Job{
		InsecureRegistries: []string{"127.0.0.1:7070", "kiln.example.com:7070"},
		Solve: solve.Request{
			Push:          []string{"kiln.example.com:7070/app:1", "localhost:7070/app:1"},
			CacheImports:  []string{"cache.example.com:5000/cache/x:latest"},
			NamedContexts: map[string]string{"context:busybox": "docker-image://127.0.0.1:7070/mirror/busybox@sha256:" + sha},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []guest.Tunnel{
		{Name: "registry", Listen: "127.0.0.1:7070"},
		{Name: "registry", Listen: "127.0.1.1:5000", Host: "cache.example.com"},
		{Name: "registry", Listen: "127.0.1.2:7070", Host: "kiln.example.com"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("tunnels:\n got %+v\nwant %+v", got, want)
	}
}

// With job.Registry set, only kiln's host (and, for a loopback one, its
// localhost form) rides the "registry" tunnel; every other registry gets
// an "external:<host:port>" tunnel that the host dials as named, listened
// on in the guest exactly as kiln's would be.
func TestRegistryTunnelsTellKilnFromExternalRegistries(t *testing.T) {
	for name, tc := range map[string]struct {
		job  runtime.Job
		want []guest.Tunnel
	}{
		"kiln on loopback": {
			job: runtime.Job{
				Registry:           "127.0.0.1:7070",
				InsecureRegistries: []string{"127.0.0.1:7070", "127.0.0.1:5000"},
				Solve: solve.Request{
					Push:          []string{"127.0.0.1:7070/builds/b1:latest", "localhost:7070/app:1", "localhost:5000/team/app:1", "ghcr.io/acme/app:1", "registry.example.com:5443/app:1"},
					CacheImports:  []string{"Cache.Example.com/acme/cache:x"},
					CacheExport:   "cache.example.com:8443/acme/cache:x",
					NamedContexts: map[string]string{"context:alpine": "docker-image://alpine:3.20", "context:kiln": "docker-image://127.0.0.1:7070/mirror/busybox@sha256:" + sha},
				},
			},
			want: []guest.Tunnel{
				// 127.0.0.1:5000 and localhost:5000 are one registry on
				// the host, as on the guest.
				{Name: "external:127.0.0.1:5000", Listen: "127.0.0.1:5000"},
				{Name: "registry", Listen: "127.0.0.1:7070"},
				// cache.example.com without a port is HTTPS on 443, and
				// shares its guest IP with cache.example.com:8443.
				{Name: "external:cache.example.com:443", Listen: "127.0.1.1:443", Host: "cache.example.com"},
				{Name: "external:cache.example.com:8443", Listen: "127.0.1.1:8443", Host: "cache.example.com"},
				// Docker Hub, as BuildKit addresses it.
				{Name: "external:registry-1.docker.io:443", Listen: "127.0.1.2:443", Host: "registry-1.docker.io"},
				{Name: "external:ghcr.io:443", Listen: "127.0.1.3:443", Host: "ghcr.io"},
				{Name: "external:registry.example.com:5443", Listen: "127.0.1.4:5443", Host: "registry.example.com"},
			},
		},
		"kiln by host name": {
			job: runtime.Job{
				Registry:           "kiln.example.com:7070",
				InsecureRegistries: []string{"kiln.example.com:7070", "plain.example.com"},
				Solve: solve.Request{
					// 127.0.0.1:7070 is not kiln's name here: on the host
					// it is whatever listens there.
					Push:         []string{"kiln.example.com:7070/app:1", "127.0.0.1:7070/other:1", "kiln.example.com:5000/app:1"},
					CacheImports: []string{"plain.example.com/cache:x"},
				},
			},
			want: []guest.Tunnel{
				{Name: "external:127.0.0.1:7070", Listen: "127.0.0.1:7070"},
				{Name: "external:kiln.example.com:5000", Listen: "127.0.1.1:5000", Host: "kiln.example.com"},
				{Name: "registry", Listen: "127.0.1.1:7070", Host: "kiln.example.com"},
				// An insecure registry without a port is plain HTTP on 80.
				{Name: "external:plain.example.com:80", Listen: "127.0.1.2:80", Host: "plain.example.com"},
			},
		},
		"no kiln registry given: every host is kiln's": {
			job: runtime.Job{
				Solve: solve.Request{Push: []string{"127.0.0.1:7070/app:1", "other.example.com:5000/app:1"}},
			},
			want: []guest.Tunnel{
				{Name: "registry", Listen: "127.0.0.1:7070"},
				{Name: "registry", Listen: "127.0.1.1:5000", Host: "other.example.com"},
			},
		},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := registryTunnels(tc.job)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("tunnels:\n got %+v\nwant %+v", got, tc.want)
			}
			// The builder has a dialer for every tunnel, external ones to
			// the host:port the name carries.
			dialers := registryDialers(got, "127.0.0.1:1", nil)
			var names []string
			for _, tun := range got {
				if dialers[tun.Name] == nil {
					t.Errorf("no host-side dialer for tunnel %q", tun.Name)
				}
				names = append(names, tun.Name)
			}
			for n := range dialers {
				if n != "registry" && !slices.Contains(names, n) {
					t.Errorf("dialer %q for no tunnel", n)
				}
			}
		})
	}
}

// Registries the guest cannot listen for are refused before anything
// boots, with an error that says what to do.
func TestRegistryTunnelsRefuseWhatTheGuestCannotOwn(t *testing.T) {
	for name, tc := range map[string]struct {
		job  runtime.Job
		want []string
	}{
		"kiln without a port": {
			job:  runtime.Job{Registry: "kiln.example.com", Solve: solve.Request{Push: []string{"kiln.example.com/app:1"}}},
			want: []string{`"kiln.example.com"`, "not host:port", "registry_host"},
		},
		"legacy: any host without a port": {
			job:  runtime.Job{Solve: solve.Request{Push: []string{"ghcr.io/acme/app:1"}}},
			want: []string{`"ghcr.io"`, "not host:port", "registry_host"},
		},
		"kiln on a LAN IP": {
			job:  runtime.Job{Registry: "192.168.1.10:7070", InsecureRegistries: []string{"192.168.1.10:7070"}},
			want: []string{`"192.168.1.10:7070"`, "kiln's own registry", "cannot own the IP 192.168.1.10", "loopback IP:port", "registry_host"},
		},
		"external registry on a LAN IP": {
			job: runtime.Job{Registry: "127.0.0.1:7070", Solve: solve.Request{
				Push: []string{"127.0.0.1:7070/app:1", "10.1.2.3:5000/team/app:1"}}},
			want: []string{`external registry "10.1.2.3:5000"`, "reference 10.1.2.3:5000/team/app:1", "cannot own a non-loopback IP", "host name (registry.example.com:5000)"},
		},
		"external registry on a public IPv6 without a port": {
			job: runtime.Job{Registry: "127.0.0.1:7070", Solve: solve.Request{
				CacheImports: []string{"[2001:db8::1]/cache:x"}}},
			want: []string{`external registry "[2001:db8::1]"`, "by the IP 2001:db8::1", "host name (registry.example.com:443)"},
		},
		"not a host": {
			job:  runtime.Job{Registry: "127.0.0.1:7070", InsecureRegistries: []string{"a:b:c"}},
			want: []string{`"a:b:c"`, "insecure registries", "not a registry host[:port]"},
		},
		"bad reference": {
			job:  runtime.Job{Registry: "127.0.0.1:7070", Solve: solve.Request{Push: []string{"Not A Ref"}}},
			want: []string{`"Not A Ref"`},
		},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := registryTunnels(tc.job)
			if err == nil {
				t.Fatalf("no error; tunnels %+v", got)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

const sha = "0000000000000000000000000000000000000000000000000000000000000000"

// An allow-list builder's buildkitd reaches every registry it has a tunnel
// for by name without the egress proxy: the host names are its NoProxy,
// in the setup the agent starts buildkitd with, the same for every build
// of the shape. Builders without the proxy have none.
func TestAllowListBuilderSendsTunnelledRegistryNamesAroundTheProxy(t *testing.T) {
	vol := filepath.Join(t.TempDir(), "vol.ext4")
	if err := os.WriteFile(vol, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r := &Runtime{log: slog.Default()}
	mk := func(id, network string, allowed ...string) runtime.Job {
		return runtime.Job{
			BuildID:            id,
			Volume:             vol,
			Network:            network,
			AllowedDomains:     allowed,
			Registry:           "kiln.example.com:7070",
			InsecureRegistries: []string{"kiln.example.com:7070"},
			Solve: solve.Request{
				ContextDir:   t.TempDir(),
				Push:         []string{"kiln.example.com:7070/builds/" + id + ":latest", "ghcr.io/acme/app:1", "127.0.0.1:5000/team/app:1", "kiln.example.com:5000/x:1"},
				CacheImports: []string{"Cache.Example.com/acme/cache:x"},
			},
		}
	}
	setupOf := func(j runtime.Job) guest.Setup {
		t.Helper()
		gjob, _, err := r.guestJob(j)
		if err != nil {
			t.Fatal(err)
		}
		n, err := r.buildNetwork(j, gjob.Tunnels, progress.Discard, slog.Default())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(n.stop)
		gjob = (&builder{netw: n}).withNetwork(gjob)
		if gjob.Proxy != "" {
			// Only names: loopback IPs bypass a proxy anyway.
			for _, h := range gjob.NoProxy {
				if _, err := netip.ParseAddr(h); err == nil || strings.Contains(h, ":") {
					t.Errorf("NoProxy holds %q, not a host name", h)
				}
			}
		}
		return gjob.Setup()
	}

	s1 := setupOf(mk("b1", "egress", "example.org"))
	if want := []string{"cache.example.com", "ghcr.io", "kiln.example.com"}; !reflect.DeepEqual(s1.NoProxy, want) {
		t.Errorf("NoProxy = %v, want %v", s1.NoProxy, want)
	}
	if s1.Proxy != "http://"+egressListen {
		t.Errorf("Proxy = %q", s1.Proxy)
	}
	// A builder's next build must present the same setup.
	if s2 := setupOf(mk("b2", "egress", "example.org")); !reflect.DeepEqual(s1, s2) {
		t.Errorf("two builds of one shape have different setups:\n%+v\n%+v", s1, s2)
	}
	for _, network := range []string{"isolated", "egress"} {
		if s := setupOf(mk("b3", network)); s.Proxy != "" || s.NoProxy != nil {
			t.Errorf("%s without allowed domains: proxy %q, no-proxy %v", network, s.Proxy, s.NoProxy)
		}
	}
}

// An external registry allowed by a wildcard is dialed at public
// addresses only: named so that it resolves to the server's own networks
// (here loopback, through "localhost"), it reaches nothing. Listed by
// host:port (or as localhost), the same registry is reached.
func TestExternalRegistryDialersReachPrivateAddressesOnlyWhenListed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	tunnels, err := registryTunnels(runtime.Job{Registry: "127.0.0.1:7070",
		Solve: solve.Request{Push: []string{"127.0.0.1:7070/app:1", "localhost:" + port + "/team/app:1"}}})
	if err != nil {
		t.Fatal(err)
	}
	name := externalTunnel + "127.0.0.1:" + port
	for _, c := range []struct {
		allowed []string
		ok      bool
	}{
		{nil, false},
		{[]string{"*"}, false},
		{[]string{"registry.example.com:" + port}, false},
		{[]string{"127.0.0.1:" + port}, true},
		{[]string{"localhost:" + port}, true},
		{[]string{"localhost"}, true},
	} {
		dial := registryDialers(tunnels, "127.0.0.1:1", c.allowed)[name]
		if dial == nil {
			t.Fatalf("no dialer for %s among %v", name, tunnels)
		}
		conn, err := dial(context.Background())
		if conn != nil {
			conn.Close()
		}
		switch {
		case c.ok && err != nil:
			t.Errorf("allowed %v: %v, want the registry reached", c.allowed, err)
		case !c.ok && (err == nil || !errors.Is(err, errdefs.ErrForbidden)):
			t.Errorf("allowed %v: %v, want a forbidden error for a private address", c.allowed, err)
		}
	}
}
