package buildcontext

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// manifestOfTar converts an uncompressed Pack archive into the manifest
// entries that describe the same thing.
func manifestOfTar(t testing.TB, data []byte) []ManifestEntry {
	t.Helper()
	var out []ManifestEntry
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		e := ManifestEntry{Path: strings.TrimSuffix(h.Name, "/"), Mode: uint32(h.Mode)}
		switch h.Typeflag {
		case tar.TypeDir:
			e.Type = EntryDir
		case tar.TypeSymlink:
			e.Type, e.Target = EntrySymlink, h.Linkname
		case tar.TypeLink:
			e.Type, e.Target = EntryHardlink, h.Linkname
		case tar.TypeReg:
			body, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(body)
			e.Type, e.Size, e.Digest = EntryFile, int64(len(body)), "sha256:"+hex.EncodeToString(sum[:])
		default:
			t.Fatalf("unexpected tar entry type %c for %q", h.Typeflag, h.Name)
		}
		out = append(out, e)
	}
}

func buildManifest(t testing.TB, dir string, opt PackOptions, cache *HashCache) (Manifest, Sources, PackStats) {
	t.Helper()
	m, src, stats, err := BuildManifest(context.Background(), dir, opt, cache)
	if err != nil {
		t.Fatalf("BuildManifest: %v", err)
	}
	return m, src, stats
}

func TestManifestMatchesPack(t *testing.T) {
	trees := map[string]func(t *testing.T) (string, PackOptions){
		"rich tree: modes, symlinks, hard links, empty and read-only dirs": func(t *testing.T) (string, PackOptions) {
			src := richTree(t)
			if err := os.Chmod(filepath.Join(src, "bin"), 0o755|os.ModeSticky); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(filepath.Join(src, "bin/tool"), 0o755|os.ModeSetuid); err != nil {
				t.Fatal(err)
			}
			return src, PackOptions{}
		},
		"dockerignore with exceptions, excluded parents of kept files": func(t *testing.T) (string, PackOptions) {
			src := t.TempDir()
			writeFiles(t, src, fullTree)
			writeFiles(t, src, map[string]string{".dockerignore": "**/*.tmp\nnode_modules\n!**/important.tmp\nsrc\n!src/lib/deep/c.log\n"})
			return src, PackOptions{}
		},
		"allow-list keeps Dockerfile and .dockerignore": func(t *testing.T) (string, PackOptions) {
			src := t.TempDir()
			writeFiles(t, src, fullTree)
			writeFiles(t, src, map[string]string{".dockerignore": "*\n!src\n"})
			return src, PackOptions{}
		},
		"Dockerfile in a subdirectory with its own ignore file": func(t *testing.T) (string, PackOptions) {
			src := t.TempDir()
			writeFiles(t, src, map[string]string{
				"docker/app.Dockerfile":              "FROM scratch\n",
				"docker/app.Dockerfile.dockerignore": "*\n!main.go\n",
				".dockerignore":                      "main.go\n",
				"main.go":                            "package main\n",
				"other.go":                           "package other\n",
			})
			return src, PackOptions{Dockerfile: "docker/app.Dockerfile"}
		},
		"hard link group split by .dockerignore": func(t *testing.T) (string, PackOptions) {
			src := t.TempDir()
			writeFiles(t, src, map[string]string{"a/x": "shared", ".dockerignore": "a\n"})
			if err := os.Link(filepath.Join(src, "a/x"), filepath.Join(src, "b")); err != nil {
				t.Fatal(err)
			}
			if err := os.Link(filepath.Join(src, "a/x"), filepath.Join(src, "c")); err != nil {
				t.Fatal(err)
			}
			return src, PackOptions{}
		},
		"duplicate contents and empty files": func(t *testing.T) (string, PackOptions) {
			src := t.TempDir()
			writeFiles(t, src, map[string]string{"one": "same", "two": "same", "empty1": "", "d/empty2": ""})
			return src, PackOptions{}
		},
	}
	for name, mk := range trees {
		t.Run(name, func(t *testing.T) {
			src, opt := mk(t)
			opt.Compression = Uncompressed
			want := manifestOfTar(t, packBytes(t, src, opt))
			packStats, err := Pack(context.Background(), src, io.Discard, opt)
			if err != nil {
				t.Fatal(err)
			}

			m, sources, stats := buildManifest(t, src, opt, nil)
			if m.Version != ManifestVersion {
				t.Errorf("version %d, want %d", m.Version, ManifestVersion)
			}
			if !slices.Equal(m.Entries, want) {
				t.Errorf("manifest differs from Pack's archive:\n got  %+v\n want %+v", m.Entries, want)
			}
			if stats.Files != packStats.Files || stats.Bytes != packStats.Bytes || stats.Skipped != packStats.Skipped {
				t.Errorf("stats %+v, Pack's %+v", stats, packStats)
			}
			for _, e := range m.Entries {
				if e.Type != EntryFile {
					continue
				}
				s, ok := sources[e.Digest]
				if !ok {
					t.Errorf("no source for %s (%s)", e.Path, e.Digest)
					continue
				}
				data, err := os.ReadFile(s.Path)
				if err != nil {
					t.Fatal(err)
				}
				if sum := sha256.Sum256(data); "sha256:"+hex.EncodeToString(sum[:]) != e.Digest || s.Size != e.Size {
					t.Errorf("source %s of %s holds other content", s.Path, e.Path)
				}
			}
		})
	}
}

