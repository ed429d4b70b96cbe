package test

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/testkit"
)

// dockerConfig writes a docker config.json with auths for host and points
// DOCKER_CONFIG (which the CLI reads, as docker does) at it.
func dockerConfig(t *testing.T, host, user, pass string) {
	t.Helper()
	dir := t.TempDir()
	auth := ""
	if user != "" {
		auth = fmt.Sprintf(`{"auths":{"http://%s/":{"auth":"%s"}}}`, host, base64.StdEncoding.EncodeToString([]byte(user+":"+pass)))
	} else {
		auth = `{"auths":{}}`
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(auth), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", dir)
}

// remoteDigest is the digest the registry at host serves for repo:tag,
// with basic auth, or "" when it has none.
func remoteDigest(t *testing.T, host, user, pass, repo, tag string) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodHead, "http://"+host+"/v2/"+repo+"/manifests/"+tag, nil)
	req.SetBasicAuth(user, pass)
	req.Header.Set("Accept", "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return ""
	}
	return resp.Header.Get("Docker-Content-Digest")
}

// kiln build --push sends a name on another registry there, with the
// credentials of the user's docker config, held by the server in memory
// only; without --push such a name is refused, and without credentials
// the push fails saying so.
func TestPushToAnotherRegistryWithDockerConfigCredentials(t *testing.T) {
	const user, pass = "ci-bot", "pw-never-logged-7f3a"
	other := testkit.RegistryWithAuth(t, user, pass)
	// A registry on loopback is reachable only when listed by host:port.
	refused := startServer(t)
	rtok := refused.token("dev", "dev", "build:read", "build:write", "image:read")
	if _, stderr, code := refused.kilnSplit(rtok, nil, "build", "--push", "-t", other+"/team/app:0", testkit.ContextDir(t, map[string]string{"Dockerfile": "FROM scratch\n"})); code != 1 || !strings.Contains(stderr, "registries.allowed") {
		t.Errorf("a loopback registry matched by the default *: exit %d\n%s", code, stderr)
	}
	refused.stop()

	s := startServer(t, withArgs("--registries-allowed", "*,"+other))
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	dir := testkit.ContextDir(t, map[string]string{
		"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo pushed > /marker\n", base),
	})
	name := other + "/team/app:1"

	dockerConfig(t, other, user, pass)
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "plain", "-t", name, dir); code != 1 || !strings.Contains(stderr, "--push") {
		t.Errorf("a name on another registry without --push: exit %d, want 1 and a hint to add --push\n%s", code, stderr)
	}

	meta := filepath.Join(t.TempDir(), "meta.json")
	stdout, stderr, code := s.kilnSplit(tok, nil, "build", "-q", "--push", "--metadata-file", meta, "-t", name, "-t", "app:1", dir)
	if code != 0 {
		t.Fatalf("kiln build --push: exit %d\n%s", code, stderr)
	}
	digest := strings.TrimSpace(stdout)
	if got := remoteDigest(t, other, user, pass, "team/app", "1"); got != digest {
		t.Errorf("the other registry has team/app:1 at %q, want the build's digest %q", got, digest)
	}
	if m := readOut(t, meta); !strings.Contains(m, name) {
		t.Errorf("metadata image.name does not list %s:\n%s", name, m)
	}
	if out, code := s.kiln(tok, "images", "ls"); code != 0 || !strings.Contains(out, "app") {
		t.Errorf("the result is not in kiln's registry as app:1 too:\n%s", out)
	}

	// No credentials: the registry refuses, and the build says so.
	dockerConfig(t, other, "", "")
	_, stderr, code = s.kilnSplit(tok, nil, "build", "--progress", "plain", "--push", "-t", other+"/team/app:2", dir)
	if code != 1 || !strings.Contains(strings.ToLower(stderr), "unauthorized") {
		t.Errorf("push without credentials: exit %d, want 1 and an unauthorized error\n%s", code, stderr)
	}
	if remoteDigest(t, other, user, pass, "team/app", "2") != "" {
		t.Error("team/app:2 is in the other registry although no credentials were given")
	}
	if strings.Contains(s.logs(), pass) {
		t.Error("the server log holds the registry password")
	}
}

// --cache-to exports a build's cache to a registry and --cache-from
// imports it into a fresh scope, whose build then runs nothing: every
// step is CACHED. Both kiln's registry and another one work; kiln's
// holds a tenant's caches in its namespace, which other tenants cannot
// read.
func TestRegistryCacheMovesBetweenScopes(t *testing.T) {
	const user, pass = "cache-bot", "pw-cache-91c2"
	other := testkit.RegistryWithAuth(t, user, pass)
	s := startServer(t, withArgs("--registries-allowed", other))
	base := s.base()
	dockerConfig(t, other, user, pass)
	for _, c := range []struct{ name, scope, to, from string }{
		{"other registry", "other", "type=registry,ref=" + other + "/cache/app:c,mode=max", "type=registry,ref=" + other + "/cache/app:c"},
		{"kiln's registry", "kiln", "type=registry,ref=app-cache:c", "app-cache:c"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := testkit.ContextDir(t, map[string]string{
				"Dockerfile": fmt.Sprintf("FROM %s\nCOPY data.txt /data.txt\nRUN cat /proc/sys/kernel/random/uuid > /stamp\n", base),
				"data.txt":   "cache me through " + c.name,
			})
			// Two cache scopes of tenant teama: separate volumes.
			first := s.token("dev", "teama."+c.scope+"1", "build:read", "build:write", "image:read")
			second := s.token("dev", "teama."+c.scope+"2", "build:read", "build:write", "image:read")
			out1 := t.TempDir()
			if _, stderr, code := s.kilnSplit(first, nil, "build", "--progress", "plain", "--cache-to", c.to, "-o", "type=local,dest="+out1, dir); code != 0 {
				t.Fatalf("build with --cache-to: exit %d\n%s", code, stderr)
			}
			out2 := t.TempDir()
			_, stderr, code := s.kilnSplit(second, nil, "build", "--progress", "plain", "--cache-from", c.from, "-o", "type=local,dest="+out2, dir)
			if code != 0 {
				t.Fatalf("build with --cache-from in a fresh scope: exit %d\n%s", code, stderr)
			}
			if !strings.Contains(stderr, "CACHED") {
				t.Errorf("the fresh scope's build shows no CACHED step:\n%s", stderr)
			}
			if a, b := readOut(t, filepath.Join(out1, "stamp")), readOut(t, filepath.Join(out2, "stamp")); a != b {
				t.Errorf("the RUN step ran again in the fresh scope (stamp %q, then %q)", a, b)
			}
		})
	}

	// Another tenant cannot import team-a's cache from kiln's registry.
	tokB := s.token("eve", "teamb", "build:read", "build:write", "image:read")
	dir := testkit.ContextDir(t, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN true\n", base)})
	if _, stderr, code := s.kilnSplit(tokB, nil, "build", "--progress", "plain", "--cache-from", "teama/app-cache:c", dir); code != 1 || !strings.Contains(stderr, "teama/app-cache") {
		t.Errorf("another tenant imported the cache: exit %d\n%s", code, stderr)
	}
}
