package test

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

// An http(s) URL as the context, as docker buildx takes it: a tarball is
// downloaded by the server (never by the CLI) and is the context; a URL
// of another file is the Dockerfile of an empty context; a named context
// from a URL works the same. Downloaded contexts are pinned by content,
// so the same tarball again is answered from the first build.
func TestURLContexts(t *testing.T) {
	var files map[string][]byte
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	}))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")

	// Loopback hosts are fetched only when listed.
	refused := startServer(t)
	rtok := refused.token("dev", "dev", "build:read", "build:write", "image:read")
	if _, stderr, code := refused.kilnSplit(rtok, nil, "build", srv.URL+"/ctx.tar.gz"); code != 1 || !strings.Contains(stderr, "context.url_allowed") || hits.Load() != 0 {
		t.Errorf("a loopback URL with the default context.url_allowed: exit %d, %d requests\n%s", code, hits.Load(), stderr)
	}
	refused.stop()

	s := startServer(t, withArgs("--context-url-allowed", host))
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(tarOf(t, map[string]string{
		"Dockerfile": fmt.Sprintf("FROM %s\nCOPY . /ctx/\n", base),
		"hello.txt":  "from a tarball URL",
	}, nil))
	zw.Close()
	files = map[string][]byte{
		"/ctx.tar.gz":      gz.Bytes(),
		"/Dockerfile":      []byte(fmt.Sprintf("FROM %s\nCOPY --from=notes notes.txt /notes.txt\nRUN echo dockerfile-url > /which\n", base)),
		"/notes/notes.txt": []byte("a named file"),
	}

	out := t.TempDir()
	first, stderr := s.buildMeta(tok, nil, "-o", "type=local,dest="+out, srv.URL+"/ctx.tar.gz")
	if got := readOut(t, filepath.Join(out, "ctx", "hello.txt")); got != "from a tarball URL" {
		t.Errorf("ctx/hello.txt = %q\n%s", got, stderr)
	}
	if again, _ := s.buildMeta(tok, nil, srv.URL+"/ctx.tar.gz"); again.DedupOf == nil || *again.DedupOf != first.Id {
		t.Errorf("the same tarball again: dedup_of %v, want %s", again.DedupOf, first.Id)
	}

	// A Dockerfile by URL, with a named context that is a file by URL.
	out = t.TempDir()
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "plain", "-o", "type=local,dest="+out,
		"--build-context", "notes="+srv.URL+"/notes/notes.txt", srv.URL+"/Dockerfile"); code != 0 {
		t.Fatalf("Dockerfile URL: exit %d\n%s", code, stderr)
	}
	if got := strings.TrimSpace(readOut(t, filepath.Join(out, "which"))); got != "dockerfile-url" {
		t.Errorf("the Dockerfile URL built %q", got)
	}
	if got := readOut(t, filepath.Join(out, "notes.txt")); got != "a named file" {
		t.Errorf("notes.txt from the URL named context = %q", got)
	}

	// A URL that is not there is refused at submission, saying so.
	if _, stderr, code := s.kilnSplit(tok, nil, "build", srv.URL+"/missing.tar.gz"); code != 1 || !strings.Contains(stderr, "404") {
		t.Errorf("missing URL: exit %d\n%s", code, stderr)
	}
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--network", "isolated", srv.URL+"/ctx.tar.gz"); code != 1 || !strings.Contains(stderr, "isolated") {
		t.Errorf("isolated build from a URL: exit %d\n%s", code, stderr)
	}
}