func TestManifestSkipsSpecialFilesAndRefusesEscapingSymlinks(t *testing.T) {
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
	m, _, stats := buildManifest(t, src, PackOptions{Warn: func(msg string) { warnings = append(warnings, msg) }}, nil)
	if len(m.Entries) != 1 || m.Entries[0].Path != "a.txt" || stats.Skipped != 2 || len(warnings) != 2 {
		t.Errorf("entries %+v, skipped %d, warnings %q; want only a.txt and two warnings", m.Entries, stats.Skipped, warnings)
	}

	if err := os.Symlink("../outside", filepath.Join(src, "bad")); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := BuildManifest(context.Background(), src, PackOptions{}, nil); err == nil || !strings.Contains(err.Error(), `"bad"`) {
		t.Errorf("escaping symlink: err = %v, want one naming bad", err)
	}
}

func TestManifestCancel(t *testing.T) {
	src := t.TempDir()
	for i := range 20 {
		writeFiles(t, src, map[string]string{filepath.Join("d", strings.Repeat("f", i+1)): strings.Repeat("x", 1<<20)})
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, _, err := BuildManifest(ctx, src, PackOptions{}, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
}

func TestManifestProgress(t *testing.T) {
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"a": "12345", "b/c": "678", "Dockerfile": "FROM scratch\n"})
	var lastFiles int
	var lastBytes int64
	calls := 0
	_, _, stats := buildManifest(t, src, PackOptions{Progress: func(f int, b int64) {
		calls++
		lastFiles, lastBytes = f, b
	}}, nil)
	if calls == 0 || lastFiles != stats.Files || lastBytes != stats.Bytes {
		t.Errorf("last progress %d files / %d bytes after %d calls; stats %+v", lastFiles, lastBytes, calls, stats)
	}
}

// withCacheHome points the hash cache at a fresh directory.
func withCacheHome(t *testing.T) string {
	t.Helper()
	home := t.TempDir()
	t.Setenv("XDG_CACHE_HOME", home)
	return home
}

// openCache opens dir's cache with a clock an hour ahead, so that files
// the test just wrote are old enough to be cached.
func openCache(t *testing.T, dir string) *HashCache {
	t.Helper()
	c, err := OpenHashCache(dir)
	if err != nil {
		t.Fatal(err)
	}
	c.now = func() time.Time { return time.Now().Add(time.Hour) }
	return c
}

func digestOf(m Manifest, path string) string {
	for _, e := range m.Entries {
		if e.Path == path {
			return e.Digest
		}
	}
	return ""
}

var poison = digestString([32]byte{30: 0x0b, 31: 0xad})

// poisonCache replaces every cached digest by a wrong one: a manifest that
// shows it reused the entry instead of reading the file.
func poisonCache(c *HashCache) {
	for _, e := range c.entries {
		e.digest = [32]byte{30: 0x0b, 31: 0xad}
	}
}

