package cli

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

func TestBuildsList(t *testing.T) {
	s := newFakeServer(t)
	var queries []url.Values
	s.handle("GET /v1/builds", func(w http.ResponseWriter, r *http.Request) {
		queries = append(queries, r.URL.Query())
		b1 := finishedBuild(api.BuildStatusSucceeded, "")
		b2 := testBuild(api.BuildStatusRunning)
		b2.Id, b2.Phase, b2.CacheScope = "b2", "solving", ""
		list := api.BuildList{Builds: []api.Build{b2, b1}}
		if r.URL.Query().Get("cursor") == "" {
			list.NextCursor = p("page2")
		} else {
			b3 := finishedBuild(api.BuildStatusFailed, "boom")
			b3.Id = "b3"
			list.Builds = []api.Build{b3}
		}
		writeJSON(w, http.StatusOK, list)
	})
	res := s.kiln(context.Background(), "builds", "ls", "--status", "succeeded", "--limit", "3")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	wantQ := []url.Values{
		{"limit": {"3"}, "status": {"succeeded"}},
		{"limit": {"1"}, "status": {"succeeded"}, "cursor": {"page2"}},
	}
	if !reflect.DeepEqual(queries, wantQ) {
		t.Errorf("queries %q, want %q", queries, wantQ)
	}
	lines := strings.Split(strings.TrimSpace(res.stdout), "\n")
	if len(lines) != 4 {
		t.Fatalf("want a header and 3 rows:\n%s", res.stdout)
	}
	if f := strings.Fields(lines[0]); !reflect.DeepEqual(f, []string{"ID", "STATUS", "PHASE", "SCOPE", "CACHED/TOTAL", "DIGEST", "AGE"}) {
		t.Errorf("header %q", lines[0])
	}
	if f := strings.Fields(lines[1]); !reflect.DeepEqual(f, []string{"b2", "running", "solving", "-", "0/0", "-", "3m"}) {
		t.Errorf("row %q", f)
	}
	if f := strings.Fields(lines[2]); !reflect.DeepEqual(f, []string{"b1", "succeeded", "done", "team", "1/3", "sha256:0123456789ab", "3m"}) {
		t.Errorf("row %q", f)
	}
}

func TestBuildsShow(t *testing.T) {
	s := newFakeServer(t)
	s.buildIDs("b1")
	s.build = finishedBuild(api.BuildStatusFailed, "exit code: 2")
	res := s.kiln(context.Background(), "builds", "show", "b1")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	for _, w := range []string{"id:", "b1", "status:", "failed", "error:", "exit code: 2", "steps cached:", "1/3", "duration:", "12.0s"} {
		if !strings.Contains(res.stdout, w) {
			t.Errorf("show lacks %q:\n%s", w, res.stdout)
		}
	}
	if strings.Contains(res.stdout, "namespace:") {
		t.Errorf("a build without a tenant shows none:\n%s", res.stdout)
	}
	s.build.Tenant = p("team-a")
	res = s.kiln(context.Background(), "builds", "show", "b1")
	if f := fieldsOf(res.stdout, "namespace:"); !reflect.DeepEqual(f, []string{"namespace:", "team-a"}) {
		t.Errorf("show should give the build's tenant, got %q:\n%s", f, res)
	}
	res = s.kiln(context.Background(), "builds", "show", "--json", "b1")
	var b api.Build
	if err := json.Unmarshal([]byte(res.stdout), &b); err != nil || b.Id != "b1" || b.Status != api.BuildStatusFailed {
		t.Errorf("--json gave %v (%v):\n%s", b, err, res)
	}
	res = s.kiln(context.Background(), "builds", "show", "nope")
	if res.code != 1 || !strings.Contains(res.stderr, "no build nope") {
		t.Errorf("want exit 1 with the server's message:\n%s", res)
	}
}

