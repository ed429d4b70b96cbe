package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-build/kiln/api"
)

// buildIDs makes GET /v1/builds answer id_prefix queries from ids, as
// the server does, and records the prefixes asked.
func (s *fakeServer) buildIDs(ids ...string) *[]string {
	var mu sync.Mutex
	var asked []string
	s.handle("GET /v1/builds", func(w http.ResponseWriter, r *http.Request) {
		prefix := r.URL.Query().Get("id_prefix")
		mu.Lock()
		asked = append(asked, prefix)
		mu.Unlock()
		list := api.BuildList{Builds: []api.Build{}}
		for _, id := range ids {
			if strings.HasPrefix(id, prefix) {
				b := testBuild(api.BuildStatusSucceeded)
				b.Id = id
				list.Builds = append(list.Builds, b)
			}
		}
		writeJSON(w, http.StatusOK, list)
	})
	return &asked
}

func TestBuildIDPrefixes(t *testing.T) {
	s := newFakeServer(t)
	full := "b0k3m5n7p9q1r2s4t6v8w0x2y4z"
	asked := s.buildIDs(full, "b0k4aaaaaaaaaaaaaaaaaaaaaaa", "b0k4bbbbbbbbbbbbbbbbbbbbbbb")
	var got []string
	s.build = finishedBuild(api.BuildStatusSucceeded, "")
	s.build.Id = full
	s.handle("GET /v1/builds/"+full+"/logs", func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.URL.Path)
		w.Write([]byte("12:00:00 | hi\n"))
	})

	res := s.kiln(context.Background(), "builds", "show", "-q", "b0k3")
	if res.code != 0 || res.stdout != full+"\n" {
		t.Errorf("show -q of a unique prefix:\n%s", res)
	}
	if reqs := s.seenRequests(); reqs[len(reqs)-1] != "GET /v1/builds/"+full {
		t.Errorf("the build was fetched as %q", reqs[len(reqs)-1])
	}
	res = s.kiln(context.Background(), "builds", "logs", "b0k3m")
	if res.code != 0 || res.stdout != "12:00:00 | hi\n" || len(got) != 1 {
		t.Errorf("logs of a unique prefix:\n%s", res)
	}
	res = s.kiln(context.Background(), "builds", "cancel", "b0k3m5")
	if res.code != 0 {
		t.Errorf("cancel of a unique prefix:\n%s", res)
	}

	res = s.kiln(context.Background(), "builds", "show", "b0k4")
	if res.code != 1 || !strings.Contains(res.stderr, "build id b0k4 is ambiguous") ||
		!strings.Contains(res.stderr, "b0k4aaaaaaaaaaaaaaaaaaaaaaa") || !strings.Contains(res.stderr, "b0k4bbbbbbbbbbbbbbbbbbbbbbb") {
		t.Errorf("an ambiguous prefix should list the candidates:\n%s", res)
	}
	res = s.kiln(context.Background(), "builds", "show", "b9")
	if res.code != 1 || !strings.Contains(res.stderr, "no build b9") {
		t.Errorf("a prefix matching nothing:\n%s", res)
	}
	n := len(*asked)
	// A whole id, or what cannot start one, is not looked up.
	s.kiln(context.Background(), "builds", "show", full)
	s.kiln(context.Background(), "builds", "show", "nope")
	if len(*asked) != n {
		t.Errorf("looked up %q", (*asked)[n:])
	}
	if want := []string{"b0k3", "b0k3m", "b0k3m5", "b0k4", "b9"}; !reflect.DeepEqual(*asked, want) {
		t.Errorf("prefixes asked %q, want %q", *asked, want)
	}
}

