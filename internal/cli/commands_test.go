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
	s.handle("GET /v1/builds/b1/logs", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "#2 [2/3] RUN make\n#2 0.1 compiling\n")
	})

	res := s.kiln(context.Background(), "builds", "logs", "b1")
	if res.code != 0 || res.stdout != "#2 [2/3] RUN make\n#2 0.1 compiling\n" {
		t.Errorf("plain log:\n%s", res)
	}
	res = s.kiln(context.Background(), "builds", "logs", "-f", "b1")
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	want := "compiling unit 1\ncompiling unit 2\ncompiling unit 3\ncompiling unit 4\n"
	if res.stdout != want {
		t.Errorf("followed log %q, want %q", res.stdout, want)
	}
	if !strings.Contains(res.stderr, "build b1 succeeded") {
		t.Errorf("stderr should give the outcome:\n%s", res)
	}
}

func TestImages(t *testing.T) {
	s := newFakeServer(t)
	created := time.Now().Add(-2 * time.Hour)
	s.handle("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.ImageList{Images: []api.Image{{
			Name: "team/app:latest", Repository: "team/app", Tag: "latest",
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
	if res.code != 0 || len(lines) != 2 || !reflect.DeepEqual(strings.Fields(lines[1]), []string{"team/app:latest", "sha256:aaaaaaaaaaaa", "b1", "2h"}) {
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
		writeJSON(w, http.StatusCreated, api.Token{Token: "eyJ.new.token", ExpiresAt: time.Now().Add(24 * time.Hour)})
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