func TestBuildsCancel(t *testing.T) {
	s := newFakeServer(t)
	s.buildIDs("b1")
	res := s.kiln(context.Background(), "builds", "cancel", "b1")
	if res.code != 0 || !strings.Contains(res.stdout, "build b1 canceled") {
		t.Errorf("%s", res)
	}
	s.cancelFinished = true
	res = s.kiln(context.Background(), "builds", "cancel", "b1")
	if res.code != 1 {
		t.Errorf("want exit 1 for a finished build:\n%s", res)
	}
	if !strings.Contains(res.stdout, "succeeded") || !strings.Contains(res.stdout, "digest:") {
		t.Errorf("the final state should be printed:\n%s", res)
	}
	if !strings.Contains(res.stderr, "already finished") {
		t.Errorf("stderr should say why nothing was canceled:\n%s", res)
	}
}

func TestBuildsLogs(t *testing.T) {
	s := newFakeServer(t)
	final := finishedBuild(api.BuildStatusSucceeded, "")
	s.events = eventScript(4, &final)
	s.plan = func(call int) eventsPlan {
		if call == 0 {
			return eventsPlan{send: 7, partial: true}
		}
		return eventsPlan{send: -1}
	}
	// What the server's GET /logs renders from the same events.
	want := "12:00:00 [status] running\n" +
		"12:00:00 [phase] solving\n" +
		"12:00:00 [1/3] FROM docker.io/library/alpine:3\n" +
		"12:00:00 CACHED [1/3] FROM docker.io/library/alpine:3\n" +
		"12:00:00 [2/3] RUN make\n" +
		"12:00:00 | compiling unit 1\n" +
		"12:00:00 | compiling unit 2\n" +
		"12:00:00 | compiling unit 3\n" +
		"12:00:00 | compiling unit 4\n" +
		"12:00:01 [phase] pushing\n" +
		"12:00:01 [kiln] pushed builds/b1\n"
	lines := strings.SplitAfter(want, "\n")
	logSoFar := want
	s.handle("GET /v1/builds/b1/logs", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, logSoFar)
	})
	s.buildIDs("b1")

	res := s.kiln(context.Background(), "builds", "logs", "b1")
	if res.code != 0 || res.stdout != want {
		t.Errorf("plain log:\n%s", res)
	}
	res = s.kiln(context.Background(), "builds", "logs", "-f", "b1")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	if res.stdout != want {
		t.Errorf("followed log differs from the plain one:\n%s\nwant:\n%s", res.stdout, want)
	}
	if !strings.Contains(res.stderr, "build b1 succeeded") {
		t.Errorf("stderr should give the outcome:\n%s", res)
	}

	res = s.kiln(context.Background(), "builds", "logs", "--tail", "2", "b1")
	if res.code != 0 || res.stdout != strings.Join(lines[9:], "") {
		t.Errorf("--tail 2:\n%s", res)
	}
	res = s.kiln(context.Background(), "builds", "logs", "-n", "0", "b1")
	if res.code != 0 || res.stdout != "" {
		t.Errorf("--tail 0:\n%s", res)
	}
	res = s.kiln(context.Background(), "builds", "logs", "--tail", "100", "b1")
	if res.code != 0 || res.stdout != want {
		t.Errorf("--tail 100:\n%s", res)
	}
	// Following with --tail: the last lines so far, then the rest as it
	// comes, no line twice.
	logSoFar = strings.Join(lines[:7], "")
	res = s.kiln(context.Background(), "builds", "logs", "-f", "--tail", "2", "b1")
	if res.code != 0 || res.stdout != strings.Join(lines[5:], "") {
		t.Errorf("-f --tail 2 after 7 lines:\n%s\nwant:\n%s", res, strings.Join(lines[5:], ""))
	}
	for _, bad := range []string{"-1", "x"} {
		if res := s.kiln(context.Background(), "builds", "logs", "--tail", bad, "b1"); res.code != 2 {
			t.Errorf("--tail %s: want a usage error:\n%s", bad, res)
		}
	}
}

