package server

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-build/kiln/internal/auth"
	"github.com/kiln-build/kiln/internal/buildcontext"
	"github.com/kiln-build/kiln/internal/builds"
	"github.com/kiln-build/kiln/internal/cachevol"
	"github.com/kiln-build/kiln/internal/errdefs"
	"github.com/kiln-build/kiln/internal/images"
	"github.com/kiln-build/kiln/internal/store"
)

// wantAnswers is what clients rely on, written out apart from the table
// under test.
var wantAnswers = map[error]struct {
	status int
	code   string
}{
	errdefs.ErrInvalid:         {400, "bad_request"},
	errdefs.ErrTooLarge:        {413, "too_large"},
	errdefs.ErrUnauthenticated: {401, "invalid_token"},
	errdefs.ErrForbidden:       {403, "forbidden"},
	errdefs.ErrNotFound:        {404, "not_found"},
	errdefs.ErrConflict:        {409, "conflict"},
	errdefs.ErrInUse:           {409, "in_use"},
	errdefs.ErrMissingContent:  {409, "missing_blobs"},
	errdefs.ErrLimit:           {429, "too_many"},
	errdefs.ErrTimeout:         {408, "too_slow"},
	errdefs.ErrCanceled:        {499, "canceled"},
	errdefs.ErrUnavailable:     {503, "unavailable"},
	errdefs.ErrUpstream:        {502, "upstream"},
	errdefs.ErrUpstreamTimeout: {504, "upstream_timeout"},
}

func TestEveryClassHasItsAnswer(t *testing.T) {
	if len(errdefs.Classes()) != len(wantAnswers) || len(answers) != len(wantAnswers) {
		t.Fatalf("%d classes, %d answers, %d expected: a class was added without its answer (or its test)",
			len(errdefs.Classes()), len(answers), len(wantAnswers))
	}
	for _, c := range errdefs.Classes() {
		want, ok := wantAnswers[c]
		if !ok {
			t.Errorf("class %q has no expected answer", c)
			continue
		}
		// Bare, wrapped, and as an errdefs.Error.
		for _, err := range []error{c, fmt.Errorf("doing x: %w", c), &errdefs.Error{Class: c, Msg: "m"}} {
			rec := failed(t, err)
			if rec.status != want.status || rec.code != want.code {
				t.Errorf("%v: %d %s, want %d %s", err, rec.status, rec.code, want.status, want.code)
			}
		}
	}
}

// answered is one recorded answer of fail.
type answered struct {
	status int
	code   string
	msg    string
	header http.Header
	logged []string
}

// failed runs fail on err and decodes the answer, which must be the API's
// Error object: {"error", "code"} and nothing else.
func failed(t *testing.T, err error) answered {
	t.Helper()
	logs := &records{}
	s := &Server{log: slog.New(logs)}
	rec := httptest.NewRecorder()
	s.fail(rec, httptest.NewRequest("GET", "/v1/x", nil), err)
	var body map[string]string
	if e := json.Unmarshal(rec.Body.Bytes(), &body); e != nil {
		t.Fatalf("%v: body %q is not a JSON object of strings: %v", err, rec.Body, e)
	}
	if len(body) != 2 || body["error"] == "" || body["code"] == "" {
		t.Errorf("%v: body %v, want exactly error and code", err, body)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("%v: Content-Type %q", err, ct)
	}
	return answered{status: rec.Code, code: body["code"], msg: body["error"], header: rec.Header(), logged: logs.messages()}
}

// records is a slog.Handler that keeps what was logged.
type records struct {
	mu   sync.Mutex
	msgs []string
}

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	line := rec.Message
	rec.Attrs(func(a slog.Attr) bool { line += " " + a.String(); return true })
	r.msgs = append(r.msgs, line)
	return nil
}
func (r *records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *records) WithGroup(string) slog.Handler      { return r }
func (r *records) messages() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.msgs...)
}

