package server_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/config"
	"github.com/kiln-build/kiln/internal/runtime"
)

func names(list []api.Image) []string {
	var out []string
	for _, im := range list {
		out = append(out, im.Name)
	}
	return out
}

// Each tenant sees only its own builds, images, names and cache scopes;
// an admin sees everything; a name without a namespace means the
// tenant's own.
func TestTenantsSeeOnlyTheirOwn(t *testing.T) {
	m := newMatrix(t)
	a, b := m.tok[tenantA], m.tok[tenantB]

	var list api.BuildList
	m.json(a, "GET", "/v1/builds", nil, http.StatusOK, &list)
	for _, bl := range list.Builds {
		if bl.Tenant == nil || *bl.Tenant != "tenant-a" {
			t.Errorf("tenant-a's build list shows %s of %v", bl.Id, bl.Tenant)
		}
	}
	if len(list.Builds) == 0 {
		t.Error("tenant-a's build list is empty")
	}
	m.json(m.admin, "GET", "/v1/builds", nil, http.StatusOK, &list)
	var tenants []string
	for _, bl := range list.Builds {
		tenants = append(tenants, *bl.Tenant)
	}
	if !slices.Contains(tenants, "tenant-a") || !slices.Contains(tenants, "tenant-b") {
		t.Errorf("the admin's build list shows tenants %v", tenants)
	}
	// input_hash is no side channel: B cannot learn that A built X.
	m.json(b, "GET", "/v1/builds?input_hash="+*m.buildA.InputHash, nil, http.StatusOK, &list)
	for _, bl := range list.Builds {
		if *bl.Tenant != "tenant-b" {
			t.Errorf("tenant-b finds tenant-a's build %s by its input hash", bl.Id)
		}
	}

	// Another tenant's name for the same digest stays hidden.
	m.json(m.admin, "POST", "/v1/images/tenant-a/app:1/tags", map[string]string{"name": "tenant-b/copy:1"}, http.StatusCreated, nil)
	var im api.Image
	m.json(a, "GET", "/v1/images/app:1", nil, http.StatusOK, &im)
	if im.Name != "tenant-a/app:1" {
		t.Errorf("tenant-a's app:1 is %s", im.Name)
	}
	if im.Names == nil || slices.Contains(*im.Names, "tenant-b/copy:1") || !slices.Contains(*im.Names, "tenant-a/app:1") {
		t.Errorf("tenant-a sees names %v of its image", im.Names)
	}
	var imgs api.ImageList
	m.json(a, "GET", "/v1/images", nil, http.StatusOK, &imgs)
	got := names(imgs.Images)
	for _, want := range []string{"tenant-a/app:1", "base/img:1", "builds/" + m.buildA.Id + ":latest"} {
		if !slices.Contains(got, want) {
			t.Errorf("tenant-a's image list lacks %s: %v", want, got)
		}
	}
	for _, hidden := range []string{"tenant-b/app:1", "tenant-b/copy:1", "rootapp:1", "builds/" + m.buildB.Id + ":latest"} {
		if slices.Contains(got, hidden) {
			t.Errorf("tenant-a's image list shows %s", hidden)
		}
	}

	var vols api.CacheVolumeList
	m.json(a, "GET", "/v1/cache", nil, http.StatusOK, &vols)
	for _, v := range vols.Volumes {
		if v.Scope != "tenant-a" {
			t.Errorf("tenant-a sees cache scope %s", v.Scope)
		}
	}

	var who api.Whoami
	m.json(a, "GET", "/v1/whoami", nil, http.StatusOK, &who)
	if who.Tenant != "tenant-a" || who.ImagePrefix != "tenant-a/" || who.Admin {
		t.Errorf("whoami: %+v", who)
	}
	m.json(m.admin, "GET", "/v1/whoami", nil, http.StatusOK, &who)
	if !who.Admin || who.ImagePrefix != "" {
		t.Errorf("admin's whoami: %+v", who)
	}
}