func TestImages(t *testing.T) {
	s := newFakeServer(t)
	created := time.Now().Add(-2 * time.Hour)
	s.handle("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.ImageList{Images: []api.Image{{
			Name: "team/app:latest", Repository: "team/app", Tag: "latest", Size: p(int64(3 << 20)),
			Digest: "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", BuildId: p("b1"), CreatedAt: &created,
		}}})
	})
	var tagPath, tagName string
	s.handle("POST /v1/images/team/app:latest/tags", func(w http.ResponseWriter, r *http.Request) {
		// Path parameters are one segment: the slash must arrive escaped.
		tagPath = r.URL.EscapedPath()
		var req api.TagRequest
		json.NewDecoder(r.Body).Decode(&req)
		tagName = req.Name
		writeJSON(w, http.StatusCreated, api.Image{Name: req.Name, Repository: "team/app", Tag: "v2", Digest: "sha256:aaaa"})
	})
	s.handle("DELETE /v1/images/team/app:old", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	})
	s.handle("DELETE /v1/images/team/app:gone", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no image named team/app:gone", "not_found")
	})

	res := s.kiln(context.Background(), "images", "ls")
	lines := strings.Split(strings.TrimSpace(res.stdout), "\n")
	if res.code != 0 || len(lines) != 2 || !reflect.DeepEqual(strings.Fields(lines[1]), []string{"team/app:latest", "sha256:aaaaaaaaaaaa", "3.0", "MiB", "b1", "2h"}) {
		t.Errorf("images ls:\n%s", res)
	}
	res = s.kiln(context.Background(), "images", "tag", "team/app:latest", "team/app:v2")
	if res.code != 0 || tagName != "team/app:v2" || !strings.Contains(res.stdout, "team/app:v2 -> sha256:aaaa") {
		t.Errorf("images tag (name %q):\n%s", tagName, res)
	}
	if tagPath != "/v1/images/team%2Fapp:latest/tags" {
		t.Errorf("tag request path %q: the image name must be one escaped segment", tagPath)
	}
	res = s.kiln(context.Background(), "images", "rm", "team/app:old")
	if res.code != 0 || !strings.Contains(res.stdout, "removed team/app:old") {
		t.Errorf("images rm:\n%s", res)
	}
	res = s.kiln(context.Background(), "images", "rm", "team/app:gone")
	if res.code != 1 || res.stderr != "kiln: no image named team/app:gone\n" {
		t.Errorf("want the server's message and exit 1:\n%s", res)
	}
}

func TestCache(t *testing.T) {
	s := newFakeServer(t)
	used := time.Now().Add(-90 * time.Minute)
	s.handle("GET /v1/cache", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.CacheVolumeList{Volumes: []api.CacheVolume{
			{Scope: "team", SizeBytes: 20 << 30, UsedBytes: 1536 << 20, AllocatedBytes: 3 << 30, LastUsed: &used, InUse: true},
			{Scope: "fresh", SizeBytes: 10 << 30},
		}})
	})
	s.handle("DELETE /v1/cache/team", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusConflict, "cache scope team is in use by build b7; retry when it finishes", "conflict")
	})
	s.handle("DELETE /v1/cache/fresh", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })

	res := s.kiln(context.Background(), "cache", "ls")
	want := [][]string{
		{"SCOPE", "SIZE", "USED", "ALLOCATED", "LAST-USED", "IN-USE"},
		{"team", "20.0", "GiB", "1.5", "GiB", "3.0", "GiB", "1h", "ago", "yes"},
		{"fresh", "10.0", "GiB", "0", "B", "0", "B", "never", "no"},
	}
	lines := strings.Split(strings.TrimSpace(res.stdout), "\n")
	if res.code != 0 || len(lines) != 3 {
		t.Fatalf("cache ls:\n%s", res)
	}
	for i := range want {
		if got := strings.Fields(lines[i]); !reflect.DeepEqual(got, want[i]) {
			t.Errorf("line %d: %q, want %q", i, got, want[i])
		}
	}
	res = s.kiln(context.Background(), "cache", "rm", "team")
	if res.code != 1 || !strings.Contains(res.stderr, "in use by build b7") {
		t.Errorf("want the 409 message, exit 1:\n%s", res)
	}
	res = s.kiln(context.Background(), "cache", "rm", "fresh")
	if res.code != 0 {
		t.Errorf("%s", res)
	}
}

