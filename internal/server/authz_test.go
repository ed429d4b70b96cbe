package server_test

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	v2 "github.com/distribution/distribution/v3/registry/api/v2"
	v1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/server"
)

// The actors of the authorization matrix.
const (
	tenantA   = "A"      // namespace tenant-a: build:write, image:write
	tenantB   = "B"      // namespace tenant-b: the same
	imageOnly = "iw"     // namespace tenant-a: image:write only
	buildRead = "br"     // namespace tenant-a: build:read only
	admin     = "admin"  // the admin token (build:admin)
	anonymous = "nobody" // no token
)

var actors = []string{tenantA, tenantB, imageOnly, buildRead, admin, anonymous}

// matrix is one server with resources of both tenants, a shared
// namespace and kiln's own namespaces.
type matrix struct {
	*kiln
	tok            map[string]string
	buildA, buildB api.Build
}

func newMatrix(t *testing.T) *matrix {
	k := startKiln(t, "mirror/docker.io/library/alpine:3.20", "cache/global/k:cache", "cache/global/del:1")
	m := &matrix{kiln: k, tok: map[string]string{admin: k.admin}}
	m.tok[tenantA] = k.token("tenant-a", "build:write", "image:write")
	m.tok[tenantB] = k.token("tenant-b", "build:write", "image:write")
	m.tok[imageOnly] = k.token("tenant-a", "image:write")
	m.tok[buildRead] = k.token("tenant-a", "build:read")
	m.buildA = k.build(m.tok[tenantA], [2]string{"tags", "app:1"})
	m.buildB = k.build(m.tok[tenantB], [2]string{"tags", "app:1"})
	k.build(k.admin, [2]string{"tags", "base/img:1"}, [2]string{"tags", "rootapp:1"})
	return m
}

// apiCase is one request against one kind of resource. allow lists the
// actors that must get ok; everyone else must get a 4xx (401 without a
// token), and a refused request must change nothing. fresh makes the
// resource anew for each actor, so mutations never depend on each other.
type apiCase struct {
	route string
	what  string
	allow []string
	ok    int // 0: any status but a 4xx
	req   func(m *matrix, actor string) (method, path string, body io.Reader, ctype string)
	// unchanged, when set, checks after a refused request that the
	// resource is as it was.
	unchanged func(m *matrix, t *testing.T, path string)
	// header are request headers (name, value) besides the token's.
	header [][2]string
}

func get(path string) func(*matrix, string) (string, string, io.Reader, string) {
	return func(*matrix, string) (string, string, io.Reader, string) { return "GET", path, nil, "" }
}

func jsonBody(v any) io.Reader {
	b, _ := json.Marshal(v)
	return strings.NewReader(string(b))
}