func TestHashCacheReusesUnchangedFiles(t *testing.T) {
	withCacheHome(t)
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"Dockerfile": "FROM scratch\n", "a": "aaaa", "sub/b": "bbbb", "sub/c": "cccc", "d": "dddd"})

	c := openCache(t, src)
	first, _, _ := buildManifest(t, src, PackOptions{}, c)
	if c.Len() != 5 {
		t.Fatalf("cache holds %d entries after the first walk, want 5", c.Len())
	}
	if err := c.Save(); err != nil {
		t.Fatal(err)
	}

	// Through the file on disk: every digest comes from the cache.
	c = openCache(t, src)
	if len(c.entries) != 5 {
		t.Fatalf("reopened cache holds %d entries, want 5", len(c.entries))
	}
	poisonCache(c)
	m, _, _ := buildManifest(t, src, PackOptions{}, c)
	for _, e := range m.Entries {
		if e.Type == EntryFile && e.Digest != poison {
			t.Errorf("%s was hashed again although unchanged", e.Path)
		}
	}

	// Any change of the stat key means reading the file again.
	old := time.Now().Add(-time.Hour)
	mustDo(t, os.WriteFile(filepath.Join(src, "a"), []byte("AAAAA"), 0o644))        // size
	mustDo(t, os.Chtimes(filepath.Join(src, "sub/b"), old, old))                    // mtime (and ctime)
	mustDo(t, os.WriteFile(filepath.Join(src, "sub/c.new"), []byte("CCCC"), 0o644)) // inode:
	mustDo(t, os.Chtimes(filepath.Join(src, "sub/c.new"), statMtime(t, src, "sub/c"), statMtime(t, src, "sub/c")))
	mustDo(t, os.Rename(filepath.Join(src, "sub/c.new"), filepath.Join(src, "sub/c"))) // same size and mtime, new inode
	mustDo(t, os.Chmod(filepath.Join(src, "d"), 0o600))                                // ctime only
	c = openCache(t, src)
	poisonCache(c)
	m, _, _ = buildManifest(t, src, PackOptions{}, c)
	for path, want := range map[string]string{"a": "AAAAA", "sub/b": "bbbb", "sub/c": "CCCC", "d": "dddd"} {
		sum := sha256.Sum256([]byte(want))
		if got := digestOf(m, path); got != "sha256:"+hex.EncodeToString(sum[:]) {
			t.Errorf("%s: digest %s, want the hash of %q", path, got, want)
		}
	}
	if got := digestOf(m, "Dockerfile"); got != poison {
		t.Errorf("the unchanged Dockerfile was hashed again (digest %s)", got)
	}
	if digestOf(first, "sub/b") != digestOf(m, "sub/b") {
		t.Errorf("sub/b's digest changed with its mtime")
	}
}

func statMtime(t *testing.T, dir, rel string) time.Time {
	t.Helper()
	st, err := os.Stat(filepath.Join(dir, rel))
	if err != nil {
		t.Fatal(err)
	}
	return st.ModTime()
}

func mustDo(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestHashCacheDoesNotTrustRecentFiles(t *testing.T) {
	withCacheHome(t)
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"f": "version-1"})
	mtime := statMtime(t, src, "f")

	// The real clock: f was written just now, within the racy window.
	c, err := OpenHashCache(src)
	if err != nil {
		t.Fatal(err)
	}
	buildManifest(t, src, PackOptions{}, c)
	if c.Len() != 0 {
		t.Fatalf("a file written just before hashing was cached")
	}
	mustDo(t, c.Save())

	// Rewritten right after hashing, same size, same mtime: what a coarse
	// timestamp would hide.
	writeFiles(t, src, map[string]string{"f": "version-2"})
	mustDo(t, os.Chtimes(filepath.Join(src, "f"), mtime, mtime))
	c, err = OpenHashCache(src)
	if err != nil {
		t.Fatal(err)
	}
	m, _, _ := buildManifest(t, src, PackOptions{}, c)
	sum := sha256.Sum256([]byte("version-2"))
	if got := digestOf(m, "f"); got != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Errorf("digest %s, want the new content's", got)
	}

	// The rule itself: recent mtime or recent ctime both disqualify.
	start := time.Now()
	old, recent := start.Add(-time.Minute).UnixNano(), start.Add(-time.Second).UnixNano()
	for _, k := range []statKey{{mtime: recent, ctime: recent}, {mtime: old, ctime: recent}, {mtime: recent, ctime: old}} {
		c := NewMemoryHashCache()
		c.store("/x", k, [32]byte{1}, start)
		if c.Len() != 0 {
			t.Errorf("key %+v was cached within %v of the start", k, racyWindow)
		}
	}
	c = NewMemoryHashCache()
	c.store("/x", statKey{mtime: old, ctime: old}, [32]byte{1}, start)
	if c.Len() != 1 {
		t.Errorf("an old file was not cached")
	}
}

func TestHashCacheDropsEntriesNotSeen(t *testing.T) {
	withCacheHome(t)
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"keep": "k", "gone": "g", "ignored": "i"})
	c := openCache(t, src)
	buildManifest(t, src, PackOptions{}, c)
	mustDo(t, c.Save())

	mustDo(t, os.Remove(filepath.Join(src, "gone")))
	writeFiles(t, src, map[string]string{".dockerignore": "ignored\n"})
	c = openCache(t, src)
	buildManifest(t, src, PackOptions{}, c)
	mustDo(t, c.Save())

	c = openCache(t, src)
	var names []string
	for p := range c.entries {
		names = append(names, filepath.Base(p))
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{".dockerignore", "keep"}) {
		t.Errorf("cache holds %v, want only what the last walk saw", names)
	}
}