func TestTokenCreate(t *testing.T) {
	s := newFakeServer(t)
	var got api.TokenRequest
	s.handle("POST /v1/tokens", func(w http.ResponseWriter, r *http.Request) {
		json.NewDecoder(r.Body).Decode(&got)
		writeJSON(w, http.StatusCreated, api.Token{Token: "eyJ.new.token", Id: "tok1", Tenant: "team", ExpiresAt: time.Now().Add(24 * time.Hour)})
	})
	res := s.kiln(context.Background(), "token", "create", "--subject", "ci", "--scope", "build:write,build:read", "--scope", "image:read", "--cache-scope", "team", "--ttl", "48h")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	if res.stdout != "eyJ.new.token\n" {
		t.Errorf("stdout must be the token alone, got %q", res.stdout)
	}
	want := api.TokenRequest{Subject: "ci", Scopes: []string{"build:write", "build:read", "image:read"}, CacheScope: p("team"), Ttl: p("48h")}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("request %+v, want %+v", got, want)
	}
	if !strings.HasPrefix(res.stderr, "kiln: token tok1 for ci (namespace team) expires ") {
		t.Errorf("stderr should name the token id and its namespace: %q", res.stderr)
	}
}

func TestTokenCreateNamespace(t *testing.T) {
	s := newFakeServer(t)
	var raw map[string]any
	s.handle("POST /v1/tokens", func(w http.ResponseWriter, r *http.Request) {
		json.NewDecoder(r.Body).Decode(&raw)
		writeJSON(w, http.StatusCreated, api.Token{Token: "eyJ.ns.token", Id: "tok7", Tenant: "team-a", ExpiresAt: time.Now().Add(time.Hour)})
	})
	res := s.kiln(context.Background(), "token", "create", "--subject", "alice", "--scope", "build:write", "--namespace", "team-a")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	if res.stdout != "eyJ.ns.token\n" {
		t.Errorf("stdout must be the token alone, got %q", res.stdout)
	}
	want := map[string]any{"subject": "alice", "scopes": []any{"build:write"}, "namespace": "team-a", "ttl": "24h"}
	if !reflect.DeepEqual(raw, want) {
		t.Errorf("request body %v, want %v", raw, want)
	}
	if !strings.HasPrefix(res.stderr, "kiln: token tok7 for alice (namespace team-a) expires ") || strings.Contains(res.stderr, "eyJ") {
		t.Errorf("stderr: %q", res.stderr)
	}

	// Without --namespace the field is left out, for the server to derive.
	raw = nil
	res = s.kiln(context.Background(), "token", "create", "--subject", "bob", "--scope", "build:read", "--cache-scope", "team-b.ci")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	if _, ok := raw["namespace"]; ok || raw["cache_scope"] != "team-b.ci" {
		t.Errorf("request body %v: want cache_scope and no namespace", raw)
	}

	// An explicitly empty namespace is a usage error; nothing is sent.
	before := len(s.seenRequests())
	res = s.kiln(context.Background(), "token", "create", "--subject", "bob", "--scope", "build:read", "--namespace", "")
	if sent := s.seenRequests()[before:]; res.code != 2 || !strings.Contains(res.stderr, "--namespace") || len(sent) != 0 {
		t.Errorf("want a usage error and no request (sent %q):\n%s", sent, res)
	}

	// The server's refusal of a bad namespace reaches the user.
	s.handle("POST /v1/tokens", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusBadRequest, `namespace "Team.A" is invalid`, "bad_request")
	})
	res = s.kiln(context.Background(), "token", "create", "--subject", "bob", "--scope", "build:read", "--namespace", "Team.A")
	if res.code != 1 || res.stderr != "kiln: namespace \"Team.A\" is invalid\n" || res.stdout != "" {
		t.Errorf("want the server's message, exit 1, nothing on stdout:\n%s", res)
	}
}