func apiCases(m *matrix) []apiCase {
	all := []string{tenantA, tenantB, imageOnly, buildRead, admin}
	a := m.buildA.Id
	held := func(method, suffix string) func(*matrix, string) (string, string, io.Reader, string) {
		return func(m *matrix, _ string) (string, string, io.Reader, string) {
			b := m.build(m.tok[tenantA], [2]string{"build_args", `{"HOLD":"1"}`})
			return method, "/v1/builds/" + b.Id + suffix, nil, ""
		}
	}
	stillRunning := func(m *matrix, t *testing.T, path string) {
		id := strings.Split(path, "/")[3]
		var b api.Build
		m.json(m.admin, "GET", "/v1/builds/"+id, nil, http.StatusOK, &b)
		if b.Status != api.BuildStatusRunning {
			t.Errorf("refused cancel left build %s %s", id, b.Status)
		}
		m.json(m.admin, "POST", "/v1/builds/"+id+"/cancel", nil, http.StatusOK, nil)
	}
	freshName := func(src, prefix string) func(*matrix, string) (string, string, io.Reader, string) {
		return func(m *matrix, _ string) (string, string, io.Reader, string) {
			name := unique(prefix) + ":1"
			m.json(m.admin, "POST", "/v1/images/"+src+"/tags", map[string]string{"name": name}, http.StatusCreated, nil)
			return "DELETE", "/v1/images/" + name, nil, ""
		}
	}
	nameExists := func(m *matrix, t *testing.T, path string) {
		if code, body := m.call(m.admin, "GET", path, nil, ""); code != http.StatusOK {
			t.Errorf("a refused delete removed %s: %d %s", path, code, body)
		}
	}
	tagTo := func(src, prefix string) func(*matrix, string) (string, string, io.Reader, string) {
		return func(*matrix, string) (string, string, io.Reader, string) {
			return "POST", "/v1/images/" + src + "/tags", jsonBody(map[string]string{"name": unique(prefix) + ":1"}), "application/json"
		}
	}
	return []apiCase{
		{route: "GET /healthz", what: "health", allow: actors, ok: 200, req: get("/healthz")},
		{route: "GET /metrics", what: "metrics", allow: actors, ok: 200, req: get("/metrics")},

		{route: "POST /v1/builds", what: "submit", allow: []string{tenantA, tenantB, admin}, ok: 202,
			req: func(*matrix, string) (string, string, io.Reader, string) {
				body, ct := submission()
				return "POST", "/v1/builds", body, ct
			}},
		{route: "POST /v1/builds", what: "submit tagged into tenant-b", allow: []string{tenantB, admin}, ok: 202,
			req: func(*matrix, string) (string, string, io.Reader, string) {
				body, ct := submission([2]string{"tags", "tenant-b/" + unique("x") + ":1"})
				return "POST", "/v1/builds", body, ct
			}},
		{route: "POST /v1/builds", what: "submit tagged into the mirror", allow: nil,
			req: func(*matrix, string) (string, string, io.Reader, string) {
				body, ct := submission([2]string{"tags", "mirror/docker.io/library/alpine:3.20"})
				return "POST", "/v1/builds", body, ct
			}},
		{route: "GET /v1/builds", what: "list", allow: []string{tenantA, tenantB, buildRead, admin}, ok: 200, req: get("/v1/builds")},
		{route: "GET /v1/builds/{id}", what: "A's build", allow: []string{tenantA, buildRead, admin}, ok: 200, req: get("/v1/builds/" + a)},
		{route: "DELETE /v1/builds/{id}", what: "A's running build", allow: []string{tenantA, admin}, ok: 200, req: held("DELETE", ""), unchanged: stillRunning},
		{route: "POST /v1/builds/{id}/cancel", what: "A's running build", allow: []string{tenantA, admin}, ok: 200, req: held("POST", "/cancel"), unchanged: stillRunning},
		{route: "GET /v1/builds/{id}/events", what: "A's build", allow: []string{tenantA, buildRead, admin}, ok: 200, req: get("/v1/builds/" + a + "/events")},
		{route: "GET /v1/builds/{id}/logs", what: "A's build", allow: []string{tenantA, buildRead, admin}, ok: 200, req: get("/v1/builds/" + a + "/logs")},
		{route: "GET /v1/builds/{id}/output", what: "A's build", allow: []string{tenantA, admin}, req: get("/v1/builds/" + a + "/output")},
		// The build's own tenant only: an admin sees the build, yet may
		// not lend it an agent (403); another tenant gets 404.
		{route: "GET /v1/builds/{id}/ssh", what: "A's build waiting for its ssh session", allow: []string{tenantA}, ok: 101,
			header: [][2]string{{"Connection", "Upgrade"}, {"Upgrade", "kiln-ssh/1"}},
			req: func(m *matrix, _ string) (string, string, io.Reader, string) {
				b := m.submitAs(m.tok[tenantA], [2]string{"ssh", "default"}, [2]string{"build_args", `{"N":"` + unique("ssh") + `"}`})
				return "GET", "/v1/builds/" + b.Id + "/ssh", nil, ""
			},
			unchanged: func(m *matrix, t *testing.T, path string) {
				id := strings.Split(path, "/")[3]
				var b api.Build
				m.json(m.admin, "GET", "/v1/builds/"+id, nil, http.StatusOK, &b)
				if b.Status != api.BuildStatusQueued {
					t.Errorf("a refused ssh session left build %s %s (%s)", id, b.Status, b.Phase)
				}
				m.json(m.admin, "POST", "/v1/builds/"+id+"/cancel", nil, http.StatusOK, nil)
			}},

		{route: "GET /v1/images", what: "list", allow: []string{tenantA, tenantB, imageOnly, admin}, ok: 200, req: get("/v1/images")},
		{route: "GET /v1/images/{name...}", what: "A's image", allow: []string{tenantA, imageOnly, admin}, ok: 200, req: get("/v1/images/tenant-a/app:1")},
		{route: "GET /v1/images/{name...}", what: "A's build result", allow: []string{tenantA, imageOnly, admin}, ok: 200, req: get("/v1/images/builds/" + a + ":latest")},
		{route: "GET /v1/images/{name...}", what: "a shared image", allow: []string{tenantA, tenantB, imageOnly, admin}, ok: 200, req: get("/v1/images/base/img:1")},
		{route: "GET /v1/images/{name...}", what: "an admin's image", allow: []string{admin}, ok: 200, req: get("/v1/images/rootapp:1")},
		{route: "DELETE /v1/images/{name...}", what: "A's image", allow: []string{tenantA, imageOnly, admin}, ok: 204,
			req: freshName("tenant-a/app:1", "tenant-a/del"), unchanged: nameExists},
		{route: "DELETE /v1/images/{name...}", what: "a shared image", allow: []string{admin}, ok: 204,
			req: freshName("base/img:1", "base/del"), unchanged: nameExists},
		{route: "POST /v1/images/{name...}", what: "tag A's image in A's namespace", allow: []string{tenantA, imageOnly, admin}, ok: 201, req: tagTo("tenant-a/app:1", "tenant-a/t")},
		{route: "POST /v1/images/{name...}", what: "tag A's image into B's namespace", allow: []string{admin}, ok: 201, req: tagTo("tenant-a/app:1", "tenant-b/t")},
		{route: "POST /v1/images/{name...}", what: "tag into the shared namespace", allow: []string{admin}, ok: 201, req: tagTo("tenant-a/app:1", "base/t")},
		{route: "POST /v1/images/{name...}", what: "tag into the mirror", allow: nil, req: tagTo("tenant-a/app:1", "mirror/docker.io/library/t")},
		{route: "POST /v1/images/{name...}", what: "tag into builds/", allow: nil, req: tagTo("tenant-a/app:1", "builds/t")},
		// Without a builder image a permitted run answers 503.
		{route: "POST /v1/images/{name...}", what: "run A's image", allow: []string{tenantA, admin}, ok: 503,
			req: func(*matrix, string) (string, string, io.Reader, string) {
				return "POST", "/v1/images/tenant-a/app:1/run", jsonBody(map[string]any{}), "application/json"
			}},

		{route: "GET /v1/cache", what: "list", allow: []string{tenantA, tenantB, buildRead, admin}, ok: 200, req: get("/v1/cache")},
		{route: "DELETE /v1/cache/{scope}", what: "A's scope", allow: []string{admin}, ok: 204,
			req: func(m *matrix, _ string) (string, string, io.Reader, string) {
				m.build(m.tok[tenantA])
				return "DELETE", "/v1/cache/tenant-a", nil, ""
			}},

		{route: "POST /v1/contexts/blobs/query", what: "own store", allow: []string{tenantA, tenantB, admin}, ok: 200,
			req: func(*matrix, string) (string, string, io.Reader, string) {
				return "POST", "/v1/contexts/blobs/query", jsonBody(map[string]any{"digests": []string{"sha256:" + strings.Repeat("a", 64)}}), "application/json"
			}},
		{route: "POST /v1/contexts/blobs", what: "own store", allow: []string{tenantA, tenantB, admin}, ok: 200,
			req: func(*matrix, string) (string, string, io.Reader, string) {
				var buf bytes.Buffer
				tar.NewWriter(&buf).Close()
				return "POST", "/v1/contexts/blobs", &buf, "application/x-tar"
			}},

		{route: "GET /v1/builders", what: "list", allow: []string{admin}, ok: 200, req: get("/v1/builders")},
		{route: "POST /v1/builders/stop", what: "A's builder", allow: []string{admin}, ok: 204,
			req: func(m *matrix, _ string) (string, string, io.Reader, string) {
				// Not deduplicated, so it runs and leaves the scope's builder up.
				m.build(m.tok[tenantA], [2]string{"build_args", `{"RUN":"` + time.Now().String() + `"}`})
				return "POST", "/v1/builders/stop", jsonBody(map[string]any{"scope": "tenant-a"}), "application/json"
			},
			unchanged: func(m *matrix, t *testing.T, _ string) {
				var l api.BuilderList
				m.json(m.admin, "GET", "/v1/builders", nil, http.StatusOK, &l)
				if len(l.Builders) == 0 || l.Builders[0].Scope != "tenant-a" {
					t.Errorf("a refused stop changed the builders: %+v", l.Builders)
				}
			}},

		{route: "GET /v1/whoami", what: "self", allow: all, ok: 200, req: get("/v1/whoami")},
		{route: "GET /v1/version", what: "versions", allow: all, ok: 200, req: get("/v1/version")},
		{route: "POST /v1/tokens", what: "mint", allow: []string{admin}, ok: 201,
			req: func(*matrix, string) (string, string, io.Reader, string) {
				return "POST", "/v1/tokens", jsonBody(map[string]any{"subject": "x", "scopes": []string{"build:read"}, "namespace": "tenant-a"}), "application/json"
			}},
		{route: "GET /v1/tokens", what: "list", allow: []string{admin}, ok: 200, req: get("/v1/tokens")},
		{route: "POST /v1/tokens/{id}/revoke", what: "a token", allow: []string{admin}, ok: 200,
			req: func(m *matrix, _ string) (string, string, io.Reader, string) {
				var tok api.Token
				m.json(m.admin, "POST", "/v1/tokens", map[string]any{"subject": "victim", "scopes": []string{"build:read"}, "namespace": "tenant-a"}, http.StatusCreated, &tok)
				return "POST", "/v1/tokens/" + tok.Id + "/revoke", nil, ""
			}},
		{route: "POST /v1/registry/gc", what: "collect", allow: []string{admin}, ok: 200,
			req: func(*matrix, string) (string, string, io.Reader, string) { return "POST", "/v1/registry/gc", nil, "" }},
	}
}