func TestListFormats(t *testing.T) {
	s := newFakeServer(t)
	created := time.Now().Add(-time.Hour)
	var imageQueries []url.Values
	s.handle("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		imageQueries = append(imageQueries, r.URL.Query())
		writeJSON(w, http.StatusOK, api.ImageList{Images: []api.Image{
			{Name: "team/app:1", Repository: "team/app", Tag: "1", Digest: "sha256:aaaa", Size: p(int64(1234567)), CreatedAt: &created},
			{Name: "team/web:2", Repository: "team/web", Tag: "2", Digest: "sha256:bbbb", Size: p(int64(2048))},
		}})
	})
	s.handle("GET /v1/builds", func(w http.ResponseWriter, r *http.Request) {
		b1 := finishedBuild(api.BuildStatusSucceeded, "")
		b1.Image = "builds/b1:latest"
		b2 := finishedBuild(api.BuildStatusFailed, "boom")
		b2.Id, b2.Image = "b2", ""
		writeJSON(w, http.StatusOK, api.BuildList{Builds: []api.Build{b1, b2}})
	})
	s.handle("GET /v1/cache", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.CacheVolumeList{Volumes: []api.CacheVolume{{Scope: "team", SizeBytes: 1 << 30}, {Scope: "ci"}}})
	})
	s.handle("GET /v1/builders", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.BuilderList{Builders: []api.Builder{{Scope: "team", Runtime: "vm", State: "idle", Started: created, LastUsed: created, MemoryMb: 512, Builds: 3}}})
	})
	ctx := context.Background()

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"images", "ls", "-q"}, "team/app:1\nteam/web:2\n"},
		{[]string{"images", "ls", "--format", "{{.name}} {{.size}} {{size .size}} {{short .digest}}"}, "team/app:1 1234567 1.2 MiB sha256:aaaa\nteam/web:2 2048 2.0 KiB sha256:bbbb\n"},
		{[]string{"builds", "ls", "-q"}, "b1\nb2\n"},
		{[]string{"builds", "ls", "--format", "{{.id}} {{.status}} [{{.image}}]"}, "b1 succeeded [builds/b1:latest]\nb2 failed [<no value>]\n"},
		{[]string{"cache", "ls", "-q"}, "team\nci\n"},
		{[]string{"cache", "ls", "--format", `{{.scope}}\t{{.in_use}}`}, "team\tfalse\nci\tfalse\n"},
		{[]string{"cache", "ls", "--format", "{{.scope}}={{.size_bytes}}"}, "team=1073741824\nci=0\n"},
		{[]string{"builders", "ls", "-q"}, "team\n"},
	} {
		res := s.kiln(ctx, c.args...)
		if res.code != 0 || res.stdout != c.want {
			t.Errorf("kiln %s:\n%s\nwant stdout %q", strings.Join(c.args, " "), res, c.want)
		}
	}

	// --format json: one API object per line.
	jsonLines := func(args ...string) []map[string]any {
		t.Helper()
		res := s.kiln(ctx, append(args, "--format", "json")...)
		if res.code != 0 {
			t.Fatalf("%s", res)
		}
		var out []map[string]any
		dec := json.NewDecoder(strings.NewReader(res.stdout))
		for dec.More() {
			var m map[string]any
			if err := dec.Decode(&m); err != nil {
				t.Fatalf("kiln %s --format json: %v\n%s", strings.Join(args, " "), err, res.stdout)
			}
			out = append(out, m)
		}
		if n := strings.Count(res.stdout, "\n"); n != len(out) {
			t.Errorf("kiln %s --format json: %d lines for %d objects", strings.Join(args, " "), n, len(out))
		}
		return out
	}
	if im := jsonLines("images", "ls"); len(im) != 2 || im[0]["name"] != "team/app:1" || im[0]["size"] != float64(1234567) {
		t.Errorf("images ls --format json: %v", im)
	}
	if b := jsonLines("builds", "ls"); len(b) != 2 || b[0]["image"] != "builds/b1:latest" {
		t.Errorf("builds ls --format json: %v", b)
	} else if _, has := b[1]["image"]; has {
		t.Errorf("a failed build names an image: %v", b[1])
	}
	if v := jsonLines("cache", "ls"); len(v) != 2 || v[1]["scope"] != "ci" {
		t.Errorf("cache ls --format json: %v", v)
	}
	if b := jsonLines("builders", "ls"); len(b) != 1 || b[0]["runtime"] != "vm" {
		t.Errorf("builders ls --format json: %v", b)
	}

	// images ls hides per-build names unless --all, and passes the filter.
	imageQueries = nil
	s.kiln(ctx, "images", "ls")
	s.kiln(ctx, "images", "ls", "--all")
	s.kiln(ctx, "images", "ls", "team/*")
	want := []url.Values{{"include_builds": {"false"}}, {}, {"include_builds": {"false"}, "filter": {"team/*"}}}
	if !reflect.DeepEqual(imageQueries, want) {
		t.Errorf("images ls queries %v, want %v", imageQueries, want)
	}

	for _, args := range [][]string{
		{"images", "ls", "--format", "yaml"},
		{"images", "ls", "--format", "{{.name"},
		{"builds", "ls", "-q", "--format", "json"},
		{"images", "ls", "a", "b"},
		{"builds", "show", "--json", "--format", "{{.id}}", "b1"},
	} {
		before := len(s.seenRequests())
		if res := s.kiln(ctx, args...); res.code != 2 || len(s.seenRequests()) != before {
			t.Errorf("kiln %s: want a usage error and no request:\n%s", strings.Join(args, " "), res)
		}
	}
}