func TestTokenList(t *testing.T) {
	s := newFakeServer(t)
	now := time.Now()
	revoked := now.Add(-3 * time.Hour)
	s.handle("GET /v1/tokens", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.TokenList{Tokens: []api.TokenInfo{
			{Id: "tok3", Subject: "alice", Tenant: "team-a", CacheScope: "team-a", Scopes: []string{"build:write", "image:read"},
				CreatedAt: now.Add(-time.Minute), ExpiresAt: now.Add(24 * time.Hour)},
			{Id: "tok2", Subject: "ci", Tenant: "team-b", CacheScope: "team-b.ci", Scopes: []string{"build:read"},
				CreatedAt: now.Add(-5 * 24 * time.Hour), ExpiresAt: now.Add(-2 * 24 * time.Hour)},
			{Id: "tok1", Subject: "ops", Tenant: "", CacheScope: "ops", Scopes: []string{"build:admin"},
				CreatedAt: now.Add(-4 * time.Hour), ExpiresAt: now.Add(20 * 24 * time.Hour), RevokedAt: &revoked},
		}})
	})
	res := s.kiln(context.Background(), "token", "ls")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	want := [][]string{
		{"ID", "SUBJECT", "NAMESPACE", "SCOPES", "EXPIRES", "REVOKED"},
		{"tok3", "alice", "team-a", "build:write,image:read", "in", "23h", "-"},
		{"tok2", "ci", "team-b", "build:read", "expired", "2d", "ago", "-"},
		{"tok1", "ops", "-", "build:admin", "in", "19d", "3h", "ago"},
	}
	lines := strings.Split(strings.TrimSpace(res.stdout), "\n")
	if len(lines) != len(want) {
		t.Fatalf("want a header and 3 rows:\n%s", res.stdout)
	}
	for i := range want {
		if got := strings.Fields(lines[i]); !reflect.DeepEqual(got, want[i]) {
			t.Errorf("line %d: %q, want %q", i, got, want[i])
		}
	}
	if reqs := s.seenRequests(); !reflect.DeepEqual(reqs, []string{"GET /v1/tokens"}) {
		t.Errorf("requests %q", reqs)
	}

	s.handle("GET /v1/tokens", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusForbidden, "this needs scope build:admin", "forbidden")
	})
	res = s.kiln(context.Background(), "token", "list")
	if res.code != 1 || res.stderr != "kiln: this needs scope build:admin\n" {
		t.Errorf("want the 403 message and exit 1:\n%s", res)
	}
}

func TestTokenRevoke(t *testing.T) {
	s := newFakeServer(t)
	now := time.Now()
	var method, path string
	s.handle("POST /v1/tokens/tok3/revoke", func(w http.ResponseWriter, r *http.Request) {
		method, path = r.Method, r.URL.Path
		writeJSON(w, http.StatusOK, api.TokenInfo{Id: "tok3", Subject: "alice", Tenant: "team-a", CacheScope: "team-a",
			Scopes: []string{"build:write"}, CreatedAt: now.Add(-time.Hour), ExpiresAt: now.Add(time.Hour), RevokedAt: &now})
	})
	s.handle("POST /v1/tokens/nope/revoke", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no token nope", "not_found")
	})
	res := s.kiln(context.Background(), "token", "revoke", "tok3")
	if res.code != 0 || res.stdout != "revoked token tok3 (subject alice)\n" {
		t.Errorf("token revoke:\n%s", res)
	}
	if method != http.MethodPost || path != "/v1/tokens/tok3/revoke" {
		t.Errorf("request %s %s", method, path)
	}
	res = s.kiln(context.Background(), "token", "revoke", "nope")
	if res.code != 1 || res.stderr != "kiln: no token nope\n" {
		t.Errorf("want the 404 message and exit 1:\n%s", res)
	}
	res = s.kiln(context.Background(), "token", "revoke")
	if res.code != 2 {
		t.Errorf("revoke without an ID: want exit 2:\n%s", res)
	}
}

