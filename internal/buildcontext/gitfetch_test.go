package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io/fs"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/testkit"
)

// gitFixture is a repository served over smart HTTP:
//
//	c0  Dockerfile, app/data.txt                      (main's first commit)
//	c1  the full layout below, tagged v1 (annotated)
//	c2  main's head: app/data.txt changed, app/new.txt added, README gone
//	c3  dev's head: dev.txt added
type gitFixture struct {
	root, repo, url string
	c0, c1, c2, c3  string
}

func newGitFixture(t *testing.T) *gitFixture {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	fx := &gitFixture{root: t.TempDir()}
	fx.repo = filepath.Join(fx.root, "r.git")
	testkit.Git(t, fx.root, "init", "-q", "-b", "main", fx.repo)
	write := func(name, body string, mode fs.FileMode) {
		p := filepath.Join(fx.repo, name)
		mustDo(t, os.MkdirAll(filepath.Dir(p), 0o755))
		mustDo(t, os.WriteFile(p, []byte(body), mode))
		mustDo(t, os.Chmod(p, mode))
	}
	commit := func(msg string) string {
		testkit.Git(t, fx.repo, "add", "-A")
		testkit.Git(t, fx.repo, "commit", "-qm", msg)
		return testkit.Git(t, fx.repo, "rev-parse", "HEAD")
	}
	write("Dockerfile", "FROM scratch\nCOPY . /\n", 0o644)
	write("app/data.txt", "v0\n", 0o644)
	fx.c0 = commit("c0")

	write("README", "read me\n", 0o644)
	write("app/data.txt", "v1\n", 0o644)
	write("app/run.sh", "#!/bin/sh\necho hi\n", 0o755)
	write("app/src/lib/deep.txt", "deep\n", 0o644)
	write("app/.dockerignore", "*.log\n", 0o644)
	write("app/debug.log", "noise\n", 0o644)
	mustDo(t, os.Symlink("data.txt", filepath.Join(fx.repo, "app/link")))
	mustDo(t, os.Symlink("app/src", filepath.Join(fx.repo, "srclink")))
	// Links that leave the context: BuildKit keeps them, so does FetchGit.
	mustDo(t, os.Symlink("../outside", filepath.Join(fx.repo, "up")))
	mustDo(t, os.Symlink("/etc/passwd", filepath.Join(fx.repo, "abs")))
	// A checkout applies eol conversion, and no export-* attribute.
	write(".gitattributes", "*.crlf text eol=crlf\nexported export-ignore\n*.id ident\n", 0o644)
	write("win.crlf", "one\ntwo\n", 0o644)
	write("exported", "still here\n", 0o644)
	write("x.id", "$Id$\n", 0o644)
	write(".dockerignore", "*.log\nREADME\n", 0o644)
	// A monorepo's shared ignore file: outside a "linked" context.
	write("linked/x.log", "log\n", 0o644)
	mustDo(t, os.Symlink("../.dockerignore", filepath.Join(fx.repo, "linked/.dockerignore")))
	fx.c1 = commit("c1")
	testkit.Git(t, fx.repo, "tag", "-a", "v1", "-m", "v1")

	write("app/data.txt", "v2\n", 0o644)
	write("app/new.txt", "new\n", 0o644)
	mustDo(t, os.Remove(filepath.Join(fx.repo, "README")))
	fx.c2 = commit("c2")

	testkit.Git(t, fx.repo, "checkout", "-qb", "dev")
	write("dev.txt", "dev\n", 0o644)
	fx.c3 = commit("c3")
	testkit.Git(t, fx.repo, "checkout", "-q", "main")

	fx.url = testkit.GitServer(t, fx.root)
	return fx
}

// checkoutTree is what `git checkout` of commit writes (the repository
// subdirectory sub of it), with the modes a umask of 022 gives, which is
// what BuildKit's git source presents.
func checkoutTree(t *testing.T, repo, commit, sub string) map[string]treeEntry {
	t.Helper()
	co := filepath.Join(t.TempDir(), "co")
	testkit.Git(t, filepath.Dir(co), "clone", "-q", "--no-checkout", repo, co)
	testkit.Git(t, co, "checkout", "-q", commit)
	tree := readTree(t, filepath.Join(co, sub))
	for p, e := range tree {
		switch {
		case p == ".git" || strings.HasPrefix(p, ".git/"):
			delete(tree, p)
			continue
		case e.Type == "dir":
			e.Mode = 0o755
		case e.Type == "file" && e.Mode&0o111 != 0:
			e.Mode = 0o755
		case e.Type == "file":
			e.Mode = 0o644
		}
		tree[p] = e
	}
	return tree
}

