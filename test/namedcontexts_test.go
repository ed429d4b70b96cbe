package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-build/kiln/internal/testkit"
)

// --build-context gives FROM and COPY --from names of their own: a
// directory sent with its own .dockerignore, an image in kiln's registry
// pinned to its digest (a later push to the tag does not change a
// deduplicated answer), a git repository; another tenant's image is not
// a source.
func TestNamedContexts(t *testing.T) {
	// A git repository to name, served on loopback, which the server
	// fetches from because it is listed.
	root := t.TempDir()
	repo := filepath.Join(root, "lib.git")
	testkit.Git(t, root, "init", "-q", "-b", "main", repo)
	testkit.WriteFiles(t, repo, map[string]string{"src/lib.txt": "from git"})
	testkit.Git(t, repo, "add", ".")
	testkit.Git(t, repo, "commit", "-q", "-m", "lib")
	gitServer := testkit.GitServer(t, root)

	s := startServer(t, withArgs("--context-url-allowed", strings.TrimPrefix(gitServer, "http://")))
	base := s.base()
	tok := s.token("dev", "dev", "build:read", "build:write", "image:read", "image:write")

	// An image in kiln's registry, made by a build.
	mk := func(marker string) {
		t.Helper()
		dir := testkit.ContextDir(t, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nRUN echo %s > /marker\n", base, marker)})
		if _, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "plain", "-t", "toolbox:1", dir); code != 0 {
			t.Fatalf("build toolbox:1: exit %d\n%s", code, stderr)
		}
	}
	mk("first")

	assets := testkit.ContextDir(t, map[string]string{
		"hello.txt":     "hello from a named context",
		"private.key":   "never sent",
		".dockerignore": "*.key\n",
	})
	dir := testkit.ContextDir(t, map[string]string{
		// FROM toolbox is replaced by the named context "toolbox".
		"Dockerfile": "FROM toolbox\nCOPY --from=assets / /assets/\n",
	})
	build := func(args ...string) (string, string) {
		t.Helper()
		out := t.TempDir()
		args = append([]string{"build", "--progress", "plain", "-o", "type=local,dest=" + out,
			"--build-context", "assets=" + assets,
			"--build-context", "toolbox=docker-image://" + s.addr + "/dev/toolbox:1"}, args...)
		_, stderr, code := s.kilnSplit(tok, nil, append(args, dir)...)
		if code != 0 {
			t.Fatalf("kiln %s: exit %d\n%s", strings.Join(args, " "), code, stderr)
		}
		return out, stderr
	}
	out, _ := build()
	if got := readOut(t, filepath.Join(out, "assets", "hello.txt")); got != "hello from a named context" {
		t.Errorf("assets/hello.txt = %q", got)
	}
	if _, err := os.Stat(filepath.Join(out, "assets", "private.key")); err == nil {
		t.Error("the named context's .dockerignore did not keep private.key out")
	}
	if got := strings.TrimSpace(readOut(t, filepath.Join(out, "marker"))); got != "first" {
		t.Errorf("FROM toolbox built on %q, want the named context's image (first)", got)
	}

	// Identical inputs: answered from the first build.
	if _, stderr := build(); !strings.Contains(stderr, "deduplicated") {
		t.Errorf("an identical build with pinned named contexts was not deduplicated:\n%s", stderr)
	}
	// The tag moves: the image named context pins the new digest.
	mk("second")
	out, stderr := build()
	if strings.Contains(stderr, "deduplicated") {
		t.Errorf("a build whose named context image changed was answered from the old one:\n%s", stderr)
	}
	if got := strings.TrimSpace(readOut(t, filepath.Join(out, "marker"))); got != "second" {
		t.Errorf("FROM toolbox after the tag moved built on %q, want second", got)
	}

	// A git repository as a named context, pinned to its commit.
	gitURL := gitServer + "/lib.git#main:src"
	gdir := testkit.ContextDir(t, map[string]string{"Dockerfile": fmt.Sprintf("FROM %s\nCOPY --from=lib lib.txt /lib.txt\n", base)})
	gout := t.TempDir()
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--progress", "plain", "-o", "type=local,dest="+gout, "--build-context", "lib="+gitURL, gdir); code != 0 {
		t.Fatalf("build with a git named context: exit %d\n%s", code, stderr)
	}
	if got := readOut(t, filepath.Join(gout, "lib.txt")); got != "from git" {
		t.Errorf("lib.txt from the git named context = %q", got)
	}

	// Another tenant's image is no source; a bad source says what works.
	other := s.token("eve", "eve", "build:read", "build:write", "image:read")
	if _, stderr, code := s.kilnSplit(other, nil, "build", "--build-context", "toolbox=docker-image://"+s.addr+"/dev/toolbox:1", dir); code != 1 || !strings.Contains(stderr, "toolbox") {
		t.Errorf("another tenant's image as a named context: exit %d\n%s", code, stderr)
	}
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--build-context", "x=oci-layout:///tmp/layout", dir); code != 1 || !strings.Contains(stderr, "docker-image://") {
		t.Errorf("oci-layout named context: exit %d\n%s", code, stderr)
	}
	if _, stderr, code := s.kilnSplit(tok, nil, "build", "--build-context", "x=/no/such/dir", dir); code != 2 || !strings.Contains(stderr, "not a directory") {
		t.Errorf("missing named context dir: exit %d\n%s", code, stderr)
	}
}