// B1: a tenant cannot plant an image under mirror/ (or any other kiln
// namespace) through an identical resubmission answered by dedup, which
// used to link its tags straight into registry storage.
func TestDedupCannotTagIntoKilnNamespaces(t *testing.T) {
	m := newMatrix(t)
	a := m.tok[tenantA]
	mirrorBefore := manifestDigest(m, "mirror/docker.io/library/alpine", "3.20")
	for _, tag := range []string{"mirror/docker.io/library/alpine:3.20", "builds/" + m.buildB.Id + ":latest", "cache/global/k:cache", "tenant-b/app:1", "base/img:1"} {
		body, ct := submission([2]string{"tags", tag})
		code, resp := m.call(a, "POST", "/v1/builds", body, ct)
		if code != http.StatusBadRequest && code != http.StatusForbidden {
			t.Errorf("identical build tagged %s: %d %s", tag, code, resp)
		}
	}
	if after := manifestDigest(m, "mirror/docker.io/library/alpine", "3.20"); after != mirrorBefore {
		t.Errorf("mirror tag moved from %s to %s", mirrorBefore, after)
	}
	if after := manifestDigest(m, "tenant-b/app", "1"); after != *m.buildB.ImageDigest {
		t.Errorf("tenant-b/app:1 moved to %s", after)
	}
}

func manifestDigest(m *matrix, repo, tag string) string {
	c := &regClient{base: m.url, user: "kiln", pass: m.admin}
	code, h, body := c.do("HEAD", "/v2/"+repo+"/manifests/"+tag, "repository:"+repo+":pull", "", nil)
	if code != http.StatusOK {
		m.t.Fatalf("HEAD %s:%s: %d %s", repo, tag, code, body)
	}
	return h.Get("Docker-Content-Digest")
}

// B3: dedup stays within a tenant unless the operator lists tenants that
// trust each other, and never crosses tenants for a Dockerfile with a
// cache mount, whose contents the input hash cannot see.
func TestDedupStaysWithinATenant(t *testing.T) {
	data := t.TempDir()
	k := startKilnAt(t, data, func(c *config.Config) {
		c.DedupTrustGroups = map[string][]string{"friends": {"tenant-a", "tenant-c"}}
	})
	a := k.token("tenant-a", "build:write")
	a2, _ := tokenWithScope(k, "tenant-a", "tenant-a.other")
	b := k.token("tenant-b", "build:write")
	c := k.token("tenant-c", "build:write")
	first := k.build(a)
	dedupOf := func(tok string, fields ...[2]string) string {
		t.Helper()
		body, ct := submission(fields...)
		code, resp := k.call(tok, "POST", "/v1/builds", body, ct)
		if code != http.StatusAccepted {
			t.Fatalf("submit: %d %s", code, resp)
		}
		var bl api.Build
		json.Unmarshal(resp, &bl)
		if bl.DedupOf == nil {
			return ""
		}
		return *bl.DedupOf
	}
	if got := dedupOf(a); got != first.Id {
		t.Errorf("the same tenant's identical build: dedup_of %q, want %s", got, first.Id)
	}
	if got := dedupOf(a2); got != first.Id {
		t.Errorf("another cache scope of the same tenant: dedup_of %q, want %s", got, first.Id)
	}
	if got := dedupOf(b); got != "" {
		t.Errorf("another tenant was answered with tenant-a's build %s", got)
	}
	if got := dedupOf(c); got != first.Id {
		t.Errorf("a trusting tenant: dedup_of %q, want %s", got, first.Id)
	}
	// With a cache mount, not even a trusting tenant.
	cm := [2]string{"dockerfile", "FROM scratch\nRUN --mount=type=cache,target=/c true\n"}
	cmFirst := k.build(a, cm)
	if got := dedupOf(c, cm); got != "" {
		var orig api.Build
		k.json(k.admin, "GET", "/v1/builds/"+got, nil, http.StatusOK, &orig)
		t.Errorf("a cache-mount build was answered across tenants by %s (tenant %s, first cm build %s)", got, *orig.Tenant, cmFirst.Id)
	}
	if got := dedupOf(a, cm); got != cmFirst.Id {
		t.Errorf("a cache-mount build of the same tenant: dedup_of %q, want %s", got, cmFirst.Id)
	}
}