func fetchGit(t *testing.T, url string, lim Limits) (string, Info, error) {
	t.Helper()
	g, err := ParseGitContext(url)
	if err != nil {
		t.Fatal(err)
	}
	g, err = ResolveGit(context.Background(), g, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "ctx")
	info, err := FetchGit(context.Background(), g, dst, lim, GitFetchOptions{Timeout: 30 * time.Second})
	return dst, info, err
}

// checkFetched compares the fetched tree with want and checks what every
// fetched context must be: mtimes from content, directories 0755, no .git.
func checkFetched(t *testing.T, dst string, info Info, want map[string]treeEntry) {
	t.Helper()
	got := readTree(t, dst)
	if !equalTrees(got, want) {
		for _, p := range keys(want) {
			if got[p] != want[p] {
				t.Errorf("%s: got %+v, want %+v", p, got[p], want[p])
			}
		}
		for _, p := range keys(got) {
			if _, ok := want[p]; !ok {
				t.Errorf("%s: unexpected %+v", p, got[p])
			}
		}
	}
	for p, e := range got {
		if e.Type != "file" {
			continue
		}
		st, err := os.Stat(filepath.Join(dst, p))
		if err != nil {
			t.Fatal(err)
		}
		if want := ContentTime(sha256.Sum256([]byte(e.Content))); !st.ModTime().Equal(want) {
			t.Errorf("%s: mtime %s, want ContentTime %s", p, st.ModTime(), want)
		}
	}
	if info.Format != FormatGit || info.Entries != len(got) || info.Bytes <= 0 || info.UncompressedBytes <= 0 || !strings.HasPrefix(info.Hash, "sha256:") {
		t.Errorf("info = %+v (tree has %d entries)", info, len(got))
	}
}

