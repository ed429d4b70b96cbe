package cli

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
	"mime"
	"mime/multipart"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/buildcontext"
)

// blobStore is the content store half of the fake server: the blob
// endpoints, and a check on POST /v1/builds that a manifest names only
// blobs the store holds, as the real server makes.
type blobStore struct {
	t *testing.T

	mu      sync.Mutex
	blobs   map[string][]byte
	queries [][]string // digests of each query
	puts    [][]string // digests of each upload, in tar order
	submits int
	// onSubmit, if set, runs before a submit is checked: call is its
	// number, from 0.
	onSubmit func(call int)
	// putStatus, if set, answers blob uploads with this error status.
	putStatus int
}

func withBlobStore(t *testing.T, s *fakeServer) *blobStore {
	b := &blobStore{t: t, blobs: map[string][]byte{}}
	s.handle("POST /v1/contexts/blobs/query", b.query)
	s.handle("POST /v1/contexts/blobs", b.put)
	orig := s.srv.Config.Handler
	s.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/v1/builds" && r.Header.Get("Authorization") == "Bearer "+testToken {
			if !b.checkSubmit(w, r) {
				return
			}
		}
		orig.ServeHTTP(w, r)
	})
	return b
}

func (b *blobStore) query(w http.ResponseWriter, r *http.Request) {
	var q struct {
		Digests []string `json:"digests"`
	}
	if err := json.NewDecoder(r.Body).Decode(&q); err != nil || q.Digests == nil {
		writeError(w, http.StatusBadRequest, "bad query", "bad_request")
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.queries = append(b.queries, q.Digests)
	missing := []string{}
	for _, d := range q.Digests {
		if _, ok := b.blobs[d]; !ok {
			missing = append(missing, d)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"missing": missing})
}

func (b *blobStore) put(w http.ResponseWriter, r *http.Request) {
	b.mu.Lock()
	status := b.putStatus
	b.mu.Unlock()
	if status != 0 {
		writeError(w, status, "the blob upload is larger than context.max_bytes", "too_large")
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/x-tar" {
		writeError(w, http.StatusBadRequest, "content type "+ct, "bad_request")
		return
	}
	tr := tar.NewReader(r.Body)
	var names []string
	var total int64
	got := map[string][]byte{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			writeError(w, http.StatusBadRequest, "bad tar: "+err.Error(), "bad_request")
			return
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			writeError(w, http.StatusBadRequest, "bad tar: "+err.Error(), "bad_request")
			return
		}
		if h.Typeflag != tar.TypeReg || h.Name != digest(body) {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("blob %s does not match its content", h.Name), "bad_request")
			return
		}
		names = append(names, h.Name)
		got[h.Name] = body
		total += int64(len(body))
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.puts = append(b.puts, names)
	for d, body := range got {
		b.blobs[d] = body
	}
	writeJSON(w, http.StatusOK, map[string]int64{"stored": int64(len(names)), "bytes": total})
}

// checkSubmit answers 409 missing_blobs for a manifest naming content the
// store lacks, and otherwise hands the (re-readable) request on.
func (b *blobStore) checkSubmit(w http.ResponseWriter, r *http.Request) bool {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error(), "bad_request")
		return false
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	b.mu.Lock()
	call := b.submits
	b.submits++
	hook := b.onSubmit
	b.mu.Unlock()
	if hook != nil {
		hook(call)
	}
	m, ok := manifestOf(b.t, r.Header.Get("Content-Type"), body)
	if !ok {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, e := range m.Entries {
		if _, have := b.blobs[e.Digest]; e.Type == buildcontext.EntryFile && !have {
			writeError(w, http.StatusConflict, "the kiln server does not have the content of "+e.Path, "missing_blobs")
			return false
		}
	}
	return true
}

func manifestOf(t *testing.T, contentType string, body []byte) (buildcontext.Manifest, bool) {
	var m buildcontext.Manifest
	_, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return m, false
	}
	mr := multipart.NewReader(bytes.NewReader(body), params["boundary"])
	for {
		part, err := mr.NextPart()
		if err != nil {
			return m, false
		}
		if part.FormName() != "context_manifest" {
			continue
		}
		if part.FileName() != "manifest.json" {
			t.Errorf("context_manifest part has filename %q, want manifest.json", part.FileName())
		}
		if err := json.NewDecoder(part).Decode(&m); err != nil {
			t.Errorf("context_manifest is not JSON: %v", err)
			return m, false
		}
		return m, true
	}
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func (b *blobStore) counts() (queries, puts, submits int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.queries), len(b.puts), b.submits
}

