package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/patternmatcher/ignorefile"
	"github.com/tonistiigi/fsutil"
)

func writeFiles(t testing.TB, root string, files map[string]string) {
	t.Helper()
	for p, content := range files {
		full := filepath.Join(root, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func touchAll(t testing.TB, root string, when time.Time) {
	t.Helper()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink != 0 {
			return err
		}
		return os.Chtimes(p, when, when)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func packBytes(t testing.TB, dir string, opt PackOptions) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := Pack(context.Background(), dir, &buf, opt); err != nil {
		t.Fatalf("Pack: %v", err)
	}
	return buf.Bytes()
}

// tarHeaders lists the headers of a plain tar.
func tarHeaders(t testing.TB, data []byte) []*tar.Header {
	t.Helper()
	var out []*tar.Header
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, h)
	}
}

func tarNames(t testing.TB, data []byte) []string {
	var names []string
	for _, h := range tarHeaders(t, data) {
		names = append(names, strings.TrimSuffix(h.Name, "/"))
	}
	return names
}

// richTree builds a context that exercises everything Pack must carry.
func richTree(t testing.TB) string {
	t.Helper()
	src := t.TempDir()
	writeFiles(t, src, map[string]string{
		"Dockerfile":        "FROM scratch\nCOPY . /\n",
		"src/main.go":       "package main\n",
		"src/lib/util.go":   "package lib\n",
		"bin/tool":          "#!/bin/sh\n",
		"private/key":       "secret-ish",
		"locked/inside.txt": "in a read-only dir",
		strings.Repeat("long-directory-name/", 8) + strings.Repeat("long-file-name-", 10) + ".txt": "deep",
	})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Chmod(filepath.Join(src, "bin/tool"), 0o755))
	must(os.Chmod(filepath.Join(src, "private/key"), 0o600))
	must(os.Chmod(filepath.Join(src, "private"), 0o700))
	must(os.MkdirAll(filepath.Join(src, "empty/nested-empty"), 0o755))
	must(os.Symlink("src/main.go", filepath.Join(src, "main-link")))
	must(os.Symlink("../src", filepath.Join(src, "bin/src-link")))
	must(os.Symlink("does-not-exist", filepath.Join(src, "dangling")))
	must(os.Link(filepath.Join(src, "src/main.go"), filepath.Join(src, "src/main-hardlink.go")))
	must(os.Chmod(filepath.Join(src, "locked"), 0o555))
	return src
}

func TestPackReceiveRoundTrip(t *testing.T) {
	src := richTree(t)
	want := readTree(t, src)
	for _, c := range []Compression{Gzip, Zstd, Uncompressed} {
		var buf bytes.Buffer
		stats, err := Pack(context.Background(), src, &buf, PackOptions{Compression: c})
		if err != nil {
			t.Fatalf("Pack(%d): %v", c, err)
		}
		if stats.Written != int64(buf.Len()) {
			t.Errorf("Written = %d, but %d bytes were written", stats.Written, buf.Len())
		}
		dst, info := mustReceive(t, buf.Bytes())
		if got := readTree(t, dst); !equalTrees(got, want) {
			for _, k := range keys(want) {
				if got[k] != want[k] {
					t.Errorf("compression %d: %s = %+v, want %+v", c, k, got[k], want[k])
				}
			}
			for _, k := range keys(got) {
				if _, ok := want[k]; !ok {
					t.Errorf("compression %d: unexpected %s", c, k)
				}
			}
		}
		a, _ := os.Stat(filepath.Join(dst, "src/main.go"))
		b, _ := os.Stat(filepath.Join(dst, "src/main-hardlink.go"))
		if !os.SameFile(a, b) {
			t.Errorf("compression %d: hard link arrived as a copy", c)
		}
		if info.Entries != stats.Files {
			t.Errorf("compression %d: Receive saw %d entries, Pack wrote %d", c, info.Entries, stats.Files)
		}
	}
}