// Each part's real errors arrive with their status, code and message.
func TestDomainErrorsArriveClassified(t *testing.T) {
	ctx := context.Background()
	type c struct {
		name   string
		err    error
		status int
		code   string
		msg    string // a fragment of the message the client gets
	}
	var cases []c
	add := func(name string, err error, status int, code, msg string) {
		if err == nil {
			t.Fatalf("%s: no error to map", name)
		}
		cases = append(cases, c{name, err, status, code, msg})
	}

	// buildcontext
	_, err := buildcontext.Receive(ctx, strings.NewReader("not a tar at all, not even close"), filepath.Join(t.TempDir(), "c"), buildcontext.Limits{})
	add("buildcontext: garbage", err, 400, "bad_request", "is not a valid")
	_, err = buildcontext.Receive(ctx, bytes.NewReader(bigTar(t)), filepath.Join(t.TempDir(), "c"), buildcontext.Limits{MaxBytes: 1024})
	add("buildcontext: over max_bytes", err, 413, "too_large", "context.max_bytes")
	dctx, cancel := context.WithDeadline(ctx, time.Now().Add(-time.Second))
	_, err = buildcontext.Receive(dctx, bytes.NewReader(bigTar(t)), filepath.Join(t.TempDir(), "c"), buildcontext.Limits{})
	cancel()
	add("buildcontext: deadline", err, 408, "too_slow", "took too long")
	m := buildcontext.Manifest{Version: buildcontext.ManifestVersion, Entries: []buildcontext.ManifestEntry{
		{Path: "f", Type: buildcontext.EntryFile, Mode: 0o644, Size: 1, Digest: "sha256:" + strings.Repeat("a", 64)}}}
	_, err = buildcontext.Materialize(ctx, m, noBlobs{}, filepath.Join(t.TempDir(), "c"), buildcontext.Limits{})
	if !errors.Is(err, buildcontext.ErrMissingBlobs) {
		t.Fatalf("materialize without blobs: %v, want ErrMissingBlobs", err)
	}
	add("buildcontext: missing blobs", err, 409, "missing_blobs", "does not have the content")
	full := t.TempDir()
	os.WriteFile(filepath.Join(full, "x"), nil, 0o644)
	_, err = buildcontext.Receive(ctx, bytes.NewReader(bigTar(t)), full, buildcontext.Limits{})
	add("buildcontext: the server's own fault", err, 500, "internal", "already exists and is not empty")

	// cachevol
	vols, err := cachevol.Open(t.TempDir(), cachevol.Config{DefaultSize: cachevol.MinSize, Stamp: "test", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	add("cachevol: no volume", vols.Delete(ctx, "never"), 404, "not_found", "cache volume not found")
	v, err := vols.Acquire(ctx, "held")
	if err != nil {
		t.Fatal(err)
	}
	add("cachevol: in use", vols.Delete(ctx, "held"), 409, "in_use", "a build is using it")
	v.Release()
	_, err = vols.Acquire(ctx, "bad\x01scope")
	add("cachevol: invalid scope", err, 400, "bad_request", "control characters")

	// auth
	_, err = auth.Principal{CacheScope: "team-a"}.CheckCacheScope("team-b")
	add("auth: foreign cache scope", err, 403, "forbidden", "is not this token's")
	a, _, err := auth.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.Verify("not.a.token")
	add("auth: bad token", err, 401, "invalid_token", "invalid token")

	// builds, store, images
	add("builds: not found", fmt.Errorf("%w: no build b1", builds.ErrNotFound), 404, "not_found", "no build b1")
	add("builds: finished", builds.ErrFinished, 409, "conflict", "already finished")
	add("builds: bad request (errdefs.Invalid)", fmt.Errorf("expand ARG X: %w", errdefs.Invalid("cpus 99 is over the cap")), 400, "bad_request", "cpus 99")
	add("store: no record", fmt.Errorf("load: %w", store.ErrNotFound), 404, "not_found", "record not found")
	add("images: no image", fmt.Errorf("%w: app:1", images.ErrNotFound), 404, "not_found", "app:1")
	add("limit", errdefs.Limit(1500*time.Millisecond, "too many uploads"), 429, "too_many", "too many uploads")
	add("unclassified", errors.New("disk on fire"), 500, "internal", "disk on fire")

	for _, tc := range cases {
		got := failed(t, tc.err)
		if got.status != tc.status || got.code != tc.code || !strings.Contains(got.msg, tc.msg) {
			t.Errorf("%s (%v): %d %s %q, want %d %s with %q", tc.name, tc.err, got.status, got.code, got.msg, tc.status, tc.code, tc.msg)
		}
		if logged := len(got.logged) > 0; logged != (tc.status == 500) {
			t.Errorf("%s: logged %v; only kiln's own failures are logged", tc.name, got.logged)
		}
		if tc.code == "too_many" && got.header.Get("Retry-After") != "2" {
			t.Errorf("%s: Retry-After %q, want 2", tc.name, got.header.Get("Retry-After"))
		}
	}
}

func TestSlowUploadIsTooSlow(t *testing.T) {
	got := failed(t, &slowUploadError{Rate: 1024, Window: time.Second, Err: os.ErrDeadlineExceeded})
	if got.status != 408 || got.code != "too_slow" || !strings.Contains(got.msg, "upload slower than") {
		t.Errorf("slow upload: %d %s %q", got.status, got.code, got.msg)
	}
}

// A client that went away gets nothing written, and nothing is logged.
func TestClientGoneGetsNoAnswer(t *testing.T) {
	logs := &records{}
	s := &Server{log: slog.New(logs)}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rec := httptest.NewRecorder()
	s.fail(rec, httptest.NewRequest("GET", "/v1/x", nil).WithContext(ctx), fmt.Errorf("read: %w", context.Canceled))
	if rec.Body.Len() != 0 || len(logs.messages()) != 0 {
		t.Errorf("answered %q, logged %v", rec.Body, logs.messages())
	}
}

type noBlobs struct{}

func (noBlobs) BlobFile(string, uint32) (string, int64, error) {
	return "", 0, buildcontext.ErrMissingBlobs
}

// bigTar is a valid context of a few KiB.
func bigTar(t *testing.T) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	data := bytes.Repeat([]byte("kiln "), 2000)
	if err := tw.WriteHeader(&tar.Header{Name: "f", Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Write(data)
	tw.Close()
	return b.Bytes()
}