// uploadedSince lists the digests uploaded by puts from index from on.
func (b *blobStore) uploadedSince(from int) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, p := range b.puts[min(from, len(b.puts)):] {
		out = append(out, p...)
	}
	return out
}

func manifestTree(t *testing.T, n int) string {
	t.Helper()
	dir := t.TempDir()
	files := map[string]string{"Dockerfile": "FROM scratch\nCOPY . /\n", ".dockerignore": "*.log\n", "debug.log": "ignored"}
	for i := range n {
		files[fmt.Sprintf("src/f%02d.txt", i)] = strings.Repeat(fmt.Sprintf("file %d\n", i), 100)
	}
	writeTree(t, dir, files)
	return dir
}

func TestBuildSendsOnlyMissingBlobs(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	s := succeededServer(t)
	store := withBlobStore(t, s)
	dir := manifestTree(t, 10)

	// First build: every content goes up, the build names it by manifest.
	res := s.kiln(context.Background(), "build", "--progress", "plain", "-t", "app:1", dir)
	if res.code != 0 {
		t.Fatalf("build failed:\n%s", res)
	}
	up := s.upload(t, 0)
	if slices.Contains(up.order, "context") || up.order[len(up.order)-1] != "context_manifest" {
		t.Errorf("part order %v: want context_manifest last and no context", up.order)
	}
	if got := up.fields["tags"]; !slices.Equal(got, []string{"app:1"}) {
		t.Errorf("tags %v", got)
	}
	var m buildcontext.Manifest
	if err := json.Unmarshal([]byte(up.fields["context_manifest"][0]), &m); err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, e := range m.Entries {
		paths = append(paths, e.Path)
	}
	if len(paths) != 13 || paths[0] != ".dockerignore" || paths[1] != "Dockerfile" || slices.Contains(paths, "debug.log") {
		t.Errorf("manifest paths %v: want .dockerignore, Dockerfile, src and its 10 files", paths)
	}
	if got := store.uploadedSince(0); len(got) != 12 {
		t.Errorf("first build uploaded %d blobs, want 12", len(got))
	}
	if !strings.Contains(res.stderr, "#0 context: 13 files, ") || !strings.Contains(res.stderr, "(1 unchanged)") {
		t.Errorf("progress lacks the context line with 1 unchanged (the src dir):\n%s", res.stderr)
	}

	// Unchanged: nothing is uploaded.
	_, putsBefore, _ := store.counts()
	res = s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 0 {
		t.Fatalf("second build failed:\n%s", res)
	}
	if got := store.uploadedSince(putsBefore); len(got) != 0 {
		t.Errorf("an unchanged context uploaded %d blobs", len(got))
	}
	if _, puts, _ := store.counts(); puts != putsBefore {
		t.Errorf("an unchanged context made %d upload requests", puts-putsBefore)
	}
	if !strings.Contains(res.stderr, "#0 context: 13 files, ") || !strings.Contains(res.stderr, "sent 0 B (13 unchanged)") {
		t.Errorf("progress should say nothing was sent:\n%s", res.stderr)
	}

	// One file changed: exactly its new content goes up.
	changed := "a new version of file 3\n"
	writeTree(t, dir, map[string]string{"src/f03.txt": changed})
	_, putsBefore, _ = store.counts()
	res = s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 0 {
		t.Fatalf("third build failed:\n%s", res)
	}
	if got := store.uploadedSince(putsBefore); !slices.Equal(got, []string{digest([]byte(changed))}) {
		t.Errorf("after one change uploaded %v, want only the new content %s", got, digest([]byte(changed)))
	}
	if want := fmt.Sprintf("sent %d B (12 unchanged)", len(changed)); !strings.Contains(res.stderr, want) {
		t.Errorf("progress lacks %q:\n%s", want, res.stderr)
	}
	up = s.upload(t, 2)
	if err := json.Unmarshal([]byte(up.fields["context_manifest"][0]), &m); err != nil {
		t.Fatal(err)
	}
	for _, e := range m.Entries {
		if e.Path == "src/f03.txt" && (e.Digest != digest([]byte(changed)) || e.Size != int64(len(changed))) {
			t.Errorf("manifest entry %+v does not describe the new content", e)
		}
	}
}

