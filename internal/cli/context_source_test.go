package cli

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func contextTar(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for name, body := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(body))
	}
	tw.Close()
	return b.Bytes()
}

func gzipped(b []byte) []byte {
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	zw.Write(b)
	zw.Close()
	return out.Bytes()
}

func TestBuildDockerfileOnStdinHasNoContext(t *testing.T) {
	s := succeededServer(t)
	res := runKiln(context.Background(), strings.NewReader("FROM scratch\nCOPY . /\n"), "build", "--progress", "plain", "--addr", s.srv.URL, "--token", testToken, "-")
	if res.code != 0 {
		t.Fatalf("kiln build -:\n%s", res)
	}
	up := s.upload(t, 0)
	if got := up.fields["dockerfile"]; !reflect.DeepEqual(got, []string{"FROM scratch\nCOPY . /\n"}) {
		t.Errorf("dockerfile field %q", got)
	}
	if _, ok := up.fields["dockerfile_path"]; ok {
		t.Errorf("dockerfile_path sent with a Dockerfile on stdin: %v", up.fields)
	}
	if up.order[len(up.order)-1] != "context" || len(up.files) != 0 {
		t.Errorf("want an empty context part last; parts %v, files %v", up.order, up.files)
	}
}

func TestBuildTarContexts(t *testing.T) {
	files := map[string]string{"Dockerfile": "FROM scratch\n", "sub/alt.Dockerfile": "FROM scratch\n", "a.txt": "a"}
	raw := contextTar(t, files)
	gz := gzipped(raw)
	file := filepath.Join(t.TempDir(), "ctx.tar.gz")
	if err := os.WriteFile(file, gz, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		stdin    []byte
		args     []string
		wantType string
		wantPath []string
	}{
		{"stdin tar", raw, []string{"-"}, "tar", nil},
		{"stdin tar.gz with -f", gz, []string{"-f", "sub/alt.Dockerfile", "-"}, "tar.gz", []string{"sub/alt.Dockerfile"}},
		{"file tar.gz", nil, []string{file}, "tar.gz", nil},
		{"file tar.gz with -f ./x", nil, []string{"-f", "./sub/alt.Dockerfile", file}, "tar.gz", []string{"sub/alt.Dockerfile"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := succeededServer(t)
			args := append([]string{"build", "--progress", "plain", "--addr", s.srv.URL, "--token", testToken}, c.args...)
			res := runKiln(context.Background(), bytes.NewReader(c.stdin), args...)
			if res.code != 0 {
				t.Fatalf("kiln %v:\n%s", c.args, res)
			}
			up := s.upload(t, 0)
			if up.contextType != c.wantType {
				t.Errorf("context sent as %q, want %q (as given)", up.contextType, c.wantType)
			}
			if len(up.files) != 3 || up.files["a.txt"] != "a" {
				t.Errorf("context entries %v", up.files)
			}
			if got := up.fields["dockerfile_path"]; !reflect.DeepEqual(got, c.wantPath) {
				t.Errorf("dockerfile_path %v, want %v", got, c.wantPath)
			}
			if _, ok := up.fields["dockerfile"]; ok {
				t.Errorf("an inline Dockerfile was sent: %v", up.fields)
			}
		})
	}
}

func TestBuildGitContextSendsURL(t *testing.T) {
	for _, c := range []struct {
		url   string
		stdin string
		args  []string
		want  map[string][]string
	}{
		{url: "https://example.com/org/repo.git#main:app", want: map[string][]string{"context_url": {"https://example.com/org/repo.git#main:app"}, "attach": {"true"}}},
		{url: "https://example.com/org/repo.git", args: []string{"--detach"}, want: map[string][]string{"context_url": {"https://example.com/org/repo.git"}}},
		{url: "git@github.com:org/repo.git", args: []string{"-f", "docker/Dockerfile"}, want: map[string][]string{
			"context_url": {"git@github.com:org/repo.git"}, "dockerfile_path": {"docker/Dockerfile"}, "attach": {"true"}}},
		{url: "https://example.com/r.git", stdin: "FROM scratch\n", args: []string{"-f", "-"}, want: map[string][]string{
			"context_url": {"https://example.com/r.git"}, "dockerfile": {"FROM scratch\n"}, "attach": {"true"}}},
	} {
		t.Run(c.url, func(t *testing.T) {
			s := succeededServer(t)
			args := append(append([]string{"build", "--progress", "plain", "--addr", s.srv.URL, "--token", testToken}, c.args...), c.url)
			res := runKiln(context.Background(), strings.NewReader(c.stdin), args...)
			if res.code != 0 {
				t.Fatalf("kiln build %s:\n%s", c.url, res)
			}
			up := s.upload(t, 0)
			if !reflect.DeepEqual(up.fields, c.want) {
				t.Errorf("fields %v, want %v", up.fields, c.want)
			}
			for _, p := range up.order {
				if p == "context" || p == "context_manifest" {
					t.Errorf("a git context sent a %s part: %v", p, up.order)
				}
			}
		})
	}
}