func TestFetchGitRefs(t *testing.T) {
	fx := newGitFixture(t)
	for _, tc := range []struct{ ref, commit string }{
		{"", fx.c2},
		{"main", fx.c2},
		{"v1", fx.c1},
		{"dev", fx.c3},
		{fx.c0, fx.c0}, // an older commit, no branch's or tag's head
		{fx.c1, fx.c1},
	} {
		t.Run("ref="+tc.ref, func(t *testing.T) {
			dst, info, err := fetchGit(t, fx.url+"/r.git#"+tc.ref, Limits{})
			if err != nil {
				t.Fatalf("FetchGit: %v", err)
			}
			checkFetched(t, dst, info, checkoutTree(t, fx.repo, tc.commit, ""))
		})
	}
	// What the tree holds, spelled out once.
	dst, info, err := fetchGit(t, fx.url+"/r.git#v1", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	tree := readTree(t, dst)
	for p, want := range map[string]treeEntry{
		"app/run.sh": {Type: "file", Mode: 0o755, Content: "#!/bin/sh\necho hi\n"},
		"app/link":   {Type: "symlink", Link: "data.txt"},
		"up":         {Type: "symlink", Link: "../outside"},
		"abs":        {Type: "symlink", Link: "/etc/passwd"},
		"win.crlf":   {Type: "file", Mode: 0o644, Content: "one\r\ntwo\r\n"},
		"exported":   {Type: "file", Mode: 0o644, Content: "still here\n"},
		"app/src":    {Type: "dir", Mode: 0o755},
	} {
		if tree[p] != want {
			t.Errorf("%s = %+v, want %+v", p, tree[p], want)
		}
	}
	if !strings.HasPrefix(tree["x.id"].Content, "$Id: ") {
		t.Errorf("ident was not expanded: %q", tree["x.id"].Content)
	}
	if info.IgnoreFile != ".dockerignore" || strings.Join(info.Excludes, ",") != "*.log,README" {
		t.Errorf("ignore file %q, excludes %q", info.IgnoreFile, info.Excludes)
	}
	st, err := os.Stat(filepath.Join(dst, "app"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strconv.FormatInt(st.ModTime().Unix(), 10), testkit.Git(t, fx.repo, "log", "-1", "--format=%ct", fx.c1); got != want {
		t.Errorf("directory mtime %s, want the commit time %s", got, want)
	}
}

// tarOf archives a directory the way kiln build would send it.
func tarOf(t *testing.T, dir string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mustDo(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		link := ""
		if fi.Mode()&fs.ModeSymlink != 0 {
			link, _ = os.Readlink(p)
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		hdr.Name = filepath.ToSlash(rel)
		mustDo(t, tw.WriteHeader(hdr))
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			_, err = tw.Write(b)
			return err
		}
		return nil
	}))
	mustDo(t, tw.Close())
	return buf.Bytes()
}

func TestFetchGitSubdir(t *testing.T) {
	fx := newGitFixture(t)
	for _, sub := range []string{"app", "app/src", "app/src/lib"} {
		dst, info, err := fetchGit(t, fx.url+"/r.git#v1:"+sub, Limits{})
		if err != nil {
			t.Fatalf("%s: %v", sub, err)
		}
		want := checkoutTree(t, fx.repo, fx.c1, sub)
		checkFetched(t, dst, info, want)
		// The same tree uploaded hashes the same.
		_, received := mustReceive(t, tarOf(t, dst))
		if received.Hash != info.Hash || strings.Join(received.Excludes, ",") != strings.Join(info.Excludes, ",") {
			t.Errorf("%s: fetched hash %s (excludes %q), received %s (excludes %q)", sub, info.Hash, info.Excludes, received.Hash, received.Excludes)
		}
		// Dockerfile-specific ignore files work on a fetched context too.
		if _, err := info.ForDockerfile("Dockerfile"); err != nil {
			t.Errorf("ForDockerfile: %v", err)
		}
	}
	// An ignore file linked from outside the context is none, as for
	// BuildKit (an upload could not even hold the link).
	dst, linked, err := fetchGit(t, fx.url+"/r.git#v1:linked", Limits{})
	if err != nil || linked.IgnoreFile != "" || linked.Excludes != nil {
		t.Errorf("linked: %v, ignore file %q, excludes %q", err, linked.IgnoreFile, linked.Excludes)
	} else {
		checkFetched(t, dst, linked, checkoutTree(t, fx.repo, fx.c1, "linked"))
	}
	_, app, _ := fetchGit(t, fx.url+"/r.git#v1:app", Limits{})
	if strings.Join(app.Excludes, ",") != "*.log" {
		t.Errorf("app's excludes = %q", app.Excludes)
	}
	// The ignored file changes nothing; the others do.
	_, app2, _ := fetchGit(t, fx.url+"/r.git#main:app", Limits{})
	if app.Hash == app2.Hash {
		t.Errorf("v1:app and main:app hash alike")
	}

	for sub, frag := range map[string][]string{
		"nope":         {`"nope" does not exist`, fx.c1},
		"app/nope/x":   {`"app/nope" does not exist`},
		"Dockerfile":   {`"Dockerfile" is a file`},
		"srclink":      {`"srclink" is a symlink`},
		"srclink/lib":  {`"srclink" is a symlink`},
		"app/data.txt": {`"app/data.txt" is a file`},
	} {
		dst, _, err := fetchGit(t, fx.url+"/r.git#v1:"+sub, Limits{})
		wantError(t, err, dst, errdefs.ErrInvalid, frag...)
	}
}

// gitServer serves root like testkit.GitServer, and can refuse protocol
// v2 (so upload-pack speaks v0, which serves no unadvertised commit) and
// counts the ref advertisements it serves.
type gitServer struct {
	v0       bool
	throttle bool // slow responses down to about 1.6 MB/s
	mu       sync.Mutex
	ads      int
	h        http.Handler
}

func newGitServer(t *testing.T, root string, v0 bool) (*gitServer, string) {
	gitPath, err := exec.LookPath("git")
	if err != nil {
		t.Skip("git is not installed")
	}
	s := &gitServer{v0: v0, h: &cgi.Handler{Path: gitPath, Args: []string{"http-backend"},
		Env: []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1"}}}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv.URL
}

func (s *gitServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.v0 {
		r.Header.Del("Git-Protocol")
	}
	if strings.HasSuffix(r.URL.Path, "/info/refs") {
		s.mu.Lock()
		s.ads++
		s.mu.Unlock()
	}
	if s.throttle {
		w = slowWriter{w}
	}
	s.h.ServeHTTP(w, r)
}

type slowWriter struct{ http.ResponseWriter }

func (w slowWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), 32<<10)]
		m, err := w.ResponseWriter.Write(chunk)
		n += m
		if err != nil {
			return n, err
		}
		if f, ok := w.ResponseWriter.(http.Flusher); ok {
			f.Flush()
		}
		p = p[len(chunk):]
		time.Sleep(20 * time.Millisecond)
	}
	return n, nil
}

