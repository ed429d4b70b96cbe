package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/internal/access"
	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/errdefs"
)

const skopeoPath = "/usr/bin/skopeo"

// testPolicy is kiln's access policy with base/ shared and one build,
// b1, of tenant app, the tenant of every token e.token mints.
func testPolicy(t testing.TB) *access.Policy {
	p, err := access.New(access.Config{Shared: []string{"base"}}, access.OwnersFunc(func(_ context.Context, id string) (string, bool, error) {
		switch id {
		case "b1", "b3":
			return "app", true, nil
		}
		return "", false, errdefs.ErrNotFound
	}))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

type testEnv struct {
	t         *testing.T
	reg       *Registry
	authority *auth.Authority
	host      string // 127.0.0.1:port
	url       string
	scratch   string // HOME for skopeo and the policy file
}

func startRegistry(t *testing.T) *testEnv {
	t.Helper()
	a, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	reg, err := New(ctx, Config{
		RootDir:   filepath.Join(t.TempDir(), "registry"),
		Authority: a,
		Grant:     testPolicy(t).GrantRegistry,
		Service:   "kiln",
		TokenPath: "/v2/token",
		Logger:    slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	srv := httptest.NewServer(reg)
	t.Cleanup(srv.Close)

	scratch := t.TempDir()
	policy := `{"default":[{"type":"insecureAcceptAnything"}]}`
	if err := os.WriteFile(filepath.Join(scratch, "policy.json"), []byte(policy), 0o644); err != nil {
		t.Fatal(err)
	}
	return &testEnv{t: t, reg: reg, authority: a, host: strings.TrimPrefix(srv.URL, "http://"), url: srv.URL, scratch: scratch}
}

func (e *testEnv) token(scopes []auth.Scope, ttl time.Duration, access []auth.Access) string {
	e.t.Helper()
	return e.issue(auth.TokenSpec{Subject: "test-" + string(scopes[0]), Scopes: scopes, Namespace: "app", TTL: ttl, Access: access})
}

func (e *testEnv) issue(spec auth.TokenSpec) string {
	e.t.Helper()
	tok, err := e.authority.Issue(spec)
	if err != nil {
		e.t.Fatal(err)
	}
	return tok.Token
}

// skopeo runs skopeo with a clean HOME so no stored credentials leak in.
func (e *testEnv) skopeo(args ...string) (string, error) {
	e.t.Helper()
	if _, err := os.Stat(skopeoPath); err != nil {
		e.t.Skipf("skopeo not installed at %s (apt-get install -y skopeo): %v", skopeoPath, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, skopeoPath, append([]string{"--policy", filepath.Join(e.scratch, "policy.json")}, args...)...)
	cmd.Env = []string{"HOME=" + e.scratch, "XDG_RUNTIME_DIR=" + e.scratch, "PATH=/usr/bin:/bin"}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (e *testEnv) ref(repoTag string) string { return "docker://" + e.host + "/" + repoTag }

func (e *testEnv) push(img testImage, tag, dst, token string, extra ...string) (string, error) {
	args := append([]string{"copy", "--dest-tls-verify=false", "--dest-creds", "kiln:" + token}, extra...)
	return e.skopeo(append(args, "oci:"+img.dir+":"+tag, e.ref(dst))...)
}

func (e *testEnv) mustPush(img testImage, tag, dst, token string, extra ...string) {
	e.t.Helper()
	if out, err := e.push(img, tag, dst, token, extra...); err != nil {
		e.t.Fatalf("push %s to %s: %v\n%s", tag, dst, err, out)
	}
}

func (e *testEnv) inspect(repoTag, token string) (digest.Digest, string, error) {
	args := []string{"inspect", "--tls-verify=false"}
	if token != "" {
		args = append(args, "--creds", "kiln:"+token)
	} else {
		args = append(args, "--no-creds")
	}
	out, err := e.skopeo(append(args, e.ref(repoTag))...)
	if err != nil {
		return "", out, err
	}
	var res struct{ Digest digest.Digest }
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return "", out, fmt.Errorf("parse skopeo inspect output: %w", err)
	}
	return res.Digest, out, nil
}

// pullAll copies repoTag out of the registry, fetching every blob, and
// returns the layer blob's content path in the local layout.
func (e *testEnv) pullAll(repoTag, token string, extra ...string) (string, error) {
	dir := filepath.Join(e.t.TempDir(), "pulled")
	args := append([]string{"copy", "--src-tls-verify=false", "--src-creds", "kiln:" + token}, extra...)
	out, err := e.skopeo(append(args, e.ref(repoTag), "oci:"+dir+":out")...)
	if err != nil {
		return out, err
	}
	return dir, nil
}

func TestChallengePointsAtTokenEndpoint(t *testing.T) {
	e := startRegistry(t)
	get := func(path, host, bearer string) *http.Response {
		req, _ := http.NewRequest(http.MethodGet, e.url+path, nil)
		if host != "" {
			req.Host = host
		}
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}

	resp := get("/v2/", "", "")
	want := fmt.Sprintf(`Bearer realm="http://%s/v2/token",service="kiln"`, e.host)
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != want {
		t.Fatalf("GET /v2/: %d %q, want 401 %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), want)
	}
	resp = get("/v2/app/web/manifests/latest", "kiln.example:8443", "")
	want = `Bearer realm="http://kiln.example:8443/v2/token",service="kiln",scope="repository:app/web:pull"`
	if got := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != 401 || got != want {
		t.Fatalf("manifest GET via another host: %d %q, want %q", resp.StatusCode, got, want)
	}

	// A kiln token is not a registry token.
	admin := e.token([]auth.Scope{auth.ScopeBuildAdmin}, time.Hour, nil)
	resp = get("/v2/", "", admin)
	if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Fatalf("kiln token used as registry token: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}

	// The token endpoint is reachable at the realm, through the registry handler.
	req, _ := http.NewRequest(http.MethodGet, e.url+"/v2/token?service=kiln&scope=repository:app/web:pull", nil)
	req.SetBasicAuth("kiln", admin)
	tr, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var body struct{ Token string }
	json.NewDecoder(tr.Body).Decode(&body)
	tr.Body.Close()
	if tr.StatusCode != 200 || body.Token == "" {
		t.Fatalf("token endpoint: %d", tr.StatusCode)
	}
	if resp = get("/v2/", "", body.Token); resp.StatusCode != 200 {
		t.Fatalf("GET /v2/ with registry token: %d", resp.StatusCode)
	}
	resp = get("/v2/other/repo/tags/list", "", body.Token)
	if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="insufficient_scope"`) {
		t.Fatalf("token for app/web used on other/repo: %d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
	}
}

func TestSkopeoPushPullAndPolicy(t *testing.T) {
	e := startRegistry(t)
	img := writeTestImage(t, "hello from kiln\n")

	writer := e.token([]auth.Scope{auth.ScopeImageRead, auth.ScopeImageWrite}, time.Hour, nil)
	reader := e.token([]auth.Scope{auth.ScopeImageRead}, time.Hour, nil)
	admin := e.token([]auth.Scope{auth.ScopeBuildAdmin}, time.Hour, nil)
	perBuild := e.issue(auth.TokenSpec{Subject: "build:b1", Scopes: []auth.Scope{auth.ScopeImageWrite}, Namespace: "app", TTL: time.Hour, Build: "b1",
		Access: []auth.Access{
			{Repository: "builds/b1", Actions: []string{"pull", "push"}},
			{Repository: "app/*", Actions: []string{"pull"}},
		}})
	adminBuild := e.issue(auth.TokenSpec{Subject: "build:b3", Scopes: []auth.Scope{auth.ScopeBuildAdmin}, Namespace: "admin", TTL: time.Hour, Build: "b3",
		Access: []auth.Access{{Repository: "cache/global/*", Actions: []string{"pull", "push"}}}})

	e.mustPush(img, "v1", "app/hello:v1", writer)

	t.Run("read token inspects", func(t *testing.T) {
		d, out, err := e.inspect("app/hello:v1", reader)
		if err != nil {
			t.Fatalf("inspect: %v\n%s", err, out)
		}
		if d != img.manifest {
			t.Fatalf("registry reports digest %s, pushed manifest is %s", d, img.manifest)
		}
	})
	t.Run("read token pulls every blob", func(t *testing.T) {
		dir, err := e.pullAll("app/hello:v1", reader)
		if err != nil {
			t.Fatalf("pull: %v\n%s", err, dir)
		}
		if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", img.layer.Encoded())); err != nil {
			t.Fatalf("pulled layout lacks the layer: %v", err)
		}
	})
	t.Run("no credentials fail", func(t *testing.T) {
		if _, out, err := e.inspect("app/hello:v1", ""); err == nil {
			t.Fatalf("anonymous inspect succeeded:\n%s", out)
		}
	})
	t.Run("expired token fails", func(t *testing.T) {
		issued := time.Now()
		shortLived := e.token([]auth.Scope{auth.ScopeImageRead}, 3*time.Second, nil)
		if _, out, err := e.inspect("app/hello:v1", shortLived); err != nil {
			t.Fatalf("inspect with fresh short-lived token: %v\n%s", err, out)
		}
		// exp has one-second granularity, so wait a second past the ttl.
		time.Sleep(time.Until(issued.Add(4100 * time.Millisecond)))
		_, out, err := e.inspect("app/hello:v1", shortLived)
		if err == nil {
			t.Fatalf("inspect with expired token succeeded:\n%s", out)
		}
		if !strings.Contains(out, "expired") {
			t.Errorf("skopeo output does not say the token expired:\n%s", out)
		}
	})
	t.Run("bad token fails", func(t *testing.T) {
		if _, out, err := e.inspect("app/hello:v1", reader[:len(reader)-4]+"AAAA"); err == nil {
			t.Fatalf("inspect with forged token succeeded:\n%s", out)
		}
	})
	t.Run("read token cannot push", func(t *testing.T) {
		if out, err := e.push(img, "v1", "app/hello:stolen", reader); err == nil {
			t.Fatalf("push with image:read succeeded:\n%s", out)
		}
		if _, err := e.reg.Resolve(context.Background(), "app/hello", "stolen"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("tag appeared after refused push: %v", err)
		}
	})
	t.Run("global cache is written only by builds of build:admin", func(t *testing.T) {
		if out, err := e.push(img, "v1", "cache/global/base:1", writer); err == nil {
			t.Fatalf("image:write pushed to cache/global:\n%s", out)
		}
		if out, err := e.push(img, "v1", "cache/global/base:1", admin); err == nil {
			t.Fatalf("build:admin pushed to cache/global outside a build:\n%s", out)
		}
		e.mustPush(img, "v1", "cache/global/base:1", adminBuild)
		if d, _ := e.reg.Resolve(context.Background(), "cache/global/base", "1"); d != img.manifest.String() {
			t.Fatalf("admin push to cache/global: resolved %q", d)
		}
	})
	t.Run("per-build token pushes only its repos", func(t *testing.T) {
		e.mustPush(img, "v1", "builds/b1:out", perBuild)
		if out, err := e.push(img, "v1", "builds/b2:out", perBuild); err == nil {
			t.Fatalf("per-build token pushed to another build's repo:\n%s", out)
		}
		if out, err := e.push(img, "v1", "app/hello:v2", perBuild); err == nil {
			t.Fatalf("per-build token pushed to a pull-only repo:\n%s", out)
		}
		if d, out, err := e.inspect("app/hello:v1", perBuild); err != nil || d != img.manifest {
			t.Fatalf("per-build token cannot pull app/*: %v\n%s", err, out)
		}
		if _, out, err := e.inspect("builds/b1:out", reader); err != nil {
			t.Fatalf("read token cannot see the build's push: %v\n%s", err, out)
		}
	})
}

func TestHelpers(t *testing.T) {
	e := startRegistry(t)
	ctx := context.Background()

	repos, err := e.reg.Catalog(ctx)
	if err != nil || len(repos) != 0 {
		t.Fatalf("empty registry catalog: %v, %v", repos, err)
	}

	img := writeTestImage(t, "helpers\n")
	writer := e.token([]auth.Scope{auth.ScopeImageWrite}, time.Hour, nil)
	reader := e.token([]auth.Scope{auth.ScopeImageRead}, time.Hour, nil)
	e.mustPush(img, "v1", "app/hello:v1", writer)
	e.mustPush(img, "multi", "app/hello:multi", writer, "--all")

	d, err := e.reg.Resolve(ctx, "app/hello", "v1")
	if err != nil || d != img.manifest.String() {
		t.Fatalf("Resolve v1 = %q, %v; want %s", d, err, img.manifest)
	}
	if d, _ = e.reg.Resolve(ctx, "app/hello", "multi"); d != img.index.String() {
		t.Fatalf("Resolve multi = %q, want index %s", d, img.index)
	}
	for _, c := range [][2]string{{"app/hello", "nope"}, {"nothere/x", "v1"}} {
		if _, err := e.reg.Resolve(ctx, c[0], c[1]); !errors.Is(err, ErrNotFound) {
			t.Errorf("Resolve %s:%s: %v, want ErrNotFound", c[0], c[1], err)
		}
	}
	if _, err := e.reg.Resolve(ctx, "Bad Name", "v1"); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("invalid repo name: %v, want a validation error", err)
	}

	mt, body, md, err := e.reg.Manifest(ctx, "app/hello", "v1")
	if err != nil || mt != v1.MediaTypeImageManifest || md != img.manifest.String() || !bytes.Equal(body, img.manifestBody) {
		t.Fatalf("Manifest v1 = %q %q %v; body equal %v", mt, md, err, bytes.Equal(body, img.manifestBody))
	}
	if mt, body, _, err = e.reg.Manifest(ctx, "app/hello", img.index.String()); err != nil || mt != v1.MediaTypeImageIndex || !bytes.Equal(body, img.indexBody) {
		t.Fatalf("Manifest by index digest = %q, %v", mt, err)
	}
	if _, _, _, err = e.reg.Manifest(ctx, "app/hello", digest.FromString("absent").String()); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Manifest of absent digest: %v", err)
	}

	// A new repository gets the image under a second name and pulls in full.
	if err := e.reg.Tag(ctx, "app/hello", "v1", "app/promoted", "stable"); err != nil {
		t.Fatal(err)
	}
	if d, _ = e.reg.Resolve(ctx, "app/promoted", "stable"); d != img.manifest.String() {
		t.Fatalf("app/promoted:stable resolves to %q", d)
	}
	if out, err := e.pullAll("app/promoted:stable", reader); err != nil {
		t.Fatalf("pull of cross-repo tag: %v\n%s", err, out)
	}

	// An index carries its child manifests along.
	if err := e.reg.Tag(ctx, "app/hello", "multi", "app/multi", "all"); err != nil {
		t.Fatal(err)
	}
	if out, err := e.pullAll("app/multi:all", reader, "--all"); err != nil {
		t.Fatalf("pull of cross-repo index: %v\n%s", err, out)
	}

	// Same-repo alias and tagging by digest.
	if err := e.reg.Tag(ctx, "app/hello", img.manifest.String(), "app/hello", "alias"); err != nil {
		t.Fatal(err)
	}
	if d, _ = e.reg.Resolve(ctx, "app/hello", "alias"); d != img.manifest.String() {
		t.Fatalf("alias resolves to %q", d)
	}
	if err := e.reg.Tag(ctx, "app/hello", "nope", "app/promoted", "x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Tag of missing source: %v, want ErrNotFound", err)
	}
	if err := e.reg.Tag(ctx, "app/hello", "v1", "app/promoted", "-bad tag"); err == nil {
		t.Fatal("Tag accepted an invalid tag")
	}

	tags, err := e.reg.Tags(ctx, "app/hello")
	if want := []string{"alias", "multi", "v1"}; err != nil || !reflect.DeepEqual(tags, want) {
		t.Fatalf("Tags = %v, %v; want %v", tags, err, want)
	}
	if _, err := e.reg.Tags(ctx, "nothere/x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Tags of missing repo: %v", err)
	}
	repos, err = e.reg.Catalog(ctx)
	if want := []string{"app/hello", "app/multi", "app/promoted"}; err != nil || !reflect.DeepEqual(repos, want) {
		t.Fatalf("Catalog = %v, %v; want %v", repos, err, want)
	}

	// Deleting one name leaves the others working.
	if err := e.reg.DeleteTag(ctx, "app/promoted", "stable"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.reg.Resolve(ctx, "app/promoted", "stable"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted tag still resolves: %v", err)
	}
	if _, out, err := e.inspect("app/promoted:stable", reader); err == nil {
		t.Fatalf("deleted tag still served over HTTP:\n%s", out)
	}
	if d, out, err := e.inspect("app/hello:v1", reader); err != nil || d != img.manifest {
		t.Fatalf("original name broke after deleting another: %v\n%s", err, out)
	}
	if err := e.reg.DeleteTag(ctx, "app/promoted", "stable"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second DeleteTag: %v, want ErrNotFound", err)
	}
}
