package buildcontext

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/testkit"
)

func TestParseGitContext(t *testing.T) {
	for in, want := range map[string]GitContext{
		"https://example.com/org/repo.git":              {Remote: "https://example.com/org/repo.git"},
		"https://example.com/org/repo.git#main":         {Remote: "https://example.com/org/repo.git", Ref: "main"},
		"https://example.com/org/repo.git#v1.2:svc/api": {Remote: "https://example.com/org/repo.git", Ref: "v1.2", SubDir: "svc/api"},
		"https://example.com/org/repo.git#:svc/":        {Remote: "https://example.com/org/repo.git", SubDir: "svc"},
		"http://127.0.0.1:8080/repo.git#main:app":       {Remote: "http://127.0.0.1:8080/repo.git", Ref: "main", SubDir: "app"},
		"git@github.com:org/repo.git#dev":               {Remote: "git@github.com:org/repo.git", Ref: "dev"},
		"ssh://git@host.example/org/repo.git":           {Remote: "ssh://git@host.example/org/repo.git"},
		"github.com/org/repo":                           {Remote: "https://github.com/org/repo"},
	} {
		got, err := ParseGitContext(in)
		if err != nil || got != want {
			t.Errorf("ParseGitContext(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{
		"", "./repo", "/srv/repo.git", "file:///srv/repo.git", "https://example.com/not-git",
		"https://example.com/r.git#-upload-pack=x",
		"https://example.com/r.git?keep-git-dir=true", "https://example.com/r.git\n",
	} {
		if g, err := ParseGitContext(bad); err == nil {
			t.Errorf("ParseGitContext(%q) = %+v, want an error", bad, g)
		}
	}
}

func TestGitContextPinnedAndHash(t *testing.T) {
	c := strings.Repeat("a", 40)
	g := GitContext{Remote: "https://h/r.git", Ref: "main", SubDir: "app", Commit: c}
	if got := g.Pinned(); got != "https://h/r.git#"+c+":app" {
		t.Errorf("Pinned = %s", got)
	}
	g2 := g
	g2.Ref = "v1" // another name for the same commit: the same context
	if g.Hash() != g2.Hash() {
		t.Errorf("two refs of one commit hash differently")
	}
	g2.SubDir = "other"
	if g.Hash() == g2.Hash() {
		t.Errorf("two subdirectories hash alike")
	}
	if got := (GitContext{Remote: "https://h/r.git", Commit: c}).Pinned(); got != "https://h/r.git#"+c {
		t.Errorf("Pinned without subdir = %s", got)
	}
}

func TestPickRef(t *testing.T) {
	a, b, c := strings.Repeat("a", 40), strings.Repeat("b", 40), strings.Repeat("c", 40)
	out := []byte(a + "\tHEAD\n" + a + "\trefs/heads/main\n" + b + "\trefs/tags/v1\n" + c + "\trefs/tags/v1^{}\n")
	for ref, want := range map[string]string{"": a, "main": a, "refs/heads/main": a, "v1": c, "refs/tags/v1": c, "nope": ""} {
		if got := pickRef(out, ref); got != want {
			t.Errorf("pickRef(%q) = %q, want %q", ref, got, want)
		}
	}
}

func TestResolveGit(t *testing.T) {
	root := t.TempDir()
	repo := filepath.Join(root, "r.git")
	testkit.Git(t, root, "init", "-q", "-b", "main", repo)
	os.WriteFile(filepath.Join(repo, "f"), []byte("1"), 0o644)
	testkit.Git(t, repo, "add", ".")
	testkit.Git(t, repo, "commit", "-qm", "1")
	testkit.Git(t, repo, "tag", "-a", "v1", "-m", "v1")
	c1 := testkit.Git(t, repo, "rev-parse", "HEAD")
	testkit.Git(t, repo, "checkout", "-qb", "dev")
	os.WriteFile(filepath.Join(repo, "f"), []byte("2"), 0o644)
	testkit.Git(t, repo, "commit", "-qam", "2")
	c2 := testkit.Git(t, repo, "rev-parse", "HEAD")
	testkit.Git(t, repo, "checkout", "-q", "main")

	url := testkit.GitServer(t, root)
	ctx := context.Background()
	for ref, want := range map[string]string{"": c1, "main": c1, "v1": c1, "dev": c2, c2: c2} {
		g, err := ParseGitContext(url + "/r.git#" + ref + ":sub")
		if err != nil {
			t.Fatal(err)
		}
		g, err = ResolveGit(ctx, g, 10*time.Second)
		if err != nil || g.Commit != want {
			t.Errorf("ref %q: commit %q, %v; want %s", ref, g.Commit, err, want)
		}
	}
	g, _ := ParseGitContext(url + "/r.git#nope")
	if _, err := ResolveGit(ctx, g, 10*time.Second); !errors.Is(err, ErrGitUnreachable) || !strings.Contains(err.Error(), "no branch or tag") {
		t.Errorf("unknown ref: %v", err)
	}
	g, _ = ParseGitContext("http://127.0.0.1:1/r.git")
	if _, err := ResolveGit(ctx, g, 10*time.Second); !errors.Is(err, ErrGitUnreachable) {
		t.Errorf("unreachable: %v", err)
	}
	// A server that never answers: the timeout ends it.
	hang := httptest.NewServer(nil)
	hang.Config.Handler = nil
	block := make(chan struct{})
	defer close(block)
	hang.Config.Handler = httpHang(block)
	defer hang.Close()
	g, _ = ParseGitContext(hang.URL + "/r.git")
	start := time.Now()
	if _, err := ResolveGit(ctx, g, 500*time.Millisecond); !errors.Is(err, ErrGitUnreachable) || !strings.Contains(err.Error(), "did not answer") {
		t.Errorf("hanging server: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the timeout took %s", d)
	}
}

type httpHang chan struct{}

func (h httpHang) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	select {
	case <-h:
	case <-r.Context().Done():
	}
}