func tokenWithScope(k *kiln, namespace, scope string) (string, api.Token) {
	var tok api.Token
	k.json(k.admin, "POST", "/v1/tokens", map[string]any{"subject": "s-" + scope, "namespace": namespace, "cache_scope": scope,
		"scopes": []string{"build:write"}, "ttl": "1h"}, http.StatusCreated, &tok)
	return tok.Token, tok
}

// B5: the registry is the truth of what a name points at; kiln's image
// records follow a direct push at once, and after a restart even pushes
// whose records were lost.
func TestImageRecordsFollowTheRegistry(t *testing.T) {
	data := t.TempDir()
	k := startKilnAt(t, data, nil)
	a := k.token("tenant-a", "build:write", "image:write")
	built := k.build(a, [2]string{"tags", "app:1"})
	c := &regClient{base: k.url, user: "kiln", pass: a}
	img := newImage("pushed over the build")
	if _, err := c.push("tenant-a/app", "1", img); err != nil {
		t.Fatal(err)
	}
	var im api.Image
	k.json(a, "GET", "/v1/images/app:1", nil, http.StatusOK, &im)
	if im.Digest != img.Digest || im.BuildId != nil {
		t.Errorf("after a direct push: digest %s build %v, want %s and no build (was %s)", im.Digest, im.BuildId, img.Digest, *built.ImageDigest)
	}
	// A new name pushed directly is listed, and a deleted one is gone.
	if _, err := c.push("tenant-a/direct", "v1", newImage("direct")); err != nil {
		t.Fatal(err)
	}
	k.json(a, "GET", "/v1/images/direct:v1", nil, http.StatusOK, nil)
	code, _, body := c.do("DELETE", "/v2/tenant-a/direct/manifests/"+newImage("direct").Digest, "repository:tenant-a/direct:delete", "", nil)
	if code != http.StatusAccepted {
		t.Fatalf("delete: %d %s", code, body)
	}
	if code, body := k.call(a, "GET", "/v1/images/direct:v1", nil, ""); code != http.StatusNotFound {
		t.Errorf("deleted name still answers %d %s", code, body)
	}

	// A push the server never heard of (written while it was down) is
	// reflected at the next start.
	k.stop()
	seed(t, data, "tenant-a/offline:1")
	k = startKilnAt(t, data, nil)
	k.json(k.admin, "GET", "/v1/images/tenant-a/offline:1", nil, http.StatusOK, &im)
	if im.Digest != newImage("tenant-a/offline:1").Digest {
		t.Errorf("offline push: digest %s", im.Digest)
	}
}