func TestBuildContextUsageErrors(t *testing.T) {
	s := succeededServer(t)
	notTar := filepath.Join(t.TempDir(), "notes.txt")
	os.WriteFile(notTar, []byte("hello\n"), 0o644)
	tarFile := filepath.Join(t.TempDir(), "ctx.tar")
	os.WriteFile(tarFile, contextTar(t, map[string]string{"Dockerfile": "FROM scratch\n"}), 0o644)
	for name, c := range map[string]struct {
		stdin string
		args  []string
		want  string
	}{
		"empty stdin":         {"", []string{"-"}, "standard input is empty"},
		"-f - with -":         {"FROM scratch\n", []string{"-f", "-", "-"}, "both read standard input"},
		"-f with stdin df":    {"FROM scratch\n", []string{"-f", "x", "-"}, "drop -f"},
		"file not a tar":      {"", []string{notTar}, "not a tar"},
		"-f outside the tar":  {"", []string{"-f", "../Dockerfile", tarFile}, "relative path"},
		"manifest with a tar": {"", []string{"--context-upload", "manifest", tarFile}, "not a directory"},
	} {
		t.Run(name, func(t *testing.T) {
			args := append([]string{"build", "--addr", s.srv.URL, "--token", testToken}, c.args...)
			res := runKiln(context.Background(), strings.NewReader(c.stdin), args...)
			if res.code != 2 || !strings.Contains(res.stderr, c.want) {
				t.Errorf("want exit 2 and %q:\n%s", c.want, res)
			}
		})
	}
	if reqs := s.seenRequests(); len(reqs) != 0 {
		t.Errorf("usage errors reached the server: %v", reqs)
	}
}

func TestContextKindAndArchiveDetection(t *testing.T) {
	for arg, want := range map[string]string{
		"-": contextStdin, ".": contextDir, "ctx.tar.gz": contextDir,
		"https://github.com/org/repo.git":        contextGit,
		"https://github.com/org/repo.git#v1:dir": contextGit,
		"git@github.com:org/repo.git":            contextGit,
		"ssh://git@host/org/repo.git":            contextGit,
		"git://host/repo":                        contextGit,
		"github.com/org/repo":                    contextGit,
		"https://example.com/ctx.tar.gz":         contextHTTP,
		"http://example.com/repo.git.tar#x":      contextHTTP,
	} {
		if got := contextKind(arg); got != want {
			t.Errorf("contextKind(%q) = %s, want %s", arg, got, want)
		}
	}
	raw := contextTar(t, map[string]string{"Dockerfile": "FROM scratch\n"})
	for name, c := range map[string]struct {
		head []byte
		want bool
	}{
		"tar": {raw, true}, "gzip": {gzipped(raw), true}, "zstd": {[]byte{0x28, 0xb5, 0x2f, 0xfd, 0}, true},
		"dockerfile":      {[]byte("FROM scratch\nRUN echo hi\n"), false},
		"long dockerfile": {[]byte("# syntax=docker/dockerfile:1\n" + strings.Repeat("RUN echo hi\n", 100)), false},
		"empty":           {nil, false},
	} {
		if got := isArchive(c.head[:min(len(c.head), archivePeek)]); got != c.want {
			t.Errorf("isArchive(%s) = %v", name, got)
		}
	}
}