// regOp is one registry operation; do returns the status of its last
// request. The routes are distribution's route names it exercises.
type regOp struct {
	name   string
	routes []string
	ok     int
	do     func(m *matrix, c *regClient, actor, repo, tag string) int
}

func regOps() []regOp {
	return []regOp{
		{"pull manifest", []string{v2.RouteNameManifest}, 200, func(m *matrix, c *regClient, _, repo, tag string) int {
			code, _, _ := c.do("GET", "/v2/"+repo+"/manifests/"+tag, "repository:"+repo+":pull", "", nil)
			return code
		}},
		{"head manifest", []string{v2.RouteNameManifest}, 200, func(m *matrix, c *regClient, _, repo, tag string) int {
			code, _, _ := c.do("HEAD", "/v2/"+repo+"/manifests/"+tag, "repository:"+repo+":pull", "", nil)
			return code
		}},
		// OCI 1.1, served by kiln in front of distribution: an unknown
		// subject still answers an empty index to whoever may pull.
		{"list referrers", nil, 200, func(m *matrix, c *regClient, _, repo, _ string) int {
			code, _, _ := c.do("GET", "/v2/"+repo+"/referrers/sha256:"+strings.Repeat("0", 64), "repository:"+repo+":pull", "", nil)
			return code
		}},
		{"list tags", []string{v2.RouteNameTags}, 200, func(m *matrix, c *regClient, _, repo, _ string) int {
			code, _, _ := c.do("GET", "/v2/"+repo+"/tags/list", "repository:"+repo+":pull", "", nil)
			return code
		}},
		{"pull blob", []string{v2.RouteNameBlob}, 200, func(m *matrix, c *regClient, _, repo, tag string) int {
			return pullBlob(m, c, repo, tag)
		}},
		{"push", []string{v2.RouteNameBlobUpload, v2.RouteNameBlobUploadChunk, v2.RouteNameManifest}, 201, func(m *matrix, c *regClient, _, repo, _ string) int {
			img := newImage(unique("push"))
			for _, b := range [][]byte{img.Layer, img.Config} {
				if code, _ := c.blob(repo, b); code != http.StatusCreated {
					return code
				}
			}
			code, _, _ := c.do("PUT", "/v2/"+repo+"/manifests/"+unique("t"), pushScope(repo), v1.MediaTypeImageManifest, img.Manifest)
			return code
		}},
		{"mount into own repository", []string{v2.RouteNameBlobUpload}, 201, func(m *matrix, c *regClient, actor, repo, tag string) int {
			layer := layerOf(m, repo, tag)
			dst := map[string]string{tenantA: "tenant-a/mnt", imageOnly: "tenant-a/mnt", buildRead: "tenant-a/mnt", tenantB: "tenant-b/mnt", admin: "mnt", anonymous: "mnt"}[actor]
			q := url.Values{"mount": {layer}, "from": {repo}}
			code, _, _ := c.do("POST", "/v2/"+dst+"/blobs/uploads/?"+q.Encode(), pushScope(dst)+" repository:"+repo+":pull", "", nil)
			return code
		}},
		{"delete manifest and blob", []string{v2.RouteNameManifest, v2.RouteNameBlob}, 202, func(m *matrix, c *regClient, actor, repo, tag string) int {
			repo, img := m.freshContent(actor, repo)
			code, _, _ := c.do("DELETE", "/v2/"+repo+"/manifests/"+img.Digest, "repository:"+repo+":delete", "", nil)
			if code != http.StatusAccepted {
				return code
			}
			code, _, _ = c.do("DELETE", "/v2/"+repo+"/blobs/"+img.LayerDigest, "repository:"+repo+":delete", "", nil)
			return code
		}},
	}
}