// B6: multipart fields are counted and sized as they stream: an
// oversized or over-repeated field is refused after a few bytes, and the
// error does not echo it.
func TestSubmissionFieldsAreBoundedWhileStreaming(t *testing.T) {
	k := startKiln(t)
	a := k.token("tenant-a", "build:write")
	for _, c := range []struct {
		name  string
		parts func(mw *multipart.Writer) error
		want  string
	}{
		{"a 1 MiB tag", func(mw *multipart.Writer) error {
			for range 300 {
				if err := mw.WriteField("tags", strings.Repeat("a", 1<<20)); err != nil {
					return err
				}
			}
			return nil
		}, "field tags"},
		{"300 small tags", func(mw *multipart.Writer) error {
			for i := range 300 {
				if err := mw.WriteField("tags", fmt.Sprintf("app:%d", i)); err != nil {
					return err
				}
			}
			return nil
		}, "more than 32 times"},
		{"a 1 MiB unknown field name", func(mw *multipart.Writer) error {
			return mw.WriteField(strings.Repeat("x", 8<<10), "v")
		}, "unknown field"},
		{"300 allowed domains of 1 MiB", func(mw *multipart.Writer) error {
			for range 300 {
				if err := mw.WriteField("allowed_domains", strings.Repeat("d", 1<<20)); err != nil {
					return err
				}
			}
			return nil
		}, "field allowed_domains"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pr, pw := io.Pipe()
			mw := multipart.NewWriter(pw)
			var sent atomic.Int64
			go func() {
				err := c.parts(mw)
				if err == nil {
					err = mw.Close()
				}
				pw.CloseWithError(err)
			}()
			counted := readerFunc(func(p []byte) (int, error) {
				n, err := pr.Read(p)
				sent.Add(int64(n))
				return n, err
			})
			req, _ := http.NewRequest("POST", k.url+"/v1/builds", counted)
			req.Header.Set("Authorization", "Bearer "+a)
			req.Header.Set("Content-Type", mw.FormDataContentType())
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			pr.CloseWithError(io.ErrClosedPipe)
			if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), c.want) {
				t.Errorf("%d %s, want 400 naming %q", resp.StatusCode, body, c.want)
			}
			if len(body) > 2048 {
				t.Errorf("the error is %d bytes long: it echoes the value", len(body))
			}
			// The client may have sent more than the server read, but
			// never the whole request.
			if s := sent.Load(); s > 16<<20 {
				t.Errorf("the client got to send %d bytes before the answer", s)
			}
		})
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// R7: concurrent uploads are bounded per tenant (429 with Retry-After),
// and one tenant's full quota does not stop another.
func TestUploadsAreBoundedPerTenant(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) { c.UploadsPerTenant = 1 })
	a := k.token("tenant-a", "build:write")
	b := k.token("tenant-b", "build:write")
	// Tenant A's first upload stalls midway through its context (after
	// more than the client's buffer, so the server is reading it).
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		w, _ := mw.CreateFormFile("context", "context.tar")
		var hdr bytes.Buffer
		tw := tar.NewWriter(&hdr)
		tw.WriteHeader(&tar.Header{Name: "big", Mode: 0o644, Size: 1 << 20, Typeflag: tar.TypeReg})
		tw.Flush()
		w.Write(hdr.Bytes())
		w.Write(make([]byte, 256<<10))
	}()
	req, _ := http.NewRequest("POST", k.url+"/v1/builds", pr)
	req.Header.Set("Authorization", "Bearer "+a)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	first := make(chan int, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			first <- 0
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	// Let the stalled upload reach the server first.
	time.Sleep(500 * time.Millisecond)
	deadline := time.Now().Add(10 * time.Second)
	for {
		body, ct := submission()
		code, resp := k.call(a, "POST", "/v1/builds", body, ct)
		if code == http.StatusTooManyRequests {
			if !strings.Contains(string(resp), "upload") {
				t.Errorf("429 does not say why: %s", resp)
			}
			break
		}
		if time.Now().After(deadline) {
			select {
			case c := <-first:
				t.Fatalf("the stalled upload ended with %d; a second upload of the same tenant got %d, want 429", c, code)
			default:
			}
			t.Fatalf("a second upload of the same tenant got %d %.200s, want 429", code, resp)
		}
		time.Sleep(50 * time.Millisecond)
	}
	hreq, _ := http.NewRequest("POST", k.url+"/v1/builds", nil)
	body, ct := submission()
	hreq.Body = io.NopCloser(body)
	hreq.Header.Set("Authorization", "Bearer "+a)
	hreq.Header.Set("Content-Type", ct)
	resp, err := http.DefaultClient.Do(hreq)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
		t.Errorf("second upload: %d Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	body, ct = submission()
	if code, resp := k.call(b, "POST", "/v1/builds", body, ct); code != http.StatusAccepted {
		t.Errorf("another tenant's upload: %d %s", code, resp)
	}
	pw.CloseWithError(io.ErrUnexpectedEOF)
	<-first
}

// R9: idle keep-alive connections are closed.
func TestIdleConnectionsAreClosed(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) { c.HTTPIdleTimeout = 300 * time.Millisecond })
	conn, err := net.Dial("tcp", k.host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n", k.host)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if _, err := conn.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("idle connection: %v, want it closed by the server", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("idle connection closed after %s", took)
	}
}