func (s *gitServer) advertisements() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.ads
	s.ads = 0
	return n
}

func TestFetchGitOlderCommit(t *testing.T) {
	fx := newGitFixture(t)
	for _, v0 := range []bool{false, true} {
		srv, url := newGitServer(t, fx.root, v0)
		for _, c := range []string{fx.c0, fx.c2} {
			g := GitContext{Remote: url + "/r.git", Ref: c, Commit: c, SubDir: "app"}
			dst := filepath.Join(t.TempDir(), "ctx")
			srv.advertisements()
			info, err := FetchGit(context.Background(), g, dst, Limits{}, GitFetchOptions{Timeout: 30 * time.Second})
			if err != nil {
				t.Fatalf("v0=%v commit %s: %v", v0, c, err)
			}
			checkFetched(t, dst, info, checkoutTree(t, fx.repo, c, "app"))
			// v2 serves any commit by id; v0 only advertised ones (c2 is
			// main's head), so c0 takes the full fetch: a second round.
			want := 1
			if v0 && c == fx.c0 {
				want = 2
			}
			if got := srv.advertisements(); got != want {
				t.Errorf("v0=%v commit %s: %d ref advertisements, want %d", v0, c[:8], got, want)
			}
		}
	}
}

func TestFetchGitSubmodules(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	root := t.TempDir()
	repo := func(name string, files map[string]string, links map[string]string, gitmodules string) string {
		dir := filepath.Join(root, name)
		if _, err := os.Stat(dir); err != nil {
			testkit.Git(t, root, "init", "-q", "-b", "main", dir)
		}
		for p, body := range files {
			mustDo(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, p)), 0o755))
			mustDo(t, os.WriteFile(filepath.Join(dir, p), []byte(body), 0o644))
		}
		if gitmodules != "" {
			mustDo(t, os.WriteFile(filepath.Join(dir, ".gitmodules"), []byte(gitmodules), 0o644))
		}
		testkit.Git(t, dir, "add", "-A")
		for p, c := range links {
			testkit.Git(t, dir, "update-index", "--add", "--cacheinfo", "160000,"+c+","+p)
		}
		testkit.Git(t, dir, "commit", "-qm", "x")
		return testkit.Git(t, dir, "rev-parse", "HEAD")
	}
	deep := repo("deep.git", map[string]string{"deep.txt": "deep\n"}, nil, "")
	subOld := repo("sub.git", map[string]string{"inner/s.txt": "old\n"}, map[string]string{"nested": deep},
		"[submodule \"nested\"]\n\tpath = nested\n\turl = ../deep.git\n")
	repo("sub.git", map[string]string{"inner/s.txt": "new\n"}, nil, "") // sub's head moves on
	top := repo("top.git", map[string]string{"Dockerfile": "FROM scratch\n", "mods/keep.txt": "k\n"},
		map[string]string{"mods/sub": subOld, "mods/off": deep},
		"[submodule \"the-sub\"]\n\tpath = mods/sub\n\turl = ./../sub.git\n"+
			"[submodule \"off\"]\n\tpath = mods/off\n\turl = ../deep.git\n\tupdate = none\n")
	url := testkit.GitServer(t, root)

	fetch := func(sub string) (string, Info, error) {
		dst := filepath.Join(t.TempDir(), "ctx")
		info, err := FetchGit(context.Background(), GitContext{Remote: url + "/top.git", Commit: top, SubDir: sub}, dst, Limits{}, GitFetchOptions{Timeout: 30 * time.Second})
		return dst, info, err
	}
	dst, info, err := fetch("")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]treeEntry{
		".gitmodules":              {Type: "file", Mode: 0o644, Content: "[submodule \"the-sub\"]\n\tpath = mods/sub\n\turl = ./../sub.git\n[submodule \"off\"]\n\tpath = mods/off\n\turl = ../deep.git\n\tupdate = none\n"},
		"Dockerfile":               {Type: "file", Mode: 0o644, Content: "FROM scratch\n"},
		"mods":                     {Type: "dir", Mode: 0o755},
		"mods/keep.txt":            {Type: "file", Mode: 0o644, Content: "k\n"},
		"mods/off":                 {Type: "dir", Mode: 0o755}, // update = none: left empty
		"mods/sub":                 {Type: "dir", Mode: 0o755},
		"mods/sub/.gitmodules":     {Type: "file", Mode: 0o644, Content: "[submodule \"nested\"]\n\tpath = nested\n\turl = ../deep.git\n"},
		"mods/sub/inner":           {Type: "dir", Mode: 0o755},
		"mods/sub/inner/s.txt":     {Type: "file", Mode: 0o644, Content: "old\n"}, // the recorded commit, not sub's head
		"mods/sub/nested":          {Type: "dir", Mode: 0o755},
		"mods/sub/nested/deep.txt": {Type: "file", Mode: 0o644, Content: "deep\n"},
	}
	checkFetched(t, dst, info, want)

	// On a v0 server the submodule's commit, no longer its head, comes
	// with a full fetch into the shallow repository.
	v0srv, v0url := newGitServer(t, root, true)
	dst = filepath.Join(t.TempDir(), "ctx")
	v0srv.advertisements()
	info, err = FetchGit(context.Background(), GitContext{Remote: v0url + "/top.git", Commit: top}, dst, Limits{}, GitFetchOptions{})
	if err != nil {
		t.Fatalf("v0: %v", err)
	}
	checkFetched(t, dst, info, want)
	if n := v0srv.advertisements(); n != 4 { // top, sub by id, sub in full, deep
		t.Errorf("v0: %d ref advertisements, want 4", n)
	}

	// A context directory inside a submodule.
	dst, info, err = fetch("mods/sub/nested")
	if err != nil {
		t.Fatal(err)
	}
	checkFetched(t, dst, info, map[string]treeEntry{"deep.txt": {Type: "file", Mode: 0o644, Content: "deep\n"}})
	dst, info, err = fetch("mods/sub")
	if err != nil {
		t.Fatal(err)
	}
	if got := readTree(t, dst); got["inner/s.txt"].Content != "old\n" || got["nested/deep.txt"].Content != "deep\n" {
		t.Errorf("mods/sub: %v", keys(got))
	}
	dst, _, err = fetch("mods/sub/nope")
	wantError(t, err, dst, errdefs.ErrInvalid, `"mods/sub/nope" does not exist`)
	dst, _, err = fetch("mods/off")
	wantError(t, err, dst, errdefs.ErrInvalid, "update = none")

	// The caller's policy sees every remote, submodules' included.
	var asked []string
	allow := func(remote string) error {
		asked = append(asked, strings.TrimPrefix(remote, url))
		if strings.HasSuffix(remote, "/deep.git") {
			return errors.New("only top and sub are allowed")
		}
		return nil
	}
	dst = filepath.Join(t.TempDir(), "ctx")
	_, err = FetchGit(context.Background(), GitContext{Remote: url + "/top.git", Commit: top}, dst, Limits{}, GitFetchOptions{AllowRemote: allow})
	wantError(t, err, dst, errdefs.ErrInvalid, `submodule "mods/sub/nested" at `+url+`/deep.git is not allowed: only top and sub are allowed`)
	if strings.Join(asked, " ") != "/top.git /sub.git /deep.git" {
		t.Errorf("AllowRemote was asked about %q", asked)
	}

	// A gitlink .gitmodules does not name.
	bad := repo("bad.git", map[string]string{"f": "f\n"}, map[string]string{"lost": deep}, "")
	dst = filepath.Join(t.TempDir(), "ctx")
	_, err = FetchGit(context.Background(), GitContext{Remote: url + "/bad.git", Commit: bad}, dst, Limits{}, GitFetchOptions{Timeout: 30 * time.Second})
	wantError(t, err, dst, errdefs.ErrInvalid, `submodule at "lost" with no URL`)
	// A submodule kiln must not fetch.
	local := repo("local.git", map[string]string{"f": "f\n"}, map[string]string{"l": deep},
		"[submodule \"l\"]\n\tpath = l\n\turl = file:///etc\n")
	dst = filepath.Join(t.TempDir(), "ctx")
	_, err = FetchGit(context.Background(), GitContext{Remote: url + "/local.git", Commit: local}, dst, Limits{}, GitFetchOptions{Timeout: 30 * time.Second})
	wantError(t, err, dst, errdefs.ErrInvalid, `submodule "l" has the URL "file:///etc"`)
}