func TestBuildHashCacheAvoidsRehashing(t *testing.T) {
	cacheHome := t.TempDir()
	t.Setenv("XDG_CACHE_HOME", cacheHome)
	s := succeededServer(t)
	withBlobStore(t, s)
	dir := manifestTree(t, 3)
	// The cache does not trust files changed within 2 s of hashing
	// (buildcontext's racyWindow), and ctime cannot be set back: let them
	// age.
	time.Sleep(2100 * time.Millisecond)

	if res := s.kiln(context.Background(), "build", "--progress", "plain", dir); res.code != 0 {
		t.Fatalf("build failed:\n%s", res)
	}
	caches, _ := filepath.Glob(filepath.Join(cacheHome, "kiln", "context-hashes", "*"))
	if len(caches) != 1 {
		t.Fatalf("hash cache files %v, want one for the context", caches)
	}
	c, err := buildcontext.OpenHashCache(dir)
	if err != nil {
		t.Fatal(err)
	}
	m, _, _, err := buildcontext.BuildManifest(context.Background(), dir, buildcontext.PackOptions{}, c)
	if err != nil {
		t.Fatal(err)
	}
	if files := len(m.Entries) - 1; c.Len() != files {
		t.Errorf("the cache kiln build saved covers %d of %d files", c.Len(), files)
	}
}

func TestBuildResendsBlobsEvictedBeforeSubmit(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	s := succeededServer(t)
	store := withBlobStore(t, s)
	dir := manifestTree(t, 4)
	store.onSubmit = func(call int) {
		if call == 0 {
			// Evicted between the query and the submit.
			store.mu.Lock()
			clear(store.blobs)
			store.mu.Unlock()
		}
	}
	res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 0 {
		t.Fatalf("build failed:\n%s", res)
	}
	queries, puts, submits := store.counts()
	// Probe, query, re-query.
	if queries != 3 || puts != 2 || submits != 2 {
		t.Errorf("%d queries, %d uploads, %d submits; want 3, 2 and 2", queries, puts, submits)
	}
	if first, all := len(store.puts[0]), len(store.uploadedSince(0)); all != 2*first || first != 6 {
		t.Errorf("uploads %v: want the 6 blobs twice", store.puts)
	}
	if !strings.Contains(res.stderr, "build b1 succeeded") {
		t.Errorf("no success:\n%s", res)
	}

	// Evicted again on the retry: one retry only, then the server's word.
	store.onSubmit = func(int) {
		store.mu.Lock()
		clear(store.blobs)
		store.mu.Unlock()
	}
	_, _, before := store.counts()
	res = s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 1 || !strings.Contains(res.stderr, "does not have the content of") {
		t.Errorf("want exit 1 with the server's missing_blobs message:\n%s", res)
	}
	if _, _, submits := store.counts(); submits-before != 2 {
		t.Errorf("%d submits; want the first and one retry", submits-before)
	}
}

func TestBuildFallsBackToTarWithoutContentStore(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	t.Setenv("KILN_DEBUG", "")
	s := succeededServer(t) // no blob endpoints: 404
	dir := manifestTree(t, 2)

	res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 0 {
		t.Fatalf("build failed:\n%s", res)
	}
	up := s.upload(t, 0)
	if up.files["src/f01.txt"] == "" || slices.Contains(up.order, "context_manifest") {
		t.Errorf("want the tar context, got parts %v and files %v", up.order, up.files)
	}
	if strings.Contains(res.stderr, "context store") || strings.Contains(res.stderr, "#0 context:") {
		t.Errorf("the fallback should be silent:\n%s", res)
	}
	if !strings.Contains(res.stderr, "#0 sent build context: ") {
		t.Errorf("no tar progress line:\n%s", res)
	}

	t.Setenv("KILN_DEBUG", "1")
	res = s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 0 || !strings.Contains(res.stderr, "kiln: debug: the kiln server keeps no context store") {
		t.Errorf("with KILN_DEBUG the fallback should be noted:\n%s", res)
	}

	// Asked for explicitly, the manifest path does not fall back.
	res = s.kiln(context.Background(), "build", "--progress", "plain", "--context-upload", "manifest", dir)
	if res.code != 1 || !strings.Contains(res.stderr, "--context-upload=manifest: the kiln server keeps no context store") {
		t.Errorf("want exit 1 explaining the server cannot take a manifest:\n%s", res)
	}

	// tar asks nothing.
	before := len(s.seenRequests())
	res = s.kiln(context.Background(), "build", "--progress", "plain", "--context-upload", "tar", dir)
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	for _, r := range s.seenRequests()[before:] {
		if strings.Contains(r, "/contexts/") {
			t.Errorf("--context-upload=tar made %s", r)
		}
	}
}