func TestPackArchiveShape(t *testing.T) {
	src := richTree(t)
	one := packBytes(t, src, PackOptions{Compression: Uncompressed})
	two := packBytes(t, src, PackOptions{Compression: Uncompressed})
	if !bytes.Equal(one, two) {
		t.Error("packing the same directory twice gave different archives")
	}
	seenDirs := map[string]bool{".": true}
	var links int
	for _, h := range tarHeaders(t, one) {
		name := strings.TrimSuffix(h.Name, "/")
		if strings.HasPrefix(h.Name, "/") || strings.HasPrefix(h.Name, "./") || strings.Contains(h.Name, "..") {
			t.Errorf("entry %q is not a plain relative path", h.Name)
		}
		if h.Uid != 0 || h.Gid != 0 || h.Uname != "" || h.Gname != "" {
			t.Errorf("entry %q carries owner %d:%d (%q:%q), want 0:0 and no names", h.Name, h.Uid, h.Gid, h.Uname, h.Gname)
		}
		if !seenDirs[filepath.Dir(name)] {
			t.Errorf("entry %q comes before its directory", h.Name)
		}
		if h.Typeflag == tar.TypeDir {
			if !strings.HasSuffix(h.Name, "/") {
				t.Errorf("directory %q has no trailing slash", h.Name)
			}
			seenDirs[name] = true
		}
		if h.Typeflag == tar.TypeLink {
			links++
			// Walk order is lexical, so main-hardlink.go is the first name.
			if h.Name != "src/main.go" || h.Linkname != "src/main-hardlink.go" {
				t.Errorf("hard link %q -> %q, want src/main.go -> src/main-hardlink.go", h.Name, h.Linkname)
			}
		}
	}
	if links != 1 {
		t.Errorf("archive has %d hard links, want 1", links)
	}
	names := tarNames(t, one)
	if !slices.Contains(names, "empty/nested-empty") {
		t.Errorf("empty directories missing: %v", names)
	}
}

// fullTree is the context used to compare .dockerignore handling with
// BuildKit's own walker.
var fullTree = map[string]string{
	"Dockerfile":                     "FROM scratch\n",
	"README.md":                      "readme",
	"app.log":                        "log",
	"build/out.bin":                  "bin",
	"build/keep.txt":                 "keep",
	"build/sub/x.tmp":                "tmp",
	"src/main.go":                    "main",
	"src/important.tmp":              "tmp",
	"src/lib/a.go":                   "a",
	"src/lib/b.tmp":                  "b",
	"src/lib/deep/c.log":             "c",
	"node_modules/pkg/index.js":      "js",
	"node_modules/pkg/important.tmp": "tmp",
	"docs/index.md":                  "md",
	"docs/api/ref.md":                "md",
	"docs/api/img.png":               "png",
	"tests/t1.go":                    "t",
	"abs/leading":                    "x",
	"dot":                            "x",
	"a/b/c":                          "x",
	"a/x/c":                          "x",
	"bee":                            "x",
}

func TestDockerignoreMatchesBuildKit(t *testing.T) {
	cases := []struct {
		name     string
		ignore   string
		keepBack []string // what Pack adds back: the Dockerfile and .dockerignore
	}{
		{"glob and exception", "*.log\nbuild\n!build/keep.txt\n", nil},
		{"double star with exception", "**/*.tmp\nnode_modules\n!**/important.tmp\n", nil},
		{"allow-list", "*\n!src\n!README.md\n", []string{"Dockerfile", ".dockerignore"}},
		{"double star in the middle", "docs/**\n!docs/**/*.md\n", nil},
		{"everything", "**\n", []string{"Dockerfile", ".dockerignore"}},
		{"leading slash, dot, brackets, single-level star", "/abs/leading\n./dot\na/*/c\n[b]ee\n", nil},
		{"trailing slash, ?, comments", "# comment\nsrc/*/\n?ests\n\n", nil},
		{"re-excluded after exception", "build\n!build\nbuild/sub\n", nil},
		{"excluded dir with an exception deep inside", "src\n!src/lib/deep/c.log\n", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := t.TempDir()
			writeFiles(t, src, fullTree)
			writeFiles(t, src, map[string]string{".dockerignore": tc.ignore})
			if err := os.MkdirAll(filepath.Join(src, "empty"), 0o755); err != nil {
				t.Fatal(err)
			}
			patterns, err := ignorefile.ReadAll(strings.NewReader(tc.ignore))
			if err != nil {
				t.Fatal(err)
			}

			// The server's view (hash) must equal BuildKit's walk with the
			// raw patterns.
			buildkit := fsutilWalk(t, src, patterns)
			everything := packBytes(t, withoutIgnore(t, src), PackOptions{Compression: Uncompressed})
			dst, _ := mustReceive(t, everything)
			ig, err := newIgnorer(patterns)
			if err != nil {
				t.Fatal(err)
			}
			server, err := survivors(nodesFromDisk(t, dst), ig)
			if err != nil {
				t.Fatal(err)
			}
			slices.Sort(server)
			if !slices.Equal(server, buildkit) {
				t.Errorf("hash covers\n  %v\nBuildKit sends\n  %v", server, buildkit)
			}

			// The client's view (Pack) must equal BuildKit's walk with the
			// Dockerfile and .dockerignore added back, as docker build does.
			clientPatterns := patterns
			for _, k := range tc.keepBack {
				clientPatterns = append(slices.Clone(clientPatterns), "!"+k)
			}
			wantClient := fsutilWalk(t, src, clientPatterns)
			client := tarNames(t, packBytes(t, src, PackOptions{Compression: Uncompressed}))
			slices.Sort(client)
			if !slices.Equal(client, wantClient) {
				t.Errorf("Pack sent\n  %v\nwant\n  %v", client, wantClient)
			}
		})
	}
}