func TestBuildsShowFormats(t *testing.T) {
	s := newFakeServer(t)
	s.buildIDs("b1")
	s.build = finishedBuild(api.BuildStatusSucceeded, "")
	s.build.Image = "builds/b1:latest"
	res := s.kiln(context.Background(), "builds", "show", "--format", "json", "b1")
	var b api.Build
	if err := json.Unmarshal([]byte(res.stdout), &b); err != nil || b.Id != "b1" || b.Image != "builds/b1:latest" {
		t.Errorf("--format json gave %v (%v):\n%s", b, err, res)
	}
	res = s.kiln(context.Background(), "builds", "show", "--format", "{{.status}} {{.image_digest}}", "b1")
	if res.code != 0 || res.stdout != "succeeded "+*s.build.ImageDigest+"\n" {
		t.Errorf("template:\n%s", res)
	}
	res = s.kiln(context.Background(), "builds", "show", "b1")
	if f := fieldsOf(res.stdout, "image:"); !reflect.DeepEqual(f, []string{"image:", "builds/b1:latest"}) {
		t.Errorf("image line %q:\n%s", f, res)
	}
	s.build = finishedBuild(api.BuildStatusFailed, "boom")
	s.build.Image = ""
	res = s.kiln(context.Background(), "builds", "show", "b1")
	if strings.Contains(res.stdout, "image:") {
		t.Errorf("a failed build shows an image:\n%s", res)
	}
}

// runVersion runs kiln version in-process.
func runVersion(args ...string) result {
	var out, errOut bytes.Buffer
	root := &cobra.Command{Use: "kiln", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(newVersionCommand(testSettings))
	root.SetArgs(append([]string{"version"}, args...))
	root.SetOut(&out)
	root.SetErr(&errOut)
	err := root.ExecuteContext(context.Background())
	if err != nil {
		errOut.WriteString("kiln: " + err.Error() + "\n")
	}
	return result{ExitCode(err), out.String(), errOut.String()}
}

func TestVersion(t *testing.T) {
	s := newFakeServer(t)
	img := "sha256:" + strings.Repeat("c", 64)
	s.handle("GET /v1/version", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.ServerVersion{Version: "v1.2.3", Commit: p("abcdef123456"), GoVersion: "go1.26.0", Os: "linux", Arch: "amd64",
			Buildkit: "v0.34.2", Runtime: "vm", BuilderImage: &img})
	})
	res := runVersion("--addr", s.srv.URL, "--token", testToken)
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	client, server, ok := strings.Cut(res.stdout, "\nServer: "+s.srv.URL+"\n")
	if !ok || !strings.HasPrefix(client, "Client:\n") || fieldsOf(client, " Version:") == nil {
		t.Fatalf("want a Client and a Server section:\n%s", res)
	}
	for k, v := range map[string]string{" Version:": "v1.2.3", " BuildKit:": "v0.34.2", " Runtime:": "vm", " Builder image:": img, " Commit:": "abcdef123456"} {
		if f := fieldsOf(server, k); len(f) == 0 || f[len(f)-1] != v {
			t.Errorf("server %s %q, want %s:\n%s", k, f, v, res.stdout)
		}
	}
	res = runVersion("--addr", s.srv.URL, "--token", testToken, "--format", "{{.server.buildkit}} {{.client.go_version}}")
	if res.code != 0 || !strings.HasPrefix(res.stdout, "v0.34.2 go1.") {
		t.Errorf("template:\n%s", res)
	}
	res = runVersion("--addr", s.srv.URL, "--token", testToken, "--format", "json")
	var v struct {
		Client map[string]any
		Server *api.ServerVersion
	}
	if err := json.Unmarshal([]byte(res.stdout), &v); err != nil || v.Server == nil || v.Server.Version != "v1.2.3" || v.Client["version"] == "" {
		t.Errorf("json (%v):\n%s", err, res)
	}

	// No server: the client part, the reason, exit 1.
	res = runVersion("--addr", "http://127.0.0.1:1", "--token", "x")
	if res.code != 1 || !strings.HasPrefix(res.stdout, "Client:\n") || strings.Contains(res.stdout, "Server") ||
		!strings.Contains(res.stderr, "cannot reach kiln at http://127.0.0.1:1") {
		t.Errorf("without a server:\n%s", res)
	}
	res = runVersion("--addr", "http://127.0.0.1:1", "--token", "x", "--format", "json")
	if res.code != 1 || !strings.Contains(res.stdout, `"server": null`) {
		t.Errorf("json without a server:\n%s", res)
	}
}