func TestHashCacheSurvivesCorruption(t *testing.T) {
	withCacheHome(t)
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"a": "a", "b": "b"})
	c := openCache(t, src)
	want, _, _ := buildManifest(t, src, PackOptions{}, c)
	mustDo(t, c.Save())
	data, err := os.ReadFile(c.path)
	if err != nil {
		t.Fatal(err)
	}

	flipped := bytes.Clone(data)
	flipped[len(flipped)/2] ^= 0xff
	for name, content := range map[string][]byte{
		"garbage":   []byte("not a cache at all"),
		"truncated": data[:len(data)-10],
		"bit flip":  flipped,
		"empty":     nil,
	} {
		t.Run(name, func(t *testing.T) {
			mustDo(t, os.WriteFile(c.path, content, 0o600))
			c2 := openCache(t, src)
			if len(c2.entries) != 0 {
				t.Fatalf("a corrupt cache loaded %d entries", len(c2.entries))
			}
			m, _, _ := buildManifest(t, src, PackOptions{}, c2)
			if !slices.Equal(m.Entries, want.Entries) {
				t.Errorf("manifest after corruption differs")
			}
			mustDo(t, c2.Save())
			if c3 := openCache(t, src); len(c3.entries) != 2 {
				t.Errorf("the rebuilt cache holds %d entries, want 2", len(c3.entries))
			}
		})
	}

	// A cache file of another directory (a name clash) is not used.
	other := t.TempDir()
	writeFiles(t, other, map[string]string{"a": "a"})
	oc := openCache(t, other)
	mustDo(t, os.WriteFile(oc.path, data, 0o600))
	if oc := openCache(t, other); len(oc.entries) != 0 {
		t.Errorf("the cache of %s was loaded for %s", src, other)
	}
}