// layerOf reads the first layer digest of repo:tag as the admin.
func layerOf(m *matrix, repo, tag string) string {
	c := &regClient{base: m.url, user: "kiln", pass: m.admin}
	_, _, body := c.do("GET", "/v2/"+repo+"/manifests/"+tag, "repository:"+repo+":pull", "", nil)
	var man v1.Manifest
	json.Unmarshal(body, &man)
	if len(man.Layers) == 0 {
		m.t.Fatalf("%s:%s has no layers: %s", repo, tag, body)
	}
	return man.Layers[0].Digest.String()
}

func pullBlob(m *matrix, c *regClient, repo, tag string) int {
	code, _, _ := c.do("GET", "/v2/"+repo+"/blobs/"+layerOf(m, repo, tag), "repository:"+repo+":pull", "", nil)
	return code
}

// freshContent puts an image nobody else uses into repo (or, for a
// build's repository, makes a fresh build of A), so deleting it harms no
// other case.
func (m *matrix) freshContent(actor, repo string) (string, image) {
	if strings.HasPrefix(repo, "builds/") {
		b := m.build(m.tok[tenantA], [2]string{"no_cache", "true"}) // never answered by dedup
		repo = "builds/" + b.Id
		c := &regClient{base: m.url, user: "kiln", pass: m.admin}
		_, _, body := c.do("GET", "/v2/"+repo+"/manifests/latest", "repository:"+repo+":pull", "", nil)
		img := newImage(b.Id)
		if string(body) != string(img.Manifest) {
			m.t.Fatalf("fresh build %s did not push its own image: %s", b.Id, body)
		}
		return repo, img
	}
	switch repo {
	case "mirror/docker.io/library/alpine":
		return repo, newImage(repo + ":3.20")
	case "cache/global/k":
		return "cache/global/del", newImage("cache/global/del:1")
	}
	img := newImage(unique("fresh"))
	c := &regClient{base: m.url, user: "kiln", pass: m.admin}
	if _, err := c.push(repo, unique("t"), img); err != nil {
		m.t.Fatalf("admin cannot seed %s: %v", repo, err)
	}
	return repo, img
}