// Tokens: a lifetime cap, ids, listing, revocation that stops the token
// and its registry tokens at once, and a case-insensitive scheme.
func TestTokensAreCappedListedAndRevocable(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) { c.TokensMaxTTL = 48 * time.Hour })
	code, body := k.call(k.admin, "POST", "/v1/tokens", strings.NewReader(`{"subject":"x","scopes":["build:read"],"ttl":"49h"}`), "application/json")
	if code != http.StatusBadRequest || !strings.Contains(string(body), "tokens.max_ttl") {
		t.Errorf("a token past the maximum lifetime: %d %s", code, body)
	}
	for _, ns := range []string{"mirror", "builds", "base", "Bad"} {
		code, body := k.call(k.admin, "POST", "/v1/tokens", strings.NewReader(`{"subject":"x","scopes":["build:read"],"namespace":"`+ns+`"}`), "application/json")
		if code != http.StatusBadRequest {
			t.Errorf("namespace %s: %d %s", ns, code, body)
		}
	}
	var tok api.Token
	k.json(k.admin, "POST", "/v1/tokens", map[string]any{"subject": "ci", "namespace": "tenant-a", "scopes": []string{"build:read", "image:read"}}, http.StatusCreated, &tok)
	if tok.Id == "" || tok.Tenant != "tenant-a" {
		t.Fatalf("token: %+v", tok)
	}
	req, _ := http.NewRequest("GET", k.url+"/v1/builds", nil)
	req.Header.Set("Authorization", "bearer "+tok.Token)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("lower-case bearer: %v %v", resp, err)
	}
	var list api.TokenList
	k.json(k.admin, "GET", "/v1/tokens", nil, http.StatusOK, &list)
	var ids []string
	for _, ti := range list.Tokens {
		ids = append(ids, ti.Id)
		if strings.Contains(fmt.Sprint(ti), tok.Token) {
			t.Error("the token list shows a token")
		}
	}
	if !slices.Contains(ids, tok.Id) || len(ids) < 2 {
		t.Errorf("token list %v lacks %s or the admin token", ids, tok.Id)
	}
	c := &regClient{base: k.url, user: "kiln", pass: tok.Token}
	regTok, err := c.token("repository:tenant-a/app:pull")
	if err != nil {
		t.Fatal(err)
	}
	k.json(k.admin, "POST", "/v1/tokens/"+tok.Id+"/revoke", nil, http.StatusOK, nil)
	if code, body := k.call(tok.Token, "GET", "/v1/builds", nil, ""); code != http.StatusUnauthorized || !strings.Contains(string(body), "revoked") {
		t.Errorf("revoked token: %d %s", code, body)
	}
	req, _ = http.NewRequest("GET", k.url+"/v2/tenant-a/app/tags/list", nil)
	req.Header.Set("Authorization", "Bearer "+regTok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	rb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("WWW-Authenticate"), "invalid_token") {
		t.Errorf("registry token of a revoked token: %d %s %s", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), rb)
	}
	if _, err := c.token(""); err == nil {
		t.Error("a revoked token got a registry token")
	}
	// Revocation survives a restart.
	k.stop()
	k = startKilnAt(t, k.data, nil)
	if code, _ := k.call(tok.Token, "GET", "/v1/builds", nil, ""); code != http.StatusUnauthorized {
		t.Errorf("revoked token works again after a restart: %d", code)
	}
}