func TestResolveSubmoduleURL(t *testing.T) {
	for _, tc := range []struct{ remote, url, want string }{
		{"https://h/org/repo.git", "../sub.git", "https://h/org/sub.git"},
		{"https://h/org/repo.git/", "../sub.git", "https://h/org/sub.git"},
		{"https://h/org/repo.git", "./sub", "https://h/org/repo.git/sub"},
		{"https://h/org/repo.git", "../../other/x.git", "https://h/other/x.git"},
		{"git@h:org/repo.git", "../sub.git", "git@h:org/sub.git"},
		{"git@h:repo.git", "../sub.git", "git@h:sub.git"},
		{"https://h/org/repo.git", "https://elsewhere/x.git", "https://elsewhere/x.git"},
	} {
		if got, err := resolveSubmoduleURL(tc.remote, tc.url); err != nil || got != tc.want {
			t.Errorf("resolveSubmoduleURL(%q, %q) = %q, %v; want %q", tc.remote, tc.url, got, err, tc.want)
		}
	}
}

func TestFetchGitLimits(t *testing.T) {
	fx := newGitFixture(t)
	dst, info, err := fetchGit(t, fx.url+"/r.git#v1:app", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	_ = dst
	// Exactly at the limits passes.
	exact := Limits{MaxBytes: info.Bytes, MaxUncompressedBytes: info.UncompressedBytes, MaxEntries: info.Entries}
	if _, _, err := fetchGit(t, fx.url+"/r.git#v1:app", exact); err != nil {
		t.Errorf("at the limits: %v", err)
	}
	for name, tc := range map[string]struct {
		lim  Limits
		frag string
	}{
		"entries":        {Limits{MaxEntries: info.Entries - 1}, "context.max_entries"},
		"uncompressed":   {Limits{MaxUncompressedBytes: info.UncompressedBytes - 1}, "context.max_uncompressed_bytes"},
		"download":       {Limits{MaxBytes: info.Bytes - 1}, "context.max_bytes"},
		"download, tiny": {Limits{MaxBytes: 1}, "context.max_bytes"},
	} {
		dst, _, err := fetchGit(t, fx.url+"/r.git#v1:app", tc.lim)
		if e := wantError(t, err, dst, errdefs.ErrTooLarge, tc.frag); e != nil && t.Failed() {
			t.Logf("%s: %s", name, e.Msg)
		}
	}
}

// A download over the limit is stopped while it runs, not after.
func TestFetchGitStopsLargeDownload(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	root := t.TempDir()
	repo := filepath.Join(root, "big.git")
	testkit.Git(t, root, "init", "-q", "-b", "main", repo)
	big := make([]byte, 4<<20)
	rand.Read(big) // incompressible
	mustDo(t, os.WriteFile(filepath.Join(repo, "big"), big, 0o644))
	testkit.Git(t, repo, "add", ".")
	testkit.Git(t, repo, "commit", "-qm", "big")
	commit := testkit.Git(t, repo, "rev-parse", "HEAD")
	srv, url := newGitServer(t, root, false)
	srv.throttle = true // about 1.6 MB/s: the whole pack takes 2.5 s

	dst := filepath.Join(t.TempDir(), "ctx")
	start := time.Now()
	_, err := FetchGit(context.Background(), GitContext{Remote: url + "/big.git", Commit: commit}, dst, Limits{MaxBytes: 256 << 10}, GitFetchOptions{})
	wantError(t, err, dst, errdefs.ErrTooLarge, "context.max_bytes", "256 KiB")
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("the download was stopped after %s", d)
	}
}

