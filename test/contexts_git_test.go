package test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/kiln-build/kiln/api"
	"github.com/kiln-build/kiln/internal/testkit"
)

// buildMeta runs kiln build with a metadata file and returns the build.
func (s *server) buildMeta(token string, stdin io.Reader, args ...string) (api.Build, string) {
	s.t.Helper()
	meta := filepath.Join(s.t.TempDir(), "meta.json")
	args = append([]string{"build", "--progress", "plain", "--metadata-file", meta}, args...)
	_, stderr, code := s.kilnSplit(token, stdin, args...)
	if code != 0 {
		s.t.Fatalf("kiln %s: exit %d\n%s", strings.Join(args, " "), code, stderr)
	}
	raw, err := os.ReadFile(meta)
	if err != nil {
		s.t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		s.t.Fatalf("metadata file: %v\n%s", err, raw)
	}
	id, _ := m["kiln.build.id"].(string)
	if id == "" {
		s.t.Fatalf("metadata file has no kiln.build.id: %s", raw)
	}
	return s.get(token, id), stderr
}

func readOut(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("build output: %v", err)
	}
	return string(b)
}

func TestBuildContextStdinDockerfile(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")

	// docker build - < Dockerfile: the Dockerfile alone, an empty context.
	out := t.TempDir()
	df := fmt.Sprintf("FROM %s\nCOPY . /ctx/\nRUN echo from-stdin > /hello && ls -A /ctx | wc -l > /count\n", base)
	_, stderr, code := s.kilnSplit(tok, strings.NewReader(df), "build", "--progress", "plain", "-o", "type=local,dest="+out, "-")
	if code != 0 {
		t.Fatalf("kiln build - < Dockerfile: exit %d\n%s", code, stderr)
	}
	if got := strings.TrimSpace(readOut(t, filepath.Join(out, "hello"))); got != "from-stdin" {
		t.Errorf("/hello = %q, want from-stdin", got)
	}
	if got := strings.TrimSpace(readOut(t, filepath.Join(out, "count"))); got != "0" {
		t.Errorf("the context of kiln build - had %s entries, want none", got)
	}

	// Nothing on stdin, or -f with a Dockerfile on stdin: usage errors.
	if _, stderr, code := s.kilnSplit(tok, strings.NewReader(""), "build", "-"); code != 2 || !strings.Contains(stderr, "standard input is empty") {
		t.Errorf("kiln build - with empty stdin: exit %d, want 2 and a message\n%s", code, stderr)
	}
	if _, stderr, code := s.kilnSplit(tok, strings.NewReader(df), "build", "-f", "-", "-"); code != 2 || !strings.Contains(stderr, "both read standard input") {
		t.Errorf("kiln build -f - -: exit %d, want 2\n%s", code, stderr)
	}
}

func TestBuildContextTar(t *testing.T) {
	s := startServer(t)
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	files := map[string]string{
		"Dockerfile":            fmt.Sprintf("FROM %s\nCOPY . /ctx/\nRUN echo main > /which\n", base),
		"docker/alt.Dockerfile": fmt.Sprintf("FROM %s\nCOPY hello.txt /ctx/\nRUN echo alt > /which\n", base),
		"hello.txt":             "hello from the tar",
	}
	plain := tarOf(t, files, nil)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(plain)
	zw.Close()
	zs, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	zst := zs.EncodeAll(plain, nil)

	check := func(what, out, which string) {
		t.Helper()
		if got := strings.TrimSpace(readOut(t, filepath.Join(out, "which"))); got != which {
			t.Errorf("%s: built with the %s Dockerfile, want %s", what, got, which)
		}
		if got := readOut(t, filepath.Join(out, "ctx", "hello.txt")); got != "hello from the tar" {
			t.Errorf("%s: ctx/hello.txt = %q", what, got)
		}
	}
	// A tar on stdin, plain, gzip and zstd; -f names a Dockerfile in it.
	for _, c := range []struct {
		name string
		data []byte
	}{{"tar", plain}, {"tar.gz", gz.Bytes()}, {"tar.zst", zst}} {
		out := t.TempDir()
		if _, stderr, code := s.kilnSplit(tok, bytes.NewReader(c.data), "build", "--progress", "plain", "-o", "type=local,dest="+out, "-"); code != 0 {
			t.Fatalf("kiln build - < ctx.%s: exit %d\n%s", c.name, code, stderr)
		}
		check("stdin "+c.name, out, "main")
		out = t.TempDir()
		if _, stderr, code := s.kilnSplit(tok, bytes.NewReader(c.data), "build", "--progress", "plain", "-f", "docker/alt.Dockerfile", "-o", "type=local,dest="+out, "-"); code != 0 {
			t.Fatalf("kiln build -f docker/alt.Dockerfile - < ctx.%s: exit %d\n%s", c.name, code, stderr)
		}
		check("stdin "+c.name+" -f", out, "alt")
	}

	// A tar file as the context, and -f - with it.
	file := filepath.Join(t.TempDir(), "ctx.tar.gz")
	os.WriteFile(file, gz.Bytes(), 0o644)
	out := t.TempDir()
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "plain", "-o", "type=local,dest="+out, file); code != 0 {
		t.Fatalf("kiln build ctx.tar.gz: exit %d\n%s", code, stderr)
	}
	check("file", out, "main")
	out = t.TempDir()
	stdinDF := fmt.Sprintf("FROM %s\nCOPY hello.txt /ctx/\nRUN echo stdin > /which\n", base)
	if _, stderr, code := s.kilnSplit(tok, strings.NewReader(stdinDF), "build", "--progress", "plain", "-f", "-", "-o", "type=local,dest="+out, file); code != 0 {
		t.Fatalf("kiln build -f - ctx.tar.gz: exit %d\n%s", code, stderr)
	}
	check("file -f -", out, "stdin")

	// A file that is not a tar is refused before anything is sent.
	notTar := filepath.Join(t.TempDir(), "notes.txt")
	os.WriteFile(notTar, []byte("just text\n"), 0o644)
	if _, stderr, code := s.kilnSplit(tok, nil, "build", notTar); code != 2 || !strings.Contains(stderr, "not a tar") {
		t.Errorf("kiln build notes.txt: exit %d, want 2\n%s", code, stderr)
	}
	// An -f outside the tar is refused.
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "-f", "../Dockerfile", file); code != 2 {
		t.Errorf("kiln build -f ../Dockerfile ctx.tar.gz: exit %d, want 2\n%s", code, stderr)
	}
}