// TestAuthorizationMatrix tries every API route and every registry
// operation as every kind of actor against every kind of resource, and
// checks the answer against one table. A route or registry operation the
// table does not cover fails the test, so none can ship without a rule.
func TestAuthorizationMatrix(t *testing.T) {
	m := newMatrix(t)
	judge := func(t *testing.T, what, actor string, allowed bool, ok, code int, body string) {
		t.Helper()
		switch {
		case actor == anonymous && !allowed && code != http.StatusUnauthorized:
			t.Errorf("%s without a token: %d, want 401: %.300s", what, code, body)
		case allowed && ok != 0 && code != ok:
			t.Errorf("%s as %s: %d, want %d: %.300s", what, actor, code, ok, body)
		case allowed && code >= 400 && code < 500:
			t.Errorf("%s as %s: %d, want it allowed: %.300s", what, actor, code, body)
		case !allowed && (code < 400 || code >= 500):
			t.Errorf("%s as %s: %d, want it refused: %.300s", what, actor, code, body)
		}
	}

	covered := map[string]bool{}
	for _, c := range apiCases(m) {
		covered[c.route] = true
		for _, actor := range actors {
			method, path, body, ct := c.req(m, actor)
			code, resp := m.call(m.tok[actor], method, path, body, ct, c.header...)
			allowed := slices.Contains(c.allow, actor)
			judge(t, c.route+" ("+c.what+")", actor, allowed, c.ok, code, string(resp))
			if !allowed && c.unchanged != nil {
				c.unchanged(m, t, path)
			}
		}
	}

	// The registry: each operation on each kind of repository.
	pullers := func(owners ...string) []string { return append(owners, admin) }
	readAll := []string{tenantA, tenantB, imageOnly, buildRead, admin}
	repos := []struct {
		repo, tag   string
		pull, write []string
		deleteAllow []string
	}{
		{"tenant-a/app", "1", pullers(tenantA, imageOnly, buildRead), pullers(tenantA, imageOnly), pullers(tenantA, imageOnly)},
		{"tenant-b/app", "1", pullers(tenantB), pullers(tenantB), pullers(tenantB)},
		{"base/img", "1", readAll, pullers(), pullers()},
		{"rootapp", "1", pullers(), pullers(), pullers()},
		{"builds/" + m.buildA.Id, "latest", pullers(tenantA, imageOnly, buildRead), nil, pullers(tenantA, imageOnly)},
		{"mirror/docker.io/library/alpine", "3.20", readAll, nil, nil},
		{"cache/global/k", "cache", readAll, nil, pullers()},
	}
	covered["/v2/"] = true
	regCovered := map[string]bool{v2.RouteNameBase: true, v2.RouteNameCatalog: true}
	for _, op := range regOps() {
		for _, r := range op.routes {
			regCovered[r] = true
		}
		for _, rp := range repos {
			allow := rp.pull
			switch op.name {
			case "push":
				allow = rp.write
			case "delete manifest and blob":
				allow = rp.deleteAllow
			case "mount into own repository":
				allow = slices.DeleteFunc(slices.Clone(rp.pull), func(a string) bool { return a == buildRead })
			}
			for _, actor := range actors {
				c := &regClient{base: m.url}
				if actor != anonymous {
					c.user, c.pass = "kiln", m.tok[actor]
				}
				code := op.do(m, c, actor, rp.repo, rp.tag)
				judge(t, fmt.Sprintf("registry %s on %s", op.name, rp.repo), actor, slices.Contains(allow, actor), op.ok, code, "")
			}
		}
	}
	for _, actor := range actors {
		c := &regClient{base: m.url}
		if actor != anonymous {
			c.user, c.pass = "kiln", m.tok[actor]
		}
		code, _, body := c.do("GET", "/v2/", "", "", nil)
		judge(t, "registry base", actor, actor != anonymous, 200, code, string(body))
		code, _, body = c.do("GET", "/v2/_catalog", "registry:catalog:*", "", nil)
		judge(t, "registry catalog", actor, actor == admin, 200, code, string(body))
	}

	// Nothing may be left without a rule.
	var missing []string
	for _, r := range server.Routes() {
		if !covered[r] {
			missing = append(missing, r)
		}
	}
	for _, d := range v2.APIDescriptor.RouteDescriptors {
		if !regCovered[d.Name] {
			missing = append(missing, "registry route "+d.Name)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("the authorization matrix has no rule for %s: add rows to apiCases or regOps", strings.Join(missing, ", "))
	}
}