func TestFetchGitCancelAndTimeout(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	hang := httptest.NewServer(httpHang(block))
	defer hang.Close()
	g := GitContext{Remote: hang.URL + "/r.git", Commit: strings.Repeat("a", 40)}

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(300*time.Millisecond, cancel)
	dst := filepath.Join(t.TempDir(), "ctx")
	start := time.Now()
	_, err := FetchGit(ctx, g, dst, Limits{}, GitFetchOptions{Timeout: time.Minute})
	wantError(t, err, dst, errdefs.ErrCanceled, "canceled")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the cancel took %s", d)
	}

	dst = filepath.Join(t.TempDir(), "ctx")
	start = time.Now()
	_, err = FetchGit(context.Background(), g, dst, Limits{}, GitFetchOptions{Timeout: 300 * time.Millisecond})
	wantError(t, err, dst, errdefs.ErrUpstreamTimeout, "did not finish within 300ms")
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the timeout took %s", d)
	}

	done, cancel := context.WithCancel(context.Background())
	cancel()
	dst = filepath.Join(t.TempDir(), "ctx")
	_, err = FetchGit(done, g, dst, Limits{}, GitFetchOptions{Timeout: time.Minute})
	wantError(t, err, dst, errdefs.ErrCanceled)
}

func TestFetchGitErrors(t *testing.T) {
	fx := newGitFixture(t)
	ctx := context.Background()

	dst := filepath.Join(t.TempDir(), "ctx")
	_, err := FetchGit(ctx, GitContext{Remote: "http://127.0.0.1:1/r.git", Commit: fx.c0}, dst, Limits{}, GitFetchOptions{Timeout: 10 * time.Second})
	wantError(t, err, dst, errdefs.ErrUpstream, "fetching commit "+fx.c0, "127.0.0.1:1")
	if !errors.Is(err, ErrGitUnreachable) {
		t.Errorf("unreachable: %v does not wrap ErrGitUnreachable", err)
	}

	dst = filepath.Join(t.TempDir(), "ctx")
	missing := strings.Repeat("0123456789", 4)
	_, err = FetchGit(ctx, GitContext{Remote: fx.url + "/r.git", Commit: missing}, dst, Limits{}, GitFetchOptions{Timeout: 10 * time.Second})
	wantError(t, err, dst, errdefs.ErrUpstream, "commit "+missing+" is not on any branch or tag")

	dst = filepath.Join(t.TempDir(), "ctx")
	_, err = FetchGit(ctx, GitContext{Remote: fx.url + "/r.git", Ref: "main"}, dst, Limits{}, GitFetchOptions{Timeout: 10 * time.Second})
	wantError(t, err, dst, nil, "no pinned commit")

	// A target that is not empty is refused and left alone.
	dst = filepath.Join(t.TempDir(), "ctx")
	mustDo(t, os.MkdirAll(filepath.Join(dst, "keep"), 0o755))
	_, err = FetchGit(ctx, GitContext{Remote: fx.url + "/r.git", Commit: fx.c0}, dst, Limits{}, GitFetchOptions{Timeout: 10 * time.Second})
	var e *Error
	if !errors.As(err, &e) || e.Class != nil {
		t.Errorf("non-empty target: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dst, "keep")); err != nil {
		t.Errorf("the non-empty target was touched: %v", err)
	}

	// An empty target is fine.
	dst = filepath.Join(t.TempDir(), "ctx")
	mustDo(t, os.Mkdir(dst, 0o700))
	if _, err := FetchGit(ctx, GitContext{Remote: fx.url + "/r.git", Commit: fx.c0}, dst, Limits{}, GitFetchOptions{Timeout: 10 * time.Second}); err != nil {
		t.Errorf("empty target: %v", err)
	}
}

// The server's own git setup (user config, GIT_* variables) must not
// change what is fetched.
func TestFetchGitIgnoresUserConfig(t *testing.T) {
	fx := newGitFixture(t)
	home := t.TempDir()
	mustDo(t, os.WriteFile(filepath.Join(home, ".gitconfig"),
		[]byte("[url \"http://127.0.0.1:1/\"]\n\tinsteadOf = "+fx.url+"/\n[core]\n\tautocrlf = true\n"), 0o644))
	t.Setenv("HOME", home)
	t.Setenv("XDG_CONFIG_HOME", home)
	notDir := filepath.Join(home, ".gitconfig") // a file: git can make nothing under it
	t.Setenv("GIT_DIR", notDir)
	t.Setenv("GIT_OBJECT_DIRECTORY", notDir)
	t.Setenv("GIT_CONFIG_PARAMETERS", "'tar.umask'='0'")
	dst := filepath.Join(t.TempDir(), "ctx")
	info, err := FetchGit(context.Background(), GitContext{Remote: fx.url + "/r.git", Commit: fx.c1}, dst, Limits{}, GitFetchOptions{Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("HOME", t.TempDir())
	os.Unsetenv("GIT_DIR")
	os.Unsetenv("GIT_OBJECT_DIRECTORY")
	os.Unsetenv("GIT_CONFIG_PARAMETERS")
	checkFetched(t, dst, info, checkoutTree(t, fx.repo, fx.c1, ""))
}