func TestHashCacheConcurrentSaves(t *testing.T) {
	withCacheHome(t)
	src := t.TempDir()
	files := map[string]string{}
	for i := range 200 {
		files[filepath.Join("d", strings.Repeat("n", i%20+1)+string(rune('a'+i/20)))] = strings.Repeat("x", i)
	}
	writeFiles(t, src, files)
	done := make(chan error)
	for range 8 {
		go func() {
			for range 10 {
				c, err := OpenHashCache(src)
				if err != nil {
					done <- err
					return
				}
				c.now = func() time.Time { return time.Now().Add(time.Hour) }
				if _, _, _, err := BuildManifest(context.Background(), src, PackOptions{}, c); err != nil {
					done <- err
					return
				}
				c.dirty = true // write every time, to race the renames
				if err := c.Save(); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	for range 8 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if c := openCache(t, src); len(c.entries) != 200 {
		t.Errorf("after concurrent saves the cache holds %d entries, want 200", len(c.entries))
	}
	left, _ := filepath.Glob(filepath.Join(filepath.Dir(openCache(t, src).path), "*.tmp-*"))
	if len(left) != 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
}

func TestHashCacheLocation(t *testing.T) {
	home := withCacheHome(t)
	c, err := OpenHashCache(".")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(c.path) != filepath.Join(home, "kiln", "context-hashes") {
		t.Errorf("cache file %s, want it under $XDG_CACHE_HOME/kiln/context-hashes", c.path)
	}
	wd, _ := os.Getwd()
	if c2, _ := OpenHashCache(wd); c2.path != c.path {
		t.Errorf("relative and absolute names of one directory use different caches: %s, %s", c.path, c2.path)
	}
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", "/home/someone")
	if c, _ := OpenHashCache(wd); !strings.HasPrefix(c.path, "/home/someone/.cache/kiln/") {
		t.Errorf("without XDG_CACHE_HOME the cache is %s, want it under ~/.cache/kiln", c.path)
	}
}

func readBlobTar(t *testing.T, data []byte) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag != tar.TypeReg || strings.Contains(h.Name, "/") {
			t.Errorf("blob tar entry %q of type %c", h.Name, h.Typeflag)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = body
	}
}

func TestWriteBlobs(t *testing.T) {
	src := t.TempDir()
	writeFiles(t, src, map[string]string{"a": "alpha", "b": "beta", "copy-of-a": "alpha", "empty": ""})
	m, sources, _ := buildManifest(t, src, PackOptions{}, nil)
	var digests []string
	for d := range sources {
		digests = append(digests, d)
	}
	var buf bytes.Buffer
	var last int64
	if err := WriteBlobs(context.Background(), &buf, digests, sources, func(n int64) { last = n }); err != nil {
		t.Fatal(err)
	}
	blobs := readBlobTar(t, buf.Bytes())
	if len(blobs) != 3 {
		t.Errorf("%d blobs, want 3 (alpha, beta, empty)", len(blobs))
	}
	for name, body := range blobs {
		sum := sha256.Sum256(body)
		if name != "sha256:"+hex.EncodeToString(sum[:]) {
			t.Errorf("blob %s holds content with another digest", name)
		}
	}
	if last != int64(len("alpha")+len("beta")) {
		t.Errorf("progress ended at %d bytes, want 9", last)
	}

	// Changed after hashing: same size, other content; and another size.
	for name, content := range map[string]string{"same size": "ALPHA", "grown": "alphabet", "shrunk": "al"} {
		t.Run(name, func(t *testing.T) {
			mustDo(t, os.WriteFile(filepath.Join(src, "a"), []byte(content), 0o644))
			mustDo(t, os.WriteFile(filepath.Join(src, "copy-of-a"), []byte(content), 0o644))
			err := WriteBlobs(context.Background(), io.Discard, []string{digestOf(m, "a")}, sources, nil)
			if !errors.Is(err, ErrChangedSinceHashed) || !strings.Contains(err.Error(), `"a"`) && !strings.Contains(err.Error(), `"copy-of-a"`) {
				t.Errorf("err = %v, want ErrChangedSinceHashed naming the file", err)
			}
		})
	}

	if err := WriteBlobs(context.Background(), io.Discard, []string{poison}, sources, nil); err == nil {
		t.Errorf("a digest without a source was written")
	}
}

// storeFromBlobTar is a BlobSource holding what a WriteBlobs tar carried,
// laid out as the server's store lays blobs out: a file per content and
// mode, with the content's mtime.
type storeFromBlobTar struct {
	t     testing.TB
	dir   string
	blobs map[string][]byte
}

func (s *storeFromBlobTar) BlobFile(digest string, mode uint32) (string, int64, error) {
	body, ok := s.blobs[digest]
	if !ok {
		return "", 0, fmt.Errorf("%w: %s", ErrMissingBlobs, digest)
	}
	p := filepath.Join(s.dir, fmt.Sprintf("%s.%o", strings.TrimPrefix(digest, DigestPrefix), mode))
	if _, err := os.Stat(p); err != nil {
		mustDo(s.t, os.WriteFile(p, body, 0o600))
		mustDo(s.t, os.Chmod(p, os.FileMode(mode)))
		mt := ContentTime(sha256.Sum256(body))
		mustDo(s.t, os.Chtimes(p, mt, mt))
	}
	return p, int64(len(body)), nil
}

// The client half and the server half together: a context sent as a
// manifest plus a blob tar becomes the tree, and gets the context hash,
// that the same directory sent as a Pack tar does.
func TestManifestMaterializesLikePack(t *testing.T) {
	src := richTree(t)
	writeFiles(t, src, map[string]string{".dockerignore": "private\n", "same-as-main.go": "package main\n", "empty-file": ""})
	mustDo(t, os.Chmod(filepath.Join(src, "bin/tool"), 0o755|os.ModeSetuid))
	mustDo(t, os.Chmod(filepath.Join(src, "empty-file"), 0o1644))

	tarDir, tarInfo := mustReceive(t, packBytes(t, src, PackOptions{Compression: Uncompressed}))

	m, sources, _ := buildManifest(t, src, PackOptions{}, nil)
	// Through JSON, as it travels.
	data, err := json.Marshal(m)
	mustDo(t, err)
	var sent Manifest
	mustDo(t, json.Unmarshal(data, &sent))
	var digests []string
	for d := range sources {
		digests = append(digests, d)
	}
	var blobTar bytes.Buffer
	mustDo(t, WriteBlobs(context.Background(), &blobTar, digests, sources, nil))
	store := &storeFromBlobTar{t: t, dir: t.TempDir(), blobs: map[string][]byte{}}
	for name, body := range readBlobTar(t, blobTar.Bytes()) {
		store.blobs[name] = body
	}

	dst := filepath.Join(t.TempDir(), "ctx")
	info, err := Materialize(context.Background(), sent, store, dst, Limits{})
	if err != nil {
		t.Fatalf("Materialize: %v", err)
	}
	if info.Hash != tarInfo.Hash {
		t.Errorf("manifest context hash %s, tar context hash %s", info.Hash, tarInfo.Hash)
	}
	if got, want := readTree(t, dst), readTree(t, tarDir); !reflect.DeepEqual(got, want) {
		t.Errorf("trees differ:\nmanifest %v\ntar      %v", got, want)
	}
}