func TestBuildContextUploadTarIsUsedWithContentStore(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	s := succeededServer(t)
	store := withBlobStore(t, s)
	dir := manifestTree(t, 2)
	res := s.kiln(context.Background(), "build", "--progress", "plain", "--context-upload=tar", dir)
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	if q, p, _ := store.counts(); q != 0 || p != 0 || !slices.Contains(s.upload(t, 0).order, "context") {
		t.Errorf("--context-upload=tar: %d queries, %d uploads, parts %v", q, p, s.upload(t, 0).order)
	}
}

func TestBuildBlobUploadRefused(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	s := succeededServer(t)
	store := withBlobStore(t, s)
	store.putStatus = http.StatusRequestEntityTooLarge
	dir := manifestTree(t, 2)
	res := s.kiln(context.Background(), "build", "--progress", "plain", dir)
	if res.code != 1 {
		t.Fatalf("want exit 1:\n%s", res)
	}
	if !strings.Contains(res.stderr, "kiln: upload context files: the blob upload is larger than context.max_bytes") {
		t.Errorf("stderr should carry the server's reason:\n%s", res)
	}
	if _, _, submits := store.counts(); submits != 0 {
		t.Errorf("the build was submitted although its files were refused")
	}
}

func TestBuildInterruptDuringBlobUpload(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	s := succeededServer(t)
	withBlobStore(t, s)
	dir := manifestTree(t, 1)
	writeRandom(t, filepath.Join(dir, "big"), 16<<20, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s.handle("POST /v1/contexts/blobs", func(w http.ResponseWriter, r *http.Request) {
		io.CopyN(io.Discard, r.Body, 1<<20)
		cancel()
		io.Copy(io.Discard, r.Body)
	})
	res := s.kiln(ctx, "build", "--progress", "plain", dir)
	if res.code != 130 || !strings.Contains(res.stderr, "upload interrupted") {
		t.Errorf("want exit 130 and an interrupted upload:\n%s", res)
	}
	s.mu.Lock()
	submits := len(s.uploads)
	s.mu.Unlock()
	if events, _, cancels := s.counts(); events != 0 || cancels != 0 || submits != 0 {
		t.Errorf("after an interrupted upload: %d submits, %d events and %d cancel calls", submits, events, cancels)
	}
}

func TestBuildContextUploadFlag(t *testing.T) {
	s := succeededServer(t)
	dir := manifestTree(t, 1)
	res := s.kiln(context.Background(), "build", "--context-upload", "rsync", dir)
	if res.code != 2 || !strings.Contains(res.stderr, "invalid --context-upload") {
		t.Errorf("want a usage error:\n%s", res)
	}
}

func TestBlobBatches(t *testing.T) {
	src := buildcontext.Sources{"a": {Size: 60}, "b": {Size: 50}, "c": {Size: 200}, "d": {Size: 10}, "e": {Size: 90}}
	got := blobBatches([]string{"a", "b", "c", "d", "e"}, src, 100)
	want := [][]string{{"a"}, {"b"}, {"c"}, {"d", "e"}}
	if len(got) != len(want) {
		t.Fatalf("batches %v, want %v", got, want)
	}
	for i := range want {
		if !slices.Equal(got[i], want[i]) {
			t.Errorf("batches %v, want %v", got, want)
		}
	}
	if got := blobBatches(nil, src, 100); len(got) != 0 {
		t.Errorf("no digests gave %v", got)
	}
}

func TestBuildManifestTTYProgress(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	s := succeededServer(t)
	withBlobStore(t, s)
	dir := manifestTree(t, 2)
	res := s.kiln(context.Background(), "build", "--progress", "tty", dir)
	if res.code != 0 {
		t.Fatalf("%s", res)
	}
	if !strings.Contains(res.stderr, "[+] context: 5 files, ") || !strings.Contains(res.stderr, "(1 unchanged)") {
		t.Errorf("tty output lacks the context summary:\n%q", res.stderr)
	}
	res = s.kiln(context.Background(), "build", "--progress", "json", dir)
	if res.code != 0 || strings.Contains(res.stderr, "context: 5 files") || res.stdout != "" {
		t.Errorf("json mode: stderr carries the events alone, stdout nothing:\n%s", res)
	}
}