// fsutilWalk is BuildKit's own context walker: the reference we must match.
func fsutilWalk(t testing.TB, dir string, excludes []string) []string {
	t.Helper()
	var out []string
	err := fsutil.Walk(context.Background(), dir, &fsutil.FilterOpt{ExcludePatterns: excludes}, func(p string, _ fs.FileInfo, err error) error {
		if err != nil {
			return err
		}
		out = append(out, filepath.ToSlash(p))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// withoutIgnore copies dir with an empty .dockerignore, so Pack sends every
// file and the test can apply the real patterns on the server side.
func withoutIgnore(t testing.TB, dir string) string {
	t.Helper()
	cp := t.TempDir()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		target := filepath.Join(cp, rel)
		switch {
		case rel == ".":
			return nil
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			return os.WriteFile(target, b, 0o644)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cp, ignoreFileName), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return cp
}

// nodesFromDisk rebuilds the node map Receive keeps, from an extracted tree.
func nodesFromDisk(t testing.TB, root string) map[string]*node {
	t.Helper()
	nodes := map[string]*node{".": {typ: typeDir}}
	for p, e := range readTree(t, root) {
		n := &node{}
		switch e.Type {
		case "dir":
			n.typ = typeDir
		case "symlink":
			n.typ = typeSymlink
		default:
			n.typ = typeFile
		}
		nodes[p] = n
	}
	return nodes
}

func TestPackKeepsDockerfileAndDockerignore(t *testing.T) {
	src := t.TempDir()
	writeFiles(t, src, map[string]string{
		".dockerignore":         "Dockerfile\n.dockerignore\ndocker\nsecret\n",
		"Dockerfile":            "FROM scratch\n",
		"docker/app.Dockerfile": "FROM scratch\n",
		"docker/other":          "not needed",
		"secret":                "s",
		"main.go":               "package main",
	})
	got := tarNames(t, packBytes(t, src, PackOptions{Compression: Uncompressed}))
	want := []string{".dockerignore", "Dockerfile", "main.go"}
	if !slices.Equal(got, want) {
		t.Errorf("default Dockerfile: sent %v, want %v", got, want)
	}
	got = tarNames(t, packBytes(t, src, PackOptions{Compression: Uncompressed, Dockerfile: filepath.Join(src, "docker/app.Dockerfile")}))
	want = []string{".dockerignore", "docker", "docker/app.Dockerfile", "main.go"}
	if !slices.Equal(got, want) {
		t.Errorf("docker/app.Dockerfile: sent %v, want %v", got, want)
	}
}

func TestPackSkipsSpecialFilesWithWarning(t *testing.T) {
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"a.txt": "a"})
	if err := syscall.Mkfifo(filepath.Join(src, "pipe"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(src, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var warnings []string
	var buf bytes.Buffer
	stats, err := Pack(context.Background(), src, &buf, PackOptions{
		Compression: Uncompressed,
		Warn:        func(msg string) { warnings = append(warnings, msg) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := tarNames(t, buf.Bytes()); !slices.Equal(got, []string{"a.txt"}) {
		t.Errorf("sent %v, want only a.txt", got)
	}
	if stats.Skipped != 2 || len(warnings) != 2 ||
		!strings.Contains(warnings[0], `"pipe"`) || !strings.Contains(warnings[0], "named pipe") ||
		!strings.Contains(warnings[1], `"sock"`) || !strings.Contains(warnings[1], "socket") {
		t.Errorf("skipped %d, warnings %q", stats.Skipped, warnings)
	}
	files, _, err := Scan(context.Background(), src, PackOptions{})
	if err != nil || files != 1 {
		t.Errorf("Scan = %d files, %v; want 1", files, err)
	}
}

func TestPackRefusesEscapingSymlinks(t *testing.T) {
	for _, target := range []string{"/etc/passwd", "../../outside"} {
		src := t.TempDir()
		writeFiles(t, src, map[string]string{"sub/a": "a"})
		if err := os.Symlink(target, filepath.Join(src, "sub/bad")); err != nil {
			t.Fatal(err)
		}
		_, err := Pack(context.Background(), src, io.Discard, PackOptions{})
		if err == nil || !strings.Contains(err.Error(), `"sub/bad"`) {
			t.Errorf("symlink to %s: err = %v, want one naming sub/bad", target, err)
		}
		// Ignoring it makes the context acceptable again.
		writeFiles(t, src, map[string]string{".dockerignore": "sub/bad\n"})
		if _, err := Pack(context.Background(), src, io.Discard, PackOptions{}); err != nil {
			t.Errorf("an ignored escaping symlink still failed Pack: %v", err)
		}
	}
}

func TestPackProgressAndScan(t *testing.T) {
	src := t.TempDir()
	files := map[string]string{}
	for i := range 300 {
		files[filepath.Join("many", strings.Repeat("x", i%7+1), string(rune('a'+i%26))+string(rune('a'+i/26)))] = strings.Repeat("y", i)
	}
	writeFiles(t, src, files)
	big := make([]byte, 16<<20)
	for i := range big {
		big[i] = byte(i * 7 % 251)
	}
	if err := os.WriteFile(filepath.Join(src, "big.bin"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	wantFiles, wantBytes, err := Scan(context.Background(), src, PackOptions{})
	if err != nil {
		t.Fatal(err)
	}

	type call struct {
		at    time.Time
		files int
		bytes int64
	}
	var calls []call
	// A slow upload link (~25 MB/s): the bar must move while one big file
	// is sent.
	slow := writerFunc(func(p []byte) (int, error) {
		time.Sleep(time.Duration(len(p)) * 40 * time.Nanosecond)
		return len(p), nil
	})
	stats, err := Pack(context.Background(), src, slow, PackOptions{
		Compression: Uncompressed,
		Progress:    func(f int, b int64) { calls = append(calls, call{time.Now(), f, b}) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if stats.Files != wantFiles || stats.Bytes != wantBytes {
		t.Errorf("Pack stats %d files / %d bytes, Scan said %d / %d", stats.Files, stats.Bytes, wantFiles, wantBytes)
	}
	if len(calls) == 0 {
		t.Fatal("Progress was never called")
	}
	last := calls[len(calls)-1]
	if last.files != wantFiles || last.bytes != wantBytes {
		t.Errorf("final progress %d / %d, want %d / %d", last.files, last.bytes, wantFiles, wantBytes)
	}
	for i := 1; i < len(calls)-1; i++ {
		if gap := calls[i].at.Sub(calls[i-1].at); gap < progressInterval-time.Millisecond {
			t.Errorf("progress calls %d and %d only %v apart", i-1, i, gap)
		}
		if calls[i].bytes < calls[i-1].bytes || calls[i].files < calls[i-1].files {
			t.Errorf("progress went backwards: %+v then %+v", calls[i-1], calls[i])
		}
	}
	var midFile int
	for _, c := range calls {
		if c.bytes > 0 && c.bytes < int64(len(big)) {
			midFile++
		}
	}
	if midFile < 3 {
		t.Errorf("only %d progress calls while big.bin was being sent; a progress bar would freeze", midFile)
	}
	t.Logf("%d progress calls for %d files / %d bytes", len(calls), wantFiles, wantBytes)
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

type cancelingWriter struct {
	cancel context.CancelFunc
	n      int
}

func (w *cancelingWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	if w.n > 64<<10 {
		w.cancel()
	}
	return len(p), nil
}

func TestPackCancel(t *testing.T) {
	src := t.TempDir()
	big := make([]byte, 32<<20)
	for i := range big {
		big[i] = byte(i * 13 % 251)
	}
	if err := os.WriteFile(filepath.Join(src, "big.bin"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := &cancelingWriter{cancel: cancel}
	_, err := Pack(ctx, src, w, PackOptions{Compression: Uncompressed})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if w.n > 8<<20 {
		t.Errorf("Pack wrote %d bytes after being canceled", w.n)
	}
}

const unreadableEnv = "KILN_TEST_UNREADABLE_CONTEXT"

// TestPackNamesUnreadableFile needs a file Pack cannot read. Root reads
// everything, so as root the test re-runs itself as nobody.
func TestPackNamesUnreadableFile(t *testing.T) {
	if dir := os.Getenv(unreadableEnv); dir != "" {
		_, err := Pack(context.Background(), dir, io.Discard, PackOptions{})
		if err == nil || !strings.Contains(err.Error(), `"secrets/locked.txt"`) || !errors.Is(err, fs.ErrPermission) {
			t.Fatalf("err = %v, want a permission error naming secrets/locked.txt", err)
		}
		return
	}
	base, err := os.MkdirTemp("", "kiln-unreadable-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	src := filepath.Join(base, "ctx")
	writeFiles(t, src, map[string]string{"ok.txt": "fine", "secrets/locked.txt": "no"})
	if err := os.Chmod(filepath.Join(src, "secrets/locked.txt"), 0); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 {
		t.Setenv(unreadableEnv, src)
		TestPackNamesUnreadableFile(t)
		return
	}
	// Copy the test binary where nobody can execute it.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(base, "test.bin")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{base, src, filepath.Join(src, "secrets")} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(bin, "-test.run=^TestPackNamesUnreadableFile$", "-test.v")
	cmd.Dir = base
	cmd.Env = append(os.Environ(), unreadableEnv+"="+src)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("as nobody: %v\n%s", err, out)
	}
}
