package cli

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/api"
)

// TestMain keeps the tests off the user's own client config.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kiln-cli-config")
	if err != nil {
		panic(err)
	}
	os.Setenv("XDG_CONFIG_HOME", dir)
	os.Unsetenv("KILN_CONTEXT")
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// isolate gives a test its own config dir and working dir, with none of
// the KILN_ variables set; it returns the config file's path.
func isolate(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	for _, v := range []string{"KILN_ADDR", "KILN_TOKEN", "KILN_CONTEXT"} {
		t.Setenv(v, "")
	}
	t.Chdir(t.TempDir())
	return filepath.Join(dir, "kiln", "config.yaml")
}

// imagesServer is a fake server answering GET /v1/images.
func imagesServer(t *testing.T) *fakeServer {
	s := newFakeServer(t)
	s.handle("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, api.ImageList{Images: []api.Image{{Name: "team/app:1", Digest: "sha256:0123456789abcdef0123"}}})
	})
	return s
}

func (s *fakeServer) asked() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.requests)
}

func writeToken(t *testing.T, tok string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "kiln.token")
	if err := os.WriteFile(f, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestContextPrecedence(t *testing.T) {
	path := isolate(t)
	a, b := imagesServer(t), imagesServer(t)
	tokFile := writeToken(t, testToken)
	ctx := context.Background()

	res := runKiln(ctx, nil, "context", "create", "a", "--addr", a.srv.URL, "--token-file", tokFile, "--progress", "plain", "--use")
	if res.code != 0 || res.stdout != "a\n" {
		t.Fatalf("create: %s", res)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("config file %s: %v %v, want mode 0600", path, err, st)
	}
	raw, _ := os.ReadFile(path)
	if strings.Contains(string(raw), testToken) || !strings.Contains(string(raw), "token_file: "+tokFile) || !strings.Contains(string(raw), "current_context: a") {
		t.Fatalf("config file holds the token or lacks the token file:\n%s", raw)
	}

	// The current context, without --addr or --token.
	if res := runKiln(ctx, nil, "images", "ls", "-q"); res.code != 0 || res.stdout != "team/app:1\n" || a.asked() != 1 {
		t.Fatalf("the context's server should answer: %s", res)
	}
	if ep, err := resolveEndpoint("", ""); err != nil || ep.Progress != "plain" || ep.Context != "a" {
		t.Fatalf("endpoint = %+v, %v", ep, err)
	}
	// --token over the context's token file; the address stays the context's.
	if res := runKiln(ctx, nil, "images", "ls", "--token", "wrong"); res.code != 1 || !strings.Contains(res.stderr, "token from --token") || a.asked() != 2 {
		t.Fatalf("--token should win over the context's token: %s", res)
	}
	// KILN_ADDR over the context; the context's token is not sent there.
	t.Setenv("KILN_ADDR", b.srv.URL)
	if res := runKiln(ctx, nil, "images", "ls"); res.code != 1 || !strings.Contains(res.stderr, "no token given") || b.asked() != 1 {
		t.Fatalf("KILN_ADDR should win, without the context's token: %s", res)
	}
	t.Setenv("KILN_TOKEN", testToken)
	if res := runKiln(ctx, nil, "images", "ls"); res.code != 0 || b.asked() != 2 {
		t.Fatalf("KILN_ADDR and KILN_TOKEN: %s", res)
	}
	// --addr over KILN_ADDR.
	if res := runKiln(ctx, nil, "images", "ls", "--addr", a.srv.URL); res.code != 0 || a.asked() != 3 || b.asked() != 2 {
		t.Fatalf("--addr should win over KILN_ADDR: %s", res)
	}
	t.Setenv("KILN_ADDR", "")
	t.Setenv("KILN_TOKEN", "")

	// KILN_CONTEXT picks another context, or the defaults.
	if res := runKiln(ctx, nil, "context", "create", "b", "--addr", b.srv.URL, "--token-file", tokFile); res.code != 0 {
		t.Fatalf("create b: %s", res)
	}
	t.Setenv("KILN_CONTEXT", "b")
	if res := runKiln(ctx, nil, "images", "ls"); res.code != 0 || b.asked() != 3 {
		t.Fatalf("KILN_CONTEXT=b: %s", res)
	}
	t.Setenv("KILN_CONTEXT", "default")
	if ep, err := resolveEndpoint("", ""); err != nil || ep.Address != defaultAddr || ep.Context != "default" || ep.TokenSource != "" {
		t.Fatalf("KILN_CONTEXT=default: %+v, %v", ep, err)
	}
	t.Setenv("KILN_CONTEXT", "nope")
	res = runKiln(ctx, nil, "images", "ls")
	if res.code != 2 || !strings.Contains(res.stderr, `KILN_CONTEXT names no context "nope"`) || !strings.Contains(res.stderr, "the contexts are: default, a, b") {
		t.Fatalf("unknown KILN_CONTEXT: %s", res)
	}
	t.Setenv("KILN_CONTEXT", "")

	// An unreadable token file is named.
	os.Remove(tokFile)
	res = runKiln(ctx, nil, "images", "ls")
	if res.code != 2 || !strings.Contains(res.stderr, `context "a": cannot read its token file `+tokFile+": no such file or directory") {
		t.Fatalf("missing token file: %s", res)
	}
	// The defaults' admin token is not sent to a context's server.
	os.MkdirAll("kiln-data", 0o700)
	os.WriteFile(filepath.Join("kiln-data", "admin.token"), []byte(testToken), 0o600)
	if res := runKiln(ctx, nil, "context", "rm", "a"); res.code != 0 || !strings.Contains(res.stderr, "was the current context") {
		t.Fatalf("rm a: %s", res)
	}
	if ep, err := resolveEndpoint("", ""); err != nil || ep.Context != "default" || ep.TokenSource != "./"+adminTokenRel {
		t.Fatalf("after rm of the current context: %+v, %v", ep, err)
	}
}

func TestContextCommands(t *testing.T) {
	path := isolate(t)
	ctx := context.Background()
	tokFile := writeToken(t, "secret")

	res := runKiln(ctx, nil, "context", "ls")
	if res.code != 0 || !strings.Contains(res.stdout, "NAME") || !strings.Contains(res.stdout, "default") {
		t.Fatalf("ls with no file: %s", res)
	}
	if _, err := os.Stat(path); err == nil {
		t.Fatalf("ls wrote the config file")
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"prod"}, "--addr is required"},
		{[]string{"default", "--addr", "http://x:1"}, "built-in context"},
		{[]string{"-bad", "--addr", "http://x:1"}, "unknown shorthand flag"},
		{[]string{"a/b", "--addr", "http://x:1"}, "invalid context name"},
		{[]string{"prod", "--addr", "ftp://x"}, "invalid server address"},
		{[]string{"prod", "--addr", "http://x:1", "--progress", "fancy"}, "invalid --progress"},
		{[]string{"prod", "--addr", "http://x:1", "--token-file", "/nonexistent/tok"}, "--token-file /nonexistent/tok: cannot read it: no such file or directory"},
	} {
		res := runKiln(ctx, nil, append([]string{"context", "create"}, c.args...)...)
		if res.code != 2 || !strings.Contains(res.stderr, c.want) {
			t.Errorf("create %v: want exit 2 and %q:\n%s", c.args, c.want, res)
		}
	}
	// A relative token file is stored absolute.
	rel, _ := filepath.Rel(mustGetwd(t), tokFile)
	if res := runKiln(ctx, nil, "context", "create", "prod", "--addr", "kiln.example:7070", "--token-file", rel); res.code != 0 {
		t.Fatalf("create prod: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "create", "prod", "--addr", "http://x:1"); res.code != 1 || !strings.Contains(res.stderr, `context "prod" already exists`) {
		t.Fatalf("duplicate: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "create", "dev", "--addr", "http://127.0.0.1:7071"); res.code != 0 {
		t.Fatalf("create dev: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "use", "prd"); res.code != 1 || !strings.Contains(res.stderr, `no context "prd"`) || !strings.Contains(res.stderr, "the contexts are: default, dev, prod") {
		t.Fatalf("use of an unknown context: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "use", "prod"); res.code != 0 || res.stdout != "prod\n" {
		t.Fatalf("use prod: %s", res)
	}
	res = runKiln(ctx, nil, "context", "ls")
	lines := strings.Split(strings.TrimSpace(res.stdout), "\n")
	if res.code != 0 || len(lines) != 4 || !strings.HasPrefix(lines[3], "prod ") || !strings.HasSuffix(lines[3], "*") ||
		!strings.Contains(lines[3], "http://kiln.example:7070") || !strings.Contains(lines[3], tokFile) || strings.HasSuffix(lines[1], "*") {
		t.Fatalf("ls:\n%s", res)
	}
	res = runKiln(ctx, nil, "context", "ls", "--format", "json")
	var rows []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(res.stdout), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("ls --format json: %v\n%s", err, res)
		}
		rows = append(rows, m)
	}
	if len(rows) != 3 || rows[2]["name"] != "prod" || rows[2]["current"] != true || rows[2]["address"] != "http://kiln.example:7070" || rows[0]["current"] != false {
		t.Fatalf("ls --format json: %v", rows)
	}
	if res := runKiln(ctx, nil, "context", "ls", "-q"); res.stdout != "default\ndev\nprod\n" {
		t.Fatalf("ls -q: %s", res)
	}
	res = runKiln(ctx, nil, "context", "show")
	if res.code != 0 || !strings.Contains(res.stdout, "prod") || !strings.Contains(res.stdout, "http://kiln.example:7070") || !strings.Contains(res.stdout, tokFile) || strings.Contains(res.stdout, "secret") {
		t.Fatalf("show:\n%s", res)
	}
	if res := runKiln(ctx, nil, "context", "show", "-q"); res.stdout != "prod\n" {
		t.Fatalf("show -q: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "show", "--format", "{{.address}}"); res.stdout != "http://kiln.example:7070\n" {
		t.Fatalf("show --format: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "rm", "nope"); res.code != 1 || !strings.Contains(res.stderr, "the contexts are") {
		t.Fatalf("rm nope: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "rm", "default"); res.code != 1 {
		t.Fatalf("rm default: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "use", "default"); res.code != 0 {
		t.Fatalf("use default: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "rm", "dev", "prod"); res.code != 0 || res.stdout != "dev\nprod\n" {
		t.Fatalf("rm dev prod: %s", res)
	}
	if res := runKiln(ctx, nil, "context", "ls", "-q"); res.stdout != "default\n" {
		t.Fatalf("ls -q after rm: %s", res)
	}
	// No temporary files are left next to the config.
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("config dir holds %v", entries)
	}
}

func mustGetwd(t *testing.T) string {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return wd
}

// A config file that cannot be used is reported with its path and what
// to do, but never stands in the way of --addr.
func TestClientConfigBadFile(t *testing.T) {
	path := isolate(t)
	s := imagesServer(t)
	os.MkdirAll(filepath.Dir(path), 0o700)
	for _, c := range []struct{ body, want string }{
		{"contexts: [\n", "is not valid"},
		{"contexts:\n  - name: a\n    adress: http://x\n", "field adress not found"},
		{"contexts:\n  - name: a\n", `context "a" has no address`},
		{"contexts:\n  - {name: a, address: http://x}\n  - {name: a, address: http://y}\n", "listed twice"},
		{"current_context: gone\ncontexts: []\n", `the current context is "gone" but there is no context "gone"`},
	} {
		os.WriteFile(path, []byte(c.body), 0o600)
		res := runKiln(context.Background(), nil, "images", "ls")
		if res.code != 2 || !strings.Contains(res.stderr, path) || !strings.Contains(res.stderr, c.want) {
			t.Errorf("%q: want exit 2, the path and %q:\n%s", c.body, c.want, res)
		}
		if res := s.kiln(context.Background(), "images", "ls", "-q"); res.code != 0 {
			t.Errorf("%q: --addr should not read the file:\n%s", c.body, res)
		}
	}
}

// save replaces the file atomically with mode 0600, whatever the old
// file's mode, and leaves no temporary file.
func TestClientConfigSave(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kiln", "config.yaml")
	cfg := &clientConfig{Contexts: []contextEntry{{Name: "b", Address: "http://b"}, {Name: "a", Address: "http://a", TokenFile: "/t", Progress: "plain"}}, CurrentContext: "a"}
	if err := cfg.save(path); err != nil {
		t.Fatal(err)
	}
	os.Chmod(path, 0o644)
	cfg.Contexts = cfg.Contexts[:1]
	if err := cfg.save(path); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	if st, _ := os.Stat(filepath.Dir(path)); st.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v, want 0700", st.Mode().Perm())
	}
	got, err := readConfig(path)
	if err != nil || got.CurrentContext != "a" || len(got.Contexts) != 1 || got.Contexts[0] != (contextEntry{Name: "a", Address: "http://a", TokenFile: "/t", Progress: "plain"}) {
		t.Fatalf("read back %+v, %v", got, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("dir holds %v", entries)
	}
	// A directory in the way of the rename fails cleanly, leaving no
	// temporary file.
	bad := filepath.Join(t.TempDir(), "config.yaml")
	os.MkdirAll(filepath.Join(bad, "x"), 0o700)
	if err := cfg.save(bad); err == nil {
		t.Fatal("save over a non-empty directory succeeded")
	}
	if entries, _ := os.ReadDir(filepath.Dir(bad)); len(entries) != 1 {
		t.Errorf("temporary file left: %v", entries)
	}
}

// XDG_CONFIG_HOME decides where the file is; else ~/.config.
func TestConfigPath(t *testing.T) {
	t.Setenv("XDG_CONFIG_HOME", "/xdg")
	if p, _ := configPath(); p != "/xdg/kiln/config.yaml" {
		t.Errorf("with XDG_CONFIG_HOME: %s", p)
	}
	t.Setenv("XDG_CONFIG_HOME", "")
	t.Setenv("HOME", "/home/u")
	if p, _ := configPath(); p != "/home/u/.config/kiln/config.yaml" {
		t.Errorf("without: %s", p)
	}
}

// complete runs `kiln __complete args...` with settings s and returns the
// candidates (the directive line dropped).
func complete(t *testing.T, s settings, args ...string) ([]string, result) {
	t.Helper()
	var out, errOut syncBuffer
	code := run(context.Background(), append([]string{"__complete"}, args...), strings.NewReader(""), &out, &errOut, s)
	res := result{code, out.String(), errOut.String()}
	lines := strings.Split(strings.TrimSpace(res.stdout), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[len(lines)-1], ":") {
		t.Fatalf("no directive line: %s", res)
	}
	return lines[:len(lines)-1], res
}

func TestCompletion(t *testing.T) {
	isolate(t)
	s := newFakeServer(t)
	b1, b2 := testBuild(api.BuildStatusRunning), finishedBuild(api.BuildStatusSucceeded, "")
	b1.Id, b2.Id, b2.Tags = "b0k3aa", "c7xy", nil
	var prefix string
	s.handle("GET /v1/builds", func(w http.ResponseWriter, r *http.Request) {
		prefix = r.URL.Query().Get("id_prefix")
		if r.URL.Query().Get("limit") != "50" {
			t.Errorf("limit = %q", r.URL.Query().Get("limit"))
		}
		writeJSON(w, http.StatusOK, api.BuildList{Builds: []api.Build{b1, b2}})
	})
	var includeBuilds string
	s.handle("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		includeBuilds = r.URL.Query().Get("include_builds")
		writeJSON(w, http.StatusOK, api.ImageList{Images: []api.Image{
			{Name: "team/app:1", Digest: "sha256:0123456789abcdef0123", Size: p(int64(2048))},
			{Name: "team/web:2", Digest: "sha256:fedcba9876543210fedc"},
		}})
	})
	flags := []string{"--addr", s.srv.URL, "--token", testToken}
	ts := testSettings
	ts.completionTimeout = 2 * time.Second

	for _, cmd := range [][]string{{"builds", "show"}, {"builds", "logs"}, {"builds", "cancel"}} {
		got, res := complete(t, ts, append(append(cmd, flags...), "")...)
		if len(got) != 2 || !strings.HasPrefix(got[0], "b0k3aa\trunning, 3m ago, app:1") || !strings.HasPrefix(got[1], "c7xy\tsucceeded") {
			t.Errorf("%v: %q\n%s", cmd, got, res)
		}
	}
	if got, res := complete(t, ts, append([]string{"builds", "show"}, append(flags, "b0")...)...); len(got) != 1 || prefix != "b0" {
		t.Errorf("prefix b0: %q (id_prefix %q)\n%s", got, prefix, res)
	}
	if got, _ := complete(t, ts, append([]string{"builds", "show"}, append(flags, "b0k3aa", "")...)...); len(got) != 0 {
		t.Errorf("second argument: %q", got)
	}
	for _, cmd := range [][]string{{"images", "rm"}, {"images", "tag"}, {"run"}} {
		got, res := complete(t, ts, append(append(cmd, flags...), "team/a")...)
		if len(got) != 1 || got[0] != "team/app:1\tsha256:0123456789ab, 2.0 KiB" || includeBuilds != "false" {
			t.Errorf("%v: %q (include_builds %q)\n%s", cmd, got, includeBuilds, res)
		}
	}
	complete(t, ts, append([]string{"images", "rm"}, append(flags, "builds/")...)...)
	if includeBuilds != "" {
		t.Errorf("builds/ should list the per-build names: include_builds=%q", includeBuilds)
	}
	if got, _ := complete(t, ts, append([]string{"images", "tag"}, append(flags, "team/app:1", "")...)...); len(got) != 0 {
		t.Errorf("tag's new name: %q", got)
	}

	// Context names, from the file.
	tok := writeToken(t, testToken)
	runKiln(context.Background(), nil, "context", "create", "prod", "--addr", s.srv.URL, "--token-file", tok)
	if got, _ := complete(t, ts, "context", "use", ""); len(got) != 2 || !strings.HasPrefix(got[0], "default\t") || got[1] != "prod\t"+s.srv.URL {
		t.Errorf("context use: %q", got)
	}
	if got, _ := complete(t, ts, "context", "rm", "p"); len(got) != 1 || !strings.HasPrefix(got[0], "prod\t") {
		t.Errorf("context rm: %q", got)
	}
	// Completion follows the context too.
	t.Setenv("KILN_CONTEXT", "prod")
	if got, res := complete(t, ts, "builds", "logs", ""); len(got) != 2 {
		t.Errorf("with the context: %q\n%s", got, res)
	}
}

// A completion that cannot get an answer completes nothing, quickly and
// without an error in its output.
func TestCompletionFailsQuietly(t *testing.T) {
	isolate(t)
	s := newFakeServer(t)
	release := make(chan struct{})
	defer close(release)
	s.handle("GET /v1/builds", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	ts := testSettings
	ts.completionTimeout = 200 * time.Millisecond
	start := time.Now()
	got, res := complete(t, ts, "builds", "show", "--addr", s.srv.URL, "--token", testToken, "")
	if took := time.Since(start); took > 1500*time.Millisecond {
		t.Errorf("completion took %s with a 200ms timeout", took)
	}
	if len(got) != 0 || res.code != 0 || strings.Contains(res.stdout, "kiln") {
		t.Errorf("a hanging server: %q\n%s", got, res)
	}
	for _, args := range [][]string{
		{"builds", "show", "--addr", "http://127.0.0.1:1", "--token", "x", ""}, // nothing listens
		{"images", "rm", "--addr", s.srv.URL, "--token", "wrong", ""},          // 401
		{"run", "--addr", "ftp://bad", ""},                                     // bad address
	} {
		got, res := complete(t, ts, args...)
		if len(got) != 0 || res.code != 0 || strings.Contains(res.stdout, "kiln") || strings.Contains(res.stdout, "error") {
			t.Errorf("%v: %q\n%s", args, got, res)
		}
	}
	// The default timeout is short.
	if defaultSettings.completionTimeout <= 0 || defaultSettings.completionTimeout > 3*time.Second {
		t.Errorf("default completion timeout %s", defaultSettings.completionTimeout)
	}
}