// A base image in kiln's registry is pinned at submission like a mirrored
// one: BuildKit gets it by the digest the input hash names, so moving the
// tag while the build waits changes nothing; and a tenant cannot build
// on another tenant's image.
func TestLocalBasesArePinnedAndChecked(t *testing.T) {
	m := newMatrix(t)
	a := m.tok[tenantA]
	pinned := manifestDigest(m, "base/img", "1")
	df := "FROM " + m.host + "/base/img:1\n"
	b := m.build(a, [2]string{"dockerfile", df})
	v, ok := jobs.Load(b.Id)
	if !ok {
		t.Fatal("the runtime never got the build")
	}
	ctxs := v.(runtime.Job).Solve.NamedContexts
	if got, want := ctxs[m.host+"/base/img:1"], "docker-image://"+m.host+"/base/img@"+pinned; got != want {
		t.Errorf("named contexts %v: want %s", ctxs, want)
	}
	for _, ref := range []string{"tenant-b/app:1", "rootapp:1", "builds/" + m.buildB.Id + ":latest"} {
		body, ct := submission([2]string{"dockerfile", "FROM " + m.host + "/" + ref + "\n"})
		if code, resp := m.call(a, "POST", "/v1/builds", body, ct); code != http.StatusBadRequest {
			t.Errorf("tenant-a building on %s: %d %s", ref, code, resp)
		}
	}
}

// A build's own registry token works while the build runs and no longer:
// it cannot be used later to push over the build's result or its tags.
func TestABuildsTokenDiesWithTheBuild(t *testing.T) {
	m := newMatrix(t)
	v, _ := jobs.Load(m.buildA.Id)
	job := v.(runtime.Job)
	c := &regClient{base: m.url, user: "kiln", pass: job.Solve.RegistryAuth[m.host].Password}
	if _, err := c.push("builds/"+m.buildA.Id, "latest", newImage("late")); err == nil {
		t.Error("the token of a finished build pushed over its result")
	}
	if _, err := c.push("tenant-a/app", "1", newImage("late")); err == nil {
		t.Error("the token of a finished build pushed over its tag")
	}
	if got := manifestDigest(m, "builds/"+m.buildA.Id, "latest"); got != *m.buildA.ImageDigest {
		t.Errorf("builds/%s moved to %s", m.buildA.Id, got)
	}
}

// The bootstrap admin token's tenant and the tenants kiln gives tokens
// without a namespace cannot be joined by a new token.
func TestReservedTenantsCannotBeJoined(t *testing.T) {
	k := startKiln(t)
	for _, body := range []string{
		`{"subject":"x","scopes":["build:write"],"namespace":"admin"}`,
		`{"subject":"x","scopes":["build:write"],"cache_scope":"admin.ci"}`,
		`{"subject":"x","scopes":["build:write"],"namespace":"u-0123456789abcdef"}`,
		`{"subject":"x","scopes":["build:write"],"cache_scope":"u-0123456789abcdef"}`,
	} {
		if code, resp := k.call(k.admin, "POST", "/v1/tokens", strings.NewReader(body), "application/json"); code != http.StatusBadRequest {
			t.Errorf("%s: %d %s", body, code, resp)
		}
	}
}

// BUILDKIT_SYNTAX runs another frontend as surely as a # syntax= line:
// such a build may mount caches kiln cannot see, so it never dedups
// across tenants, trusted or not.
func TestSyntaxBuildArgNeverDedupsAcrossTenants(t *testing.T) {
	k := startKilnAt(t, t.TempDir(), func(c *config.Config) {
		c.DedupTrustGroups = map[string][]string{"friends": {"tenant-a", "tenant-c"}}
	})
	k.build(k.admin, [2]string{"tags", "base/fe:1"})
	arg := [2]string{"build_args", `{"BUILDKIT_SYNTAX":"` + k.host + `/base/fe:1"}`}
	a := k.token("tenant-a", "build:write")
	c := k.token("tenant-c", "build:write")
	k.build(a, arg)
	body, ct := submission(arg)
	code, resp := k.call(c, "POST", "/v1/builds", body, ct)
	var b api.Build
	json.Unmarshal(resp, &b)
	if code != http.StatusAccepted || b.DedupOf != nil {
		t.Errorf("a trusted tenant's BUILDKIT_SYNTAX build: %d, dedup_of %v", code, b.DedupOf)
	}
}