func TestWhoami(t *testing.T) {
	s := newFakeServer(t)
	who := api.Whoami{Subject: "alice", Tenant: "team-a", CacheScope: "team-a.ci", Scopes: []string{"build:write", "image:read"},
		TokenId: "tok3", ExpiresAt: time.Now().Add(24 * time.Hour), ImagePrefix: "team-a/"}
	s.handle("GET /v1/whoami", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, who) })

	res := s.kiln(context.Background(), "whoami")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	want := [][]string{
		{"subject:", "alice"},
		{"namespace:", "team-a"},
		{"cache", "scope:", "team-a.ci"},
		{"scopes:", "build:write,", "image:read"},
		{"token", "id:", "tok3"},
	}
	lines := strings.Split(strings.TrimSpace(res.stdout), "\n")
	if len(lines) != 7 {
		t.Fatalf("want 6 fields and the naming line:\n%s", res.stdout)
	}
	for i := range want {
		if got := strings.Fields(lines[i]); !reflect.DeepEqual(got, want[i]) {
			t.Errorf("line %d: %q, want %q", i, got, want[i])
		}
	}
	if f := strings.Fields(lines[5]); len(f) != 4 || f[0] != "expires:" || f[2] != "(in" || f[3] != "23h)" {
		t.Errorf("expiry line %q", lines[5])
	}
	if lines[6] != "images you name app:1 are stored as team-a/app:1" {
		t.Errorf("naming line %q", lines[6])
	}

	who = api.Whoami{Subject: "admin", Tenant: "", CacheScope: "admin", Scopes: []string{"build:admin"},
		TokenId: "", ExpiresAt: time.Now().Add(-time.Hour), Admin: true}
	res = s.kiln(context.Background(), "whoami")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	if f := fieldsOf(res.stdout, "namespace:"); !reflect.DeepEqual(f, []string{"namespace:", "-"}) {
		t.Errorf("admin without a tenant: namespace line %q", f)
	}
	if f := fieldsOf(res.stdout, "token id:"); !reflect.DeepEqual(f, []string{"token", "id:", "-"}) {
		t.Errorf("token without an id: token id line %q", f)
	}
	for _, w := range []string{"(expired 1h ago)", "\nyou are an admin: images are named as you give them, in every namespace\n"} {
		if !strings.Contains(res.stdout, w) {
			t.Errorf("admin whoami lacks %q:\n%s", w, res.stdout)
		}
	}
	if strings.Contains(res.stdout, "stored as") {
		t.Errorf("an admin's names are not rewritten:\n%s", res.stdout)
	}

	res = s.kiln(context.Background(), "whoami", "extra")
	if res.code != 2 {
		t.Errorf("whoami takes no arguments: want exit 2:\n%s", res)
	}
}

func TestHumanUntil(t *testing.T) {
	now := time.Date(2025, 1, 2, 12, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		d    time.Duration
		want string
	}{
		{24*time.Hour - time.Second, "in 23h"},
		{90 * time.Second, "in 1m"},
		{72 * time.Hour, "in 3d"},
		{0, "expired 0s ago"},
		{-2 * 24 * time.Hour, "expired 2d ago"},
	} {
		if got := humanUntil(now, now.Add(c.d)); got != c.want {
			t.Errorf("humanUntil(%v) = %q, want %q", c.d, got, c.want)
		}
	}
}