func TestBuildContextGit(t *testing.T) {
	root := t.TempDir()
	repo := filepath.Join(root, "app.git")
	testkit.Git(t, root, "init", "-q", "-b", "main", repo)
	testkit.WriteFiles(t, repo, map[string]string{
		"README":                    "not in the context",
		"svc/Dockerfile":            "FROM scratch\n",
		"svc/hello.txt":             "v1",
		"svc/docker/alt.Dockerfile": "FROM scratch\n",
	})
	testkit.Git(t, repo, "add", ".")
	testkit.Git(t, repo, "commit", "-q", "-m", "v1")
	testkit.Git(t, repo, "tag", "-a", "v1", "-m", "v1")
	c1 := testkit.Git(t, repo, "rev-parse", "HEAD")
	server := testkit.GitServer(t, root)
	url := server + "/app.git"

	// The git server is on loopback: the server fetches from there only
	// when the operator lists it.
	refused := startServer(t)
	rtok := refused.token("dev", "dev", "build:read", "build:write", "image:read")
	if _, stderr, code := refused.kilnSplit(rtok, nil, "build", url+"#main:svc"); code != 1 || !strings.Contains(stderr, "context.url_allowed") {
		t.Errorf("a git context on loopback with the default context.url_allowed: exit %d\n%s", code, stderr)
	}
	refused.stop()

	s := startServer(t, withArgs("--context-url-allowed", strings.TrimPrefix(server, "http://")))
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	testkit.WriteFiles(t, repo, map[string]string{
		"svc/Dockerfile":            fmt.Sprintf("FROM %s\nCOPY . /ctx/\nRUN echo git > /which\n", base),
		"svc/docker/alt.Dockerfile": fmt.Sprintf("FROM %s\nCOPY hello.txt /ctx/\nRUN echo alt > /which\n", base),
	})
	testkit.Git(t, repo, "commit", "-q", "-am", "v1 on this server's base")
	testkit.Git(t, repo, "tag", "-f", "-a", "v1", "-m", "v1")
	c1 = testkit.Git(t, repo, "rev-parse", "HEAD")

	// The subdirectory of the branch is the context; the CLI fetches
	// nothing, the server does.
	out := t.TempDir()
	first, stderr := s.buildMeta(tok, nil, "-o", "type=local,dest="+out, url+"#main:svc")
	if first.Status != api.BuildStatusSucceeded {
		t.Fatalf("git build: %s\n%s", first.Status, stderr)
	}
	// The server holds the commit's tree, so the repository's Dockerfile
	// is read and its bases pinned at submission: the build has an input
	// hash, and the same commit again is answered from it.
	if first.InputHash == nil {
		t.Error("a git build with the repository's Dockerfile has no input hash")
	} else if again, _ := s.buildMeta(tok, nil, url+"#v1:svc"); again.DedupOf == nil || *again.DedupOf != first.Id {
		t.Errorf("the same commit by its tag: dedup_of %v, want %s", again.DedupOf, first.Id)
	}
	if got := readOut(t, filepath.Join(out, "ctx", "hello.txt")); got != "v1" {
		t.Errorf("ctx/hello.txt = %q, want v1", got)
	}
	if _, err := os.Stat(filepath.Join(out, "ctx", "README")); err == nil {
		t.Errorf("a file outside the subdirectory reached the context")
	}
	if logs := s.logText(tok, first.Id); !strings.Contains(logs, c1) {
		t.Errorf("the build's log does not name the commit %s:\n%s", c1, logs)
	}

	// With the Dockerfile sent along, the build is pinned: the same commit
	// again dedups, by branch or by a tag of that commit.
	inline := fmt.Sprintf("FROM %s\nCOPY hello.txt /ctx/\nRUN echo pinned > /which\n", base)
	pinned, _ := s.buildMeta(tok, strings.NewReader(inline), "-f", "-", url+"#main:svc")
	if pinned.InputHash == nil {
		t.Fatalf("a git build with its Dockerfile sent has no input hash")
	}
	second, _ := s.buildMeta(tok, strings.NewReader(inline), "-f", "-", url+"#main:svc")
	if second.InputHash == nil || *second.InputHash != *pinned.InputHash || second.DedupOf == nil || *second.DedupOf != pinned.Id {
		t.Errorf("same ref again: input hash %v dedup_of %v, want %s from %s", second.InputHash, second.DedupOf, *pinned.InputHash, pinned.Id)
	}
	tagged, _ := s.buildMeta(tok, strings.NewReader(inline), "-f", "-", url+"#v1:svc")
	if tagged.DedupOf == nil || *tagged.DedupOf != pinned.Id {
		t.Errorf("the tag v1 (same commit): dedup_of %v, want %s", tagged.DedupOf, pinned.Id)
	}

	// -f names a Dockerfile inside the subdirectory.
	out = t.TempDir()
	if b, stderr := s.buildMeta(tok, nil, "-f", "docker/alt.Dockerfile", "-o", "type=local,dest="+out, url+"#main:svc"); b.DedupOf != nil {
		t.Errorf("-f alt.Dockerfile was answered by the build with the default Dockerfile\n%s", stderr)
	}
	if got := strings.TrimSpace(readOut(t, filepath.Join(out, "which"))); got != "alt" {
		t.Errorf("-f docker/alt.Dockerfile built %q", got)
	}

	// A new commit on main: a new input hash and the new files.
	testkit.WriteFiles(t, repo, map[string]string{"svc/hello.txt": "v2"})
	testkit.Git(t, repo, "commit", "-q", "-am", "v2")
	out = t.TempDir()
	s.buildMeta(tok, nil, "-o", "type=local,dest="+out, url+"#main:svc")
	if third, _ := s.buildMeta(tok, strings.NewReader(inline), "-f", "-", url+"#main:svc"); third.DedupOf != nil || third.InputHash == nil || *third.InputHash == *pinned.InputHash {
		t.Errorf("new commit: input hash %v dedup_of %v, want a new build", third.InputHash, third.DedupOf)
	}
	if got := readOut(t, filepath.Join(out, "ctx", "hello.txt")); got != "v2" {
		t.Errorf("after the new commit ctx/hello.txt = %q, want v2", got)
	}
	// The old commit by its id still builds what it held.
	c1 = testkit.Git(t, repo, "rev-parse", "v1")
	out = t.TempDir()
	if _, stderr := s.buildMeta(tok, nil, "-o", "type=local,dest="+out, url+"#"+c1+":svc"); readOut(t, filepath.Join(out, "ctx", "hello.txt")) != "v1" {
		t.Errorf("#%s:svc did not build v1\n%s", c1, stderr)
	}

	// A Dockerfile on stdin with a git context.
	out = t.TempDir()
	df := fmt.Sprintf("FROM %s\nCOPY hello.txt /ctx/\nRUN echo inline > /which\n", base)
	if b, stderr := s.buildMeta(tok, strings.NewReader(df), "-f", "-", "-o", "type=local,dest="+out, url+"#main:svc"); b.Status != api.BuildStatusSucceeded {
		t.Fatalf("-f - with a git context: %s\n%s", b.Status, stderr)
	}
	if got := strings.TrimSpace(readOut(t, filepath.Join(out, "which"))); got != "inline" {
		t.Errorf("-f - with a git context built %q", got)
	}

	// An unknown ref and an unreachable host are refused at submission.
	if _, stderr, code := s.kilnSplit(tok, nil, "build", url+"#no-such-branch"); code != 1 || !strings.Contains(stderr, "no branch or tag") {
		t.Errorf("unknown ref: exit %d\n%s", code, stderr)
	}
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "http://127.0.0.1:1/nothing.git"); code != 1 || !strings.Contains(stderr, "context_url") {
		t.Errorf("unreachable git host: exit %d\n%s", code, stderr)
	}
	// An isolated build cannot fetch a git context.
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--network", "isolated", url+"#main:svc"); code != 1 || !strings.Contains(stderr, "isolated") {
		t.Errorf("isolated git build: exit %d\n%s", code, stderr)
	}
}
