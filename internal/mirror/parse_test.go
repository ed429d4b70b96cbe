package mirror

import (
	"reflect"
	"strings"
	"testing"

	v1 "github.com/opencontainers/image-spec/specs-go/v1"
)

const testDigest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestParseImageNormalizesLikeDocker(t *testing.T) {
	for _, tc := range []struct {
		ref, upstream, host, path, tag, local, contextName string
	}{
		{"node:22", "docker.io/library/node:22", "docker.io", "library/node", "22", "mirror/docker.io/library/node", "node:22"},
		{"node", "docker.io/library/node:latest", "docker.io", "library/node", "latest", "mirror/docker.io/library/node", "node"},
		{"node:latest", "docker.io/library/node:latest", "docker.io", "library/node", "latest", "mirror/docker.io/library/node", "node"},
		{"docker.io/library/node:22", "docker.io/library/node:22", "docker.io", "library/node", "22", "mirror/docker.io/library/node", "node:22"},
		{"index.docker.io/library/node:22", "docker.io/library/node:22", "docker.io", "library/node", "22", "mirror/docker.io/library/node", "node:22"},
		{"bitnami/redis:7", "docker.io/bitnami/redis:7", "docker.io", "bitnami/redis", "7", "mirror/docker.io/bitnami/redis", "bitnami/redis:7"},
		{"ghcr.io/org/img:tag", "ghcr.io/org/img:tag", "ghcr.io", "org/img", "tag", "mirror/ghcr.io/org/img", "ghcr.io/org/img:tag"},
		{"registry.example.com:5000/x/y", "registry.example.com:5000/x/y:latest", "registry.example.com:5000", "x/y", "latest", "mirror/registry.example.com_5000/x/y", "registry.example.com:5000/x/y"},
		{"Registry.Example.com/x:1", "Registry.Example.com/x:1", "registry.example.com", "x", "1", "mirror/registry.example.com/x", "Registry.Example.com/x:1"},
		{"localhost:5000/app:v1", "localhost:5000/app:v1", "localhost:5000", "app", "v1", "mirror/localhost_5000/app", "localhost:5000/app:v1"},
		{"registry.example.com/x@" + testDigest, "registry.example.com/x@" + testDigest, "registry.example.com", "x", "", "mirror/registry.example.com/x", "registry.example.com/x@" + testDigest},
		{"node:22@" + testDigest, "docker.io/library/node:22@" + testDigest, "docker.io", "library/node", "22", "mirror/docker.io/library/node", "node:22@" + testDigest},
	} {
		img, err := parseImage(tc.ref)
		if err != nil {
			t.Errorf("parseImage(%q): %v", tc.ref, err)
			continue
		}
		got := []string{img.named.String(), img.host, img.path, img.tag, img.local}
		want := []string{tc.upstream, tc.host, tc.path, tc.tag, tc.local}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("parseImage(%q) = %q, want %q", tc.ref, got, want)
		}
		p := Pinned{Upstream: img.named.String()}
		if cn := p.ContextName(); cn != tc.contextName {
			t.Errorf("%q: ContextName = %q, want %q", tc.ref, cn, tc.contextName)
		}
	}
	for _, bad := range []string{"", "Node:22", "node:22:23", "[::1]:5000/x:1", "ghcr.io/org/img@sha256:short"} {
		if img, err := parseImage(bad); err == nil {
			t.Errorf("parseImage(%q) accepted: %+v", bad, img)
		}
	}
}

func TestLocalRepoKeepsHostsApart(t *testing.T) {
	a, _ := localRepo("reg.example.com:5000", "x")
	b, _ := localRepo("reg.example.com", "5000/x")
	if a == b {
		t.Fatalf("host:port and host/port-path share local repo %s", a)
	}
}

func TestParseChallenges(t *testing.T) {
	got := parseChallenges([]string{
		`Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/node:pull,push"`,
		`Basic realm="x", Bearer realm="https://ghcr.io/token", service=ghcr.io`,
		`Basic realm="say \"hi\""`,
	})
	want := []challenge{
		{"bearer", map[string]string{"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:library/node:pull,push"}},
		{"basic", map[string]string{"realm": "x"}},
		{"bearer", map[string]string{"realm": "https://ghcr.io/token", "service": "ghcr.io"}},
		{"basic", map[string]string{"realm": `say "hi"`}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("parseChallenges = %+v\nwant %+v", got, want)
	}
}

func TestNormalizeHostMapsDockerHubSpellings(t *testing.T) {
	for in, want := range map[string]string{
		"docker.io": "docker.io", "index.docker.io": "docker.io", "https://index.docker.io/v1/": "docker.io",
		"registry-1.docker.io": "docker.io", "GHCR.io": "ghcr.io", "127.0.0.1:5000": "127.0.0.1:5000",
	} {
		if got, err := normalizeHost(in); err != nil || got != want {
			t.Errorf("normalizeHost(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestPlatformMatching(t *testing.T) {
	for _, tc := range []struct {
		want string
		have v1.Platform
		ok   bool
	}{
		{"linux/amd64", v1.Platform{OS: "linux", Architecture: "amd64"}, true},
		{"linux/x86_64", v1.Platform{OS: "linux", Architecture: "amd64"}, true},
		{"linux/arm64", v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}, true},
		{"linux/arm64/v8", v1.Platform{OS: "linux", Architecture: "arm64"}, true},
		{"linux/arm/v7", v1.Platform{OS: "linux", Architecture: "arm", Variant: "v6"}, false},
		{"linux/amd64", v1.Platform{OS: "unknown", Architecture: "unknown"}, false},
		{"linux/amd64", v1.Platform{OS: "windows", Architecture: "amd64"}, false},
	} {
		p, err := parsePlatform(tc.want)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.matches(&tc.have); got != tc.ok {
			t.Errorf("%s matches %+v = %v, want %v", tc.want, tc.have, got, tc.ok)
		}
	}
}

func TestManifestMediaType(t *testing.T) {
	if mt, err := manifestMediaType("application/json", []byte(`{"schemaVersion":2,"config":{},"layers":[]}`)); err != nil || mt != v1.MediaTypeImageManifest {
		t.Errorf("untyped OCI manifest: %q, %v", mt, err)
	}
	if _, err := manifestMediaType("application/vnd.docker.distribution.manifest.v1+prettyjws", []byte(`{"schemaVersion":1}`)); err == nil || !strings.Contains(err.Error(), "schema 1") {
		t.Errorf("schema1: %v", err)
	}
}