func TestTokenSources(t *testing.T) {
	s := newFakeServer(t)
	s.handle("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.ImageList{Images: []api.Image{}})
	})
	t.Chdir(t.TempDir())
	t.Setenv("KILN_TOKEN", "")
	t.Setenv("KILN_ADDR", s.srv.URL)

	res := runKiln(context.Background(), nil, "images", "ls")
	if res.code != 1 || !strings.Contains(res.stderr, "missing or invalid token") || !strings.Contains(res.stderr, "no token given") {
		t.Errorf("without a token: want the server's 401 message and a hint:\n%s", res)
	}

	if err := os.MkdirAll("kiln-data", 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join("kiln-data", "admin.token"), []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	res = runKiln(context.Background(), nil, "images", "ls")
	if res.code != 0 {
		t.Errorf("./kiln-data/admin.token should be used:\n%s", res)
	}

	t.Setenv("KILN_TOKEN", "wrong")
	res = runKiln(context.Background(), nil, "images", "ls")
	if res.code != 1 || !strings.Contains(res.stderr, "token from KILN_TOKEN") {
		t.Errorf("KILN_TOKEN should win over the file:\n%s", res)
	}
	res = runKiln(context.Background(), nil, "images", "ls", "--token", testToken)
	if res.code != 0 {
		t.Errorf("--token should win over KILN_TOKEN:\n%s", res)
	}
}

func TestUnreachableServer(t *testing.T) {
	res := runKiln(context.Background(), nil, "builds", "ls", "--addr", "http://127.0.0.1:1", "--token", "x")
	if res.code != 1 || !strings.Contains(res.stderr, "cannot reach kiln at http://127.0.0.1:1") {
		t.Errorf("%s", res)
	}
}

func TestSSEReader(t *testing.T) {
	stream := ": heartbeat\r\n\r\n" +
		"id: 1\r\nevent: log\r\ndata: {\"a\":1}\r\n\r\n" +
		"id: 2\revent: phase\rdata: line one\rdata: line two\r\r" +
		"event: nodata\n\n" +
		"id:3\ndata:x\n: comment inside\nretry: 100\n\n" +
		"id: 4\ndata: {\"cut\":"
	rd := newSSEReader(strings.NewReader(stream))
	var got []sseEvent
	for {
		ev, err := rd.next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ev)
	}
	want := []sseEvent{
		{id: "1", event: "log", data: []byte(`{"a":1}`)},
		{id: "2", event: "phase", data: []byte("line one\nline two")},
		{id: "3", data: []byte("x")},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

func TestExitCode(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{nil, 0},
		{errors.New("boom"), 1},
		{&apiError{Status: 403, Message: "no"}, 1},
		{usageError(nil, "bad"), 2},
		{interrupted("stop"), 130},
		{errors.New(`unknown command "frob" for "kiln"`), 2},
	} {
		if got := ExitCode(c.err); got != c.want {
			t.Errorf("ExitCode(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}

func TestRegistryGC(t *testing.T) {
	s := newFakeServer(t)
	s.handle("POST /v1/registry/gc", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.RegistryGC{BlobsBefore: 12, BlobsAfter: 9, BytesBefore: 5 << 20, BytesAfter: 2 << 20, BytesFreed: 3 << 20, TookMs: 1500})
	})
	res := s.kiln(context.Background(), "registry", "gc")
	if res.code != 0 || res.stdout != "deleted 3 of 12 blobs, freed 3.0 MiB (2.0 MiB left) in 1.5s\n" {
		t.Errorf("registry gc:\n%s", res)
	}
	s.handle("POST /v1/registry/gc", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusConflict, "a registry garbage collection is already running; wait for it to finish", "conflict")
	})
	res = s.kiln(context.Background(), "registry", "gc")
	if res.code != 1 || !strings.Contains(res.stderr, "already running") {
		t.Errorf("want the 409 message and exit 1:\n%s", res)
	}
}

// fieldsOf returns the fields of the first line of out that starts with
// prefix, or nil.
func fieldsOf(out, prefix string) []string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return strings.Fields(l)
		}
	}
	return nil
}
